"""The ``qconv`` command line: parse, call one library function, render. Nothing else.

Exit codes, decided here only: 0 success, 1 a verification gate failed, 2 bad usage or bad
input (one line on stderr naming the file or tensor, no traceback). ``--json`` prints one JSON
document on stdout; progress bars go to stderr, and only on a terminal.

Each command lives in a module of this package by area (``convert``: convert and verify;
``evaluate``: eval; ``registry``: ls, show, rm; ``hub``: push and release) and calls :class:`qconv.Qconv`;
``render`` draws what they show. The commands are added to the group here.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

import click

# The libraries qconv drives talk on their own (transformers' "Loading weights" bars, bitsandbytes'
# note about an optional CPU kernel package); the CLI shows qconv's progress and errors instead.
# QCONV_DEBUG=1 leaves them alone.
if not os.environ.get("QCONV_DEBUG"):
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # huggingface_hub's "Retrying in 1s [Retry 1/5]" lines: qconv says a failure once, as one line
    # (the environment for a client imported later, the logger for one imported already)
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

import warnings  # noqa: E402

from qconv import __version__  # noqa: E402
from qconv.cli import convert, evaluate, hub, registry  # noqa: E402  (after the environment above)
from qconv.cli.render import fail  # noqa: E402
from qconv.errors import QconvError, QconvWarning, VerificationFailed  # noqa: E402


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """qconv's own warnings as one line on stderr (``warning: ...``), not Python's two lines
    with a file and a source line; other libraries' warnings stay hidden unless QCONV_DEBUG."""
    if issubclass(category, QconvWarning):
        click.echo(f"warning: {message}", err=True)
    elif os.environ.get("QCONV_DEBUG"):
        click.echo(warnings.formatwarning(message, category, filename, lineno, line), err=True, nl=False)


# click 8.2 and later answer a bare `qconv` with this error carrying the help; 8.1 prints the help
# itself and exits (the tuple is then empty: nothing to catch)
_NO_ARGS_IS_HELP = tuple(e for e in [getattr(click.exceptions, "NoArgsIsHelpError", None)] if e)


class QconvGroup(click.Group):
    """Turns qconv's errors (and OS errors such as a full disk) into one line and an exit code."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """Click answers a usage mistake (an unknown option, a missing argument, a value not among
        the choices) with the usage, a hint and the error on four lines; qconv's rule is one line
        naming the mistake (and the JSON document under --json), exit 2."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        argv = list(sys.argv[1:] if args is None else args)
        try:
            # not standalone: click returns ctx.exit's code (commands themselves return None)
            code = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except _NO_ARGS_IS_HELP as exc:  # a bare `qconv`: the help, as before
            exc.show()
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            message = exc.format_message().strip().splitlines()[0]
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            if "--json" in argv:
                click.echo(json.dumps({"error": message, "exit_code": exc.exit_code}))
            click.echo(f"Error: {message}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        # qconv's warnings as one line each, as they happen, whatever filters the process has
        # (restored after the command: a program calling main() keeps its own)
        with warnings.catch_warnings():
            warnings.simplefilter("always", QconvWarning)
            warnings.showwarning = _show_warning
            return self._invoke(ctx)

    def _invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except VerificationFailed as exc:
            ctx.exit(exc.exit_code)  # the command has rendered the failed report already
        except QconvError as exc:
            fail(ctx, exc.cli_message(), exc.exit_code)
        except OSError as exc:
            where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
            fail(ctx, f"{where}{exc.strerror or exc}", 2)


@click.group(cls=QconvGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qconv")
def main() -> None:
    """qconv: convert -> verify -> record -> release quantized language models."""


# The commands live by area; importing registers them on `main`.


for command in (
    convert.convert,
    convert.verify,
    evaluate.evaluate,
    registry.list_artifacts,
    registry.show,
    registry.remove,
    hub.push,
    hub.release,
):
    main.add_command(command)
