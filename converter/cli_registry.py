"""``qconv ls``: what the registry knows."""

from __future__ import annotations

import click
from rich.table import Table

from qconv.cli import fmt_float, fmt_size, json_option, main, print_json, stdout


@main.command(name="ls")
@click.option("--method", default=None, help="Only artifacts of this method.")
@json_option
def list_artifacts(method, as_json):
    """List recorded artifacts, newest first."""
    from qconv.registry import open_registry

    with open_registry() as registry:
        rows = registry.list_artifacts(method=method)
    if as_json:
        print_json(rows)
        return
    table = Table(title=f"{len(rows)} artifact{'s' if len(rows) != 1 else ''}", title_justify="left")
    for column in (
        "id",
        "base model",
        "method",
        "bits",
        "size",
        "bits/w",
        "worst err",
        "verified",
        "created",
    ):
        table.add_column(
            column, justify="right" if column in ("bits", "size", "bits/w", "worst err") else "left"
        )
    for row in rows:
        verified = {True: "[green]yes[/]", False: "[red]FAILED[/]", None: "-"}[row["verified"]]
        table.add_row(
            row["id"],
            row["base_model"],
            row["label"] or row["method"],
            str(row["bits"] or "-"),
            fmt_size(row["size_bytes"]),
            fmt_float(row["bits_per_weight"], ".2f"),
            fmt_float(row["worst_rel_error"], ".4f"),
            verified,
            (row["created"] or "")[:19].replace("T", " "),
        )
    stdout.print(table)
