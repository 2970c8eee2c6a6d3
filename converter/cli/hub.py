"""``qconv push`` and ``qconv release``: publishing to a Hugging Face Hub."""

from __future__ import annotations

import os
from pathlib import Path

import click
from rich.table import Table

from qconv.api import Qconv
from qconv.cli.render import fmt_float, fmt_size, json_option, print_json, stdout
from qconv.errors import VerificationFailed


def quiet_hub_client() -> None:
    """huggingface_hub's own upload bars, as the CLI's HF_HUB_DISABLE_PROGRESS_BARS asks, even
    when the library was imported before qconv.cli set it (it reads it at import)."""
    if not os.environ.get("QCONV_DEBUG"):
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


@click.command()
@click.argument("artifact")
@click.option("--repo", required=True, help="The Hub repo to push to, NAMESPACE/NAME (created if missing).")
@click.option("--private", is_flag=True, help="Create the repo private.")
@click.option("--revision", default="main", show_default=True, help="Branch to push to (created if missing).")
@click.option("--dry-run", is_flag=True, help="Show the files and the model card; contact nobody.")
@click.option("--force", is_flag=True, help="Push even if the artifact failed verification or never ran it.")
@click.option(
    "--base-model",
    metavar="ORG/NAME[@REVISION]",
    default=None,
    help="The Hub model the card and the pushed qconv.json name as the base model "
    "(default: the artifact's own).",
)
@json_option
def push(artifact, repo, private, revision, dry_run, force, base_model, as_json):
    """Publish ARTIFACT (a folder or a registry id) to a Hub repo, with its model card.

    Pushing the same artifact again makes no commit. The token comes from HF_TOKEN or
    huggingface_hub's login and is never stored or printed."""
    quiet_hub_client()
    with Qconv() as api:
        result = api.push(
            artifact,
            repo,
            revision=revision,
            private=private,
            dry_run=dry_run,
            force=force,
            base_model=base_model,
        )
    document = result.to_dict()
    if as_json:
        if dry_run:
            document["card"] = result.card
        print_json(document)
        return
    if dry_run:
        table = Table(title=f"would push to {repo}@{revision}", title_justify="left")
        table.add_column("file")
        table.add_column("size", justify="right")
        table.add_column("sha256")
        for f in result.files:
            table.add_row(f["name"], fmt_size(f["size"]), f["sha256"])
        stdout.print(table)
        stdout.print(f"{fmt_size(sum(f['size'] for f in result.files))} in {len(result.files)} files")
        stdout.print("\n[bold]README.md[/] (model card):")
        stdout.print(result.card, markup=False)
        return
    for error in result.errors:
        stdout.print(f"retried after: {error}", markup=False)
    if result.status == "unchanged":
        stdout.print(f"{repo}@{revision} already holds this artifact at {result.commit_sha}: no new commit")
    else:
        stdout.print(f"pushed {result.folder} to {result.url}")
    if result.recorded:
        stdout.print(f"recorded the push of {result.artifact_id}")


@click.command()
@click.argument("plan", type=click.Path(path_type=Path))
@click.option("--dry-run", is_flag=True, help="Show what each entry would do; convert and push nothing.")
@json_option
def release(plan, dry_run, as_json):
    """Run a release PLAN.toml: convert -> verify -> eval -> gate -> push for every recipe.

    Entries already released are skipped; a failing entry is reported and the others go on;
    running the plan again resumes. Exit 1 when an entry failed."""
    quiet_hub_client()

    def progress(result) -> None:
        if not as_json:
            stdout.print(
                f"{result.label}: {result.status}" + (f" ({result.message})" if result.message else "")
            )

    with Qconv() as api:
        report = api.release(plan, dry_run=dry_run, on_entry=progress)
    if as_json:
        print_json(report.to_dict())
    else:
        table = Table(
            title=f"release of {report.base}"
            + (f" @ {report.source_revision[:12]}" if report.source_revision else ""),
            title_justify="left",
        )
        for column in ("entry", "repo", "status", "worst err", "ppl", "vs source", "commit", "detail"):
            table.add_column(
                column, justify="right" if column in ("worst err", "ppl", "vs source") else "left"
            )
        for e in report.entries:
            color = {"failed": "red", "released": "green"}.get(e.status)
            status = f"[{color}]{e.status}[/]" if color else e.status
            if e.status == "failed" and e.stage:
                status += f" ({e.stage})"
            table.add_row(
                e.label,
                e.repo,
                status,
                fmt_float(e.worst_layer_error),
                fmt_float(e.ppl, ".3f"),
                f"{e.ppl_increase:+.2%}" if e.ppl_increase is not None else "-",
                (e.commit_sha or "-")[:12],
                (("resumed from " + (e.artifact_id or "") + "; ") if e.resumed else "") + e.message,
            )
        stdout.print(table)
    if report.failed:
        raise VerificationFailed(f"{len(report.failed)} release entries failed", report)
