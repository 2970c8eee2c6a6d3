"""The ``qconv`` command line: parse, call one library function, render. Nothing else.

Exit codes, decided here only: 0 success, 1 a verification gate failed, 2 bad usage or bad
input (one line on stderr naming the file or tensor, no traceback). ``--json`` prints one JSON
document on stdout; progress bars go to stderr, and only on a terminal.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from contextlib import contextmanager
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from qconv import __version__
from qconv.errors import QconvError, VerificationFailed
from qconv.progress import ProgressSink

# The libraries qconv drives talk on their own (transformers' "Loading weights" bars, bitsandbytes'
# note about an optional CPU kernel package); the CLI shows qconv's progress and errors instead.
# QCONV_DEBUG=1 leaves them alone.
if not os.environ.get("QCONV_DEBUG"):
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

# Piped output (not a terminal) gets wide tables rather than rich's 80-column default.
_PIPE_WIDTH = None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", "200"))
stdout = Console(highlight=False, soft_wrap=True, width=_PIPE_WIDTH)
stderr = Console(stderr=True, highlight=False, soft_wrap=True)


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
        try:
            return super().invoke(ctx)
        except VerificationFailed as exc:
            ctx.exit(exc.exit_code)  # the command has rendered the failed report already
        except QconvError as exc:
            fail(ctx, exc.cli_message(), exc.exit_code)
        except OSError as exc:
            where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
            fail(ctx, f"{where}{exc.strerror or exc}", 2)


def fail(ctx: click.Context, message: str, code: int) -> None:
    message = message.strip().splitlines()[0] if message.strip() else "failed"
    if ctx.meta.get("qconv.json"):
        click.echo(json.dumps({"error": message, "exit_code": code}))
    click.echo(f"Error: {message}", err=True)
    ctx.exit(code)


def json_option(f):
    def remember(ctx: click.Context, _param, value: bool) -> bool:
        ctx.meta["qconv.json"] = value
        return value

    return click.option(
        "--json",
        "as_json",
        is_flag=True,
        callback=remember,
        expose_value=True,
        is_eager=True,
        help="Print one JSON document on stdout.",
    )(f)


def print_json(document: Any) -> None:
    click.echo(json.dumps(document, indent=2, default=str))


class RichProgress(ProgressSink):
    """Progress bars on stderr, one per stage."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.tasks: dict[str, int] = {}

    def start(self, stage: str, total: int | None, unit: str = "tensors") -> None:
        self.tasks[stage] = self.progress.add_task(stage, total=total, unit=unit)

    def advance(self, stage: str, n: int = 1) -> None:
        if stage in self.tasks:
            self.progress.advance(self.tasks[stage], n)

    def finish(self, stage: str) -> None:
        task = self.tasks.get(stage)
        if task is not None:
            total = self.progress.tasks[task].total
            self.progress.update(task, completed=total if total is not None else 1, total=total or 1)


class AmountColumn(ProgressColumn):
    """``12/224`` for counted stages, ``1.2/5.7 GB`` for byte stages."""

    def render(self, task) -> Text:
        if task.fields.get("unit") == "bytes":
            scale, unit = (1e9, "GB") if (task.total or 0) >= 1e9 else (1e6, "MB")
            total = f"{task.total / scale:.1f}" if task.total else "?"
            return Text(f"{task.completed / scale:.1f}/{total} {unit}")
        total = int(task.total) if task.total is not None else "?"
        return Text(f"{int(task.completed)}/{total}")


@contextmanager
def progress_bars():
    progress = Progress(
        TextColumn("{task.description:>8}"),
        BarColumn(),
        AmountColumn(),
        TimeElapsedColumn(),
        console=stderr,
        transient=False,
        disable=not stderr.is_terminal,
    )
    with progress:
        yield RichProgress(progress)


# -- shared rendering -------------------------------------------------------------------------
def fmt_float(x: float | None, spec: str = ".4f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return format(x, spec)


def fmt_size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def checks_table(checks: list[dict]) -> Table:
    """A verify result's checks (``qconv convert``, ``verify`` and ``show`` draw the same table)."""
    table = Table(title="verify", title_justify="left")
    for column in ("check", "result", "detail"):
        table.add_column(column, overflow="fold")
    for check in checks:
        result = "[green]pass[/]" if check["passed"] else "[red]FAIL[/]"
        table.add_row(check["name"], result, check.get("detail", ""))
    return table


def layers_table(title: str, layers: list[tuple[str, dict]]) -> Table:
    """Per-layer errors, in the order given (``qconv convert``, ``verify`` and ``show``)."""
    table = Table(title=title, title_justify="left")
    for column in ("layer", "shape", "rel error", "max abs", "SNR dB"):
        table.add_column(column, justify="left" if column in ("layer", "shape") else "right")
    for name, entry in layers:
        table.add_row(
            name,
            "x".join(str(d) for d in entry.get("shape") or []),
            fmt_float(entry["rel_error"]),
            fmt_float(entry["max_abs"], ".4g"),
            fmt_float(entry["snr_db"], ".1f"),
        )
    return table


def render_verify(report_dict: dict, worst: int = 10) -> None:
    stdout.print(checks_table(report_dict["checks"]))
    layers = list(report_dict.get("layers", {}).items())
    if layers:
        stdout.print(
            layers_table(f"worst layers ({min(worst, len(layers))} of {len(layers)})", layers[:worst])
        )
    stdout.print("[green]verified[/]" if report_dict["passed"] else "[red]verification FAILED[/]")


@click.group(cls=QconvGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qconv")
def main() -> None:
    """qconv: convert -> verify -> record -> release quantized language models."""


# The commands live by area; importing registers them on `main`.
from qconv import cli_convert, cli_eval, cli_hub, cli_registry  # noqa: E402,F401
