"""``qconv convert`` and ``qconv verify``."""

from __future__ import annotations

from pathlib import Path

import click

from qconv.api import Qconv
from qconv.cli.render import fmt_size, json_option, print_json, progress_bars, render_verify, stdout
from qconv.errors import VerificationFailed
from qconv.formats import all_formats, all_options


def method_options(f):
    """One click option per method option name: methods declaring one name agree on its type and
    choices (``register`` refuses them otherwise), so one ``--bits`` serves bnb, hqq and eetq."""
    for option in reversed(list(all_options().values())):
        text = _joined_help(option.name)
        if option.flag:
            flag = option.cli_name
            f = click.option(f"{flag}/--no-{flag[2:]}", option.name, default=None, help=text)(f)
        else:
            kind = click.Choice(option.choices) if option.choices else option.type
            f = click.option(option.cli_name, option.name, type=kind, default=None, help=text)(f)
    return f


def _joined_help(name: str) -> str:
    """The helps of every method declaring the option, in registration order (``--scheme``:
    aqlm's codebooks and compressed-tensors' schemes), leaving out one that an earlier help
    already begins with (``bits a weight``)."""
    kept: list[str] = []
    for fmt in all_formats().values():
        for option in fmt.options:
            if option.name == name and option.help and not any(k.startswith(option.help) for k in kept):
                kept.append(option.help)
    return "; ".join(kept)


device_option = click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
base_model_option = click.option(
    "--base-model",
    metavar="ORG/NAME[@REVISION]",
    default=None,
    help="The Hub model this is a quantized version of, for the model card's base_model and the "
    "registry (default: the source's Hub repo, when it is one or sits in the Hugging Face cache).",
)
max_rel_error_option = click.option(
    "--max-rel-error",
    type=float,
    default=None,
    help="Fail (exit 1) if a layer's relative error exceeds this.",
)


@click.command()
@click.argument("source")
@click.option(
    "-o", "--output", required=True, type=click.Path(path_type=Path), help="Artifact folder to create."
)
@click.option(
    "--method",
    default=None,
    help=f"Quantization method: {', '.join(sorted(all_formats()))}. Omit it to import a folder already "
    "quantized with HQQ (hqq's qmodel.pt, or safetensors with quant_method hqq).",
)
@method_options
@click.option(
    "--skip",
    multiple=True,
    metavar="PATTERN",
    help="Leave matching Linear modules unquantized (glob on module names, or re:REGEX). Repeatable.",
)
@device_option
@click.option(
    "--dtype",
    default="auto",
    show_default=True,
    help="dtype of unquantized tensors and of the weights fed to the quantizer (auto: the source's).",
)
@click.option(
    "--max-shard-size",
    default=None,
    help="Largest output file (default 5GB for safetensors shards; 48GB for gguf, split as gguf-split does).",
)
@click.option("--force", is_flag=True, help="Replace an existing artifact folder.")
@click.option(
    "--resume",
    is_flag=True,
    help="Continue an interrupted calibrated conversion (aqlm; hqq, compressed-tensors and gguf with --calibration) from its checkpoint beside OUTPUT.",
)
@click.option("--verify/--no-verify", default=True, show_default=True, help="Verify the artifact at the end.")
@click.option(
    "--logits/--no-logits",
    default=None,
    help="Real-loader logits check at the end (default: for models up to 2B parameters).",
)
@max_rel_error_option
@base_model_option
@click.option(
    "--record/--no-record", default=True, show_default=True, help="Record the artifact in the registry."
)
@json_option
def convert(
    source,
    output,
    method,
    skip,
    device,
    dtype,
    max_shard_size,
    force,
    resume,
    verify,
    logits,
    max_rel_error,
    base_model,
    record,
    as_json,
    **method_kwargs,
):
    """Quantize SOURCE (a model folder or a .gguf file) into an artifact folder, or import an HQQ one."""
    options = {k: v for k, v in method_kwargs.items() if k in all_options()}
    with progress_bars() as progress, Qconv(device=device, progress=progress) as api:
        result = api.convert(
            source,
            output,
            method,
            options,
            skip=skip,
            dtype=dtype,
            max_shard_size=max_shard_size,
            force=force,
            verify=verify,
            logits=logits,
            max_rel_error=max_rel_error,
            resume=resume,
            record=record,
            base_model=base_model,
        )
    report = result.report.to_dict() if result.report else None
    if report:
        report["path"] = str(result.path)
    summary = result.manifest["summary"]
    if as_json:
        print_json(
            {
                "id": result.artifact_id,
                "path": str(result.path),
                "recipe": result.manifest["recipe"],
                "summary": summary,
                "size_bytes": sum(f["size"] for f in result.manifest["files"].values()),
                "verify": report,
                "stats": result.stats,
            }
        )
    else:
        size = sum(f["size"] for f in result.manifest["files"].values())
        verb = "imported" if result.manifest["recipe"].get("imported_from") else "wrote"
        stdout.print(
            f"{verb} {result.path} ({result.manifest['recipe']['label']}, {summary['quantized_layers']} layers, "
            f"{fmt_size(size)}, {summary['bits_per_weight']:.2f} bits/weight) in {result.stats['total_s']:.1f} s"
        )
        if report:
            render_verify(report)
        if result.artifact_id:
            stdout.print(f"recorded as {result.artifact_id}")
    if report and not report["passed"]:
        raise VerificationFailed("the artifact failed verification", result.report)


@click.command()
@click.argument("ref", metavar="ID|PATH")
@click.option(
    "--source", default=None, help="Source to compare with (default: the one in the manifest, if present)."
)
@device_option
@max_rel_error_option
@click.option(
    "--logits/--no-logits", default=True, show_default=True, help="Run the real-loader logits check."
)
@click.option(
    "--record",
    is_flag=True,
    help="Record a folder the registry does not know yet (converted with --no-record, or stopped "
    "while it was being recorded), with this result.",
)
@click.option(
    "--report",
    "report_path",
    type=click.Path(path_type=Path),
    default=None,
    metavar="FILE.html",
    help="Also write the result as a self-contained HTML page (error chart, loader check, files).",
)
@json_option
def verify(ref, source, device, max_rel_error, logits, record, report_path, as_json):
    """Check an artifact (registry id, id prefix, or folder): file hashes, every layer's error,
    and the real loader's logits. A Hub source is reopened at its recorded commit from the
    Hugging Face cache (never downloaded: --source ORG/NAME@COMMIT does that)."""
    # the result is stored on the artifact's registry row, when it has one
    with progress_bars() as progress, Qconv(device=device, progress=progress) as api:
        if report_path is not None:
            api.check_report_path(report_path)  # before the work: a typo in the path costs nothing
        report = api.verify(ref, source=source, max_rel_error=max_rel_error, logits=logits, record=record)
    document = report.to_dict()
    if record:
        document["id"] = report.artifact_id
    if as_json:
        print_json(document)
    else:
        render_verify(document)
        if record:
            stdout.print(f"recorded as {report.artifact_id}")
    if report_path is not None:  # also for a failed verification: that is when one looks
        click.echo(f"wrote the report {api.write_verify_report(report_path, document)}", err=True)
    if not report.passed:
        raise VerificationFailed("the artifact failed verification", report)
