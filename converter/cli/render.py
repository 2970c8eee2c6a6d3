"""What the ``qconv`` command line shows: tables, numbers, JSON, progress bars and the one-line
error. Every command renders through here.

Exit codes, decided here only: 0 success, 1 a verification gate failed, 2 bad usage or bad
input (one line on stderr naming the file or tensor, no traceback). ``--json`` prints one JSON
document on stdout; progress bars go to stderr, and only on a terminal.
"""

from __future__ import annotations

import json
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

from qconv.progress import ProgressSink

# Piped output (not a terminal) gets wide tables rather than rich's 80-column default.
_PIPE_WIDTH = None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", "200"))
stdout = Console(highlight=False, soft_wrap=True, width=_PIPE_WIDTH)
stderr = Console(stderr=True, highlight=False, soft_wrap=True)


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
