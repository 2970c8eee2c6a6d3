"""``qconv ui``: browse the registry in a web browser, read-only (:mod:`qconv.ui`)."""

from __future__ import annotations

import signal

import click

from qconv.api import Qconv
from qconv.cli.render import json_option, print_json


@click.command(name="ui")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8765,
    show_default=True,
    help="Port to listen on (0: any free port).",
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on (the default is reachable from this machine only).",
)
@json_option
@click.pass_context
def serve_ui(ctx: click.Context, port: int, host: str, as_json: bool) -> None:
    """Serve the registry as web pages, read-only: artifacts with facets, and each artifact's
    files, recipe, per-layer errors and pushes. Ctrl-C stops it."""
    with Qconv() as api:  # the registry is opened read-only by the server, never through api
        server = api.ui_server(host, port)
    if as_json:  # where it listens, for a script that started it with --port 0
        print_json({"registry": str(server.registry_file), "url": server.url})
    else:
        click.echo(f"serving {server.registry_file} read-only at {server.url} (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt as exc:  # Ctrl-C (or SIGTERM, raised as Terminated): the usual way out
        signum = getattr(exc, "qconv_signal", signal.SIGINT)
        what = "Interrupted (SIGINT)" if signum == signal.SIGINT else "Terminated (SIGTERM)"
        click.echo(f"{what}: qconv ui stopped serving {server.url}", err=True)
        ctx.exit(128 + signum)
    finally:
        server.server_close()
