"""``qconv ls``, ``qconv show`` and ``qconv rm``: what the registry knows.

Every command that takes an artifact takes an id, a unique id prefix or the artifact's folder
(``qconv.registry.resolve_artifact``, through ``qconv.Qconv``).
"""

from __future__ import annotations

import json

import click
from rich.table import Table

from qconv.api import Qconv
from qconv.cli.render import (
    checks_table,
    fmt_float,
    fmt_size,
    json_option,
    layers_table,
    print_json,
    stderr,
    stdout,
)
from qconv.formats import all_formats

SORT_CHOICES = ("created", "size", "bits", "error", "ppl", "method", "base")


@click.command(name="ls")
@click.option(
    "--method", type=click.Choice(sorted(all_formats())), default=None, help="Only artifacts of this method."
)
@click.option("--bits", type=int, default=None, help="Only artifacts of this bit width (the recipe's).")
@click.option("--base", default=None, help="Only artifacts whose base model or source contains this text.")
@click.option("--pushed/--unpushed", default=None, help="Only artifacts pushed to a hub (or never pushed).")
@click.option(
    "--sort",
    type=click.Choice(SORT_CHOICES),
    default="created",
    show_default=True,
    help="created: newest first; size, bits (bits/weight), error (worst layer), ppl: smallest first.",
)
@click.option("--reverse", is_flag=True, help="Reverse the order.")
@json_option
def list_artifacts(method, bits, base, pushed, sort, reverse, as_json):
    """List recorded artifacts, newest first."""
    with Qconv() as api:
        _say_if_newer(api)
        rows = api.registry.list_artifacts(
            method=method, bits=bits, base=base, pushed=pushed, sort=sort, reverse=reverse
        )
    if as_json:
        print_json(rows)
        return
    table = Table(title=f"{len(rows)} artifact{'s' if len(rows) != 1 else ''}", title_justify="left")
    right = ("bits", "size", "bits/w", "worst err", "ppl", "pushes")
    for column in (
        "id",
        "base model",
        "method",
        "bits",
        "size",
        "bits/w",
        "worst err",
        "ppl",
        "verified",
        "pushes",
        "created",
    ):
        table.add_column(column, justify="right" if column in right else "left")
    for row in rows:
        table.add_row(
            row["id"],
            row["base_model"],
            row["label"] or row["method"],
            str(row["bits"] or "-"),
            fmt_size(row["size_bytes"]),
            fmt_float(row["bits_per_weight"], ".2f"),
            fmt_float(row["worst_rel_error"], ".4f"),
            fmt_float(row["ppl"], ".2f"),
            _verified(row["verified"]),
            str(row["pushes"] or "-"),
            _time(row["created"]),
        )
    stdout.print(table)


@click.command()
@click.argument("ref", metavar="ID|PATH")
@click.option("--layers", "all_layers", is_flag=True, help="List every layer (default: the 10 worst).")
@json_option
def show(ref, all_layers, as_json):
    """Everything recorded about one artifact: provenance, metrics, pushes and its files."""
    with Qconv() as api:
        _say_if_newer(api)
        record = api.registry.get_artifact(api.registry.resolve(ref)["id"])
    if as_json:
        print_json(record)
        return
    _render_record(record, all_layers)


@click.command(name="rm")
@click.argument("ref", metavar="ID|PATH")
@click.option(
    "--delete-files",
    is_flag=True,
    help="Also delete the artifact's folder (only if its qconv.json is this artifact's and it holds "
    "nothing else).",
)
@json_option
def remove(ref, delete_files, as_json):
    """Remove an artifact from the registry (its metrics and pushes too)."""
    with Qconv() as api:
        result = api.registry.remove_artifact(ref, delete_files=delete_files)
    if as_json:
        print_json(result)
        return
    if result["files_deleted"]:
        stdout.print(f"removed {result['id']} and deleted {result['path']}")
    elif delete_files:
        stdout.print(f"removed {result['id']} ({result['path']} was already gone)")
    else:
        stdout.print(f"removed {result['id']} (files kept in {result['path']})")


# -- rendering of `show` ----------------------------------------------------------------------
def _verified(flag: bool | None) -> str:
    return {True: "[green]yes[/]", False: "[red]FAILED[/]", None: "-"}[flag]


def _time(created: str | None) -> str:
    return (created or "")[:19].replace("T", " ")


def _text(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _fields(title: str, pairs) -> Table:
    table = Table(title=title, title_justify="left", show_header=False, box=None, padding=(0, 2, 0, 0))
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in pairs:
        table.add_row(key, _text(value))
    return table


def _file_table(title: str, files: dict) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("name")
    table.add_column("size", justify="right")
    table.add_column("sha256")
    for name, entry in files.items():
        table.add_row(name, fmt_size(entry["size"]), entry["sha256"] or "-")
    return table


def _render_record(record: dict, all_layers: bool) -> None:
    stdout.print(
        f"[bold]{record['id']}[/]  {record['label'] or record['method']}  {record['path']}  "
        f"verified: {_verified(record['verified'])}"
    )
    stdout.print(
        _fields(
            "artifact",
            [
                ("created", _time(record["created"])),
                ("qconv", record["qconv_version"]),
                ("size", fmt_size(record["size_bytes"])),
                ("bits/weight", fmt_float(record["bits_per_weight"], ".3f")),
                ("params", f"{record['quantized_params']} quantized of {record['total_params']}"),
                ("worst layer", f"{record['worst_layer']} ({fmt_float(record['worst_rel_error'])})"),
            ],
        )
    )
    stdout.print(
        _fields(
            "source",
            [
                (
                    "base model",
                    f"{record['base_model']}@{record['base_model_revision']}"
                    if record.get("base_model_revision")
                    else record["base_model"],
                ),
                ("kind", record["source_kind"]),
                ("ref", record["source_ref"]),
                ("revision", record["source_revision"]),
                ("architecture", record.get("source_architecture")),
            ],
        )
    )
    if record["source_files"]:
        stdout.print(_file_table("source files", record["source_files"]))
    stdout.print(_fields("recipe", (record["recipe"] or {}).items()))
    stdout.print(_fields("calibration", (record["calibration"] or {"": "none (data-free)"}).items()))
    stdout.print(_fields("environment", (record["environment"] or {}).items()))
    if record["skipped"]:
        stdout.print(_fields("left unquantized", record["skipped"].items()))
    verify = record["verify"]
    if isinstance(verify, dict):
        stdout.print(checks_table(verify.get("checks", [])))
    else:
        stdout.print("[bold]verify[/]  never verified")
    if record["metrics"]:
        metrics = Table(title="metrics", title_justify="left")
        for column in ("metric", "value", "dataset", "seqlen", "windows", "tokens", "device", "measured"):
            metrics.add_column(
                column, justify="right" if column in ("value", "seqlen", "windows", "tokens") else "left"
            )
        for row in record["metrics"]:
            protocol = row["protocol"] if isinstance(row["protocol"], dict) else {}
            metrics.add_row(
                row["name"],
                fmt_float(row["value"], ".4f"),
                _text(row.get("dataset")),
                _text(row.get("seqlen")),
                _text(row.get("windows")),
                _text(row.get("tokens")),
                _text(protocol.get("device")),
                _time(row["created"]),
            )
        stdout.print(metrics)
    if record["pushes"]:
        pushes = Table(title="pushes", title_justify="left")
        for column in ("repo", "revision", "commit", "url", "pushed"):
            pushes.add_column(column, overflow="fold")
        for row in record["pushes"]:
            pushes.add_row(
                row["repo"],
                _text(row["revision"]),
                _text(row["commit_sha"]),
                _text(row["url"]),
                _time(row["created"]),
            )
        stdout.print(pushes)
    layers = sorted(
        record["layers"].items(),
        key=lambda kv: -(kv[1]["rel_error"] if kv[1]["rel_error"] is not None else float("inf")),
    )
    if layers:
        shown = layers if all_layers else layers[:10]
        stdout.print(layers_table(f"layers ({len(shown)} of {len(layers)}, worst first)", shown))
    stdout.print(_file_table(f"files ({len(record['files'])})", record["files"]))


def _say_if_newer(api: Qconv) -> None:
    """A registry a newer qconv wrote is read as it is, and never written (one line on stderr)."""
    if api.registry.newer:
        stderr.print(
            f"note: {api.registry.path} was written by a newer qconv "
            f"(migration {', '.join(api.registry.newer)}): read only"
        )
