"""``qconv eval``: perplexity (and KL against the source) of an artifact, recorded in the registry."""

from __future__ import annotations

from pathlib import Path

import click

from qconv.api import Qconv
from qconv.cli.convert import device_option
from qconv.cli.render import json_option, print_json, progress_bars, stderr, stdout


@click.command(name="eval")
@click.argument("ref", metavar="ID|PATH")
@click.option(
    "--text",
    type=click.Path(path_type=Path),
    default=None,
    help="Text to measure on: a file, or wikitext2 (the default: the WikiText-2 test split shipped with qconv).",
)
@click.option("--seqlen", type=int, default=2048, show_default=True, help="Tokens per window.")
@click.option("--max-windows", type=int, default=None, help="Only the first N windows.")
@click.option("--kl", is_flag=True, help="Also KL divergence from the source model and top-1 agreement.")
@click.option("--source", default=None, help="Source model for --kl (default: the one in the manifest).")
@device_option
@click.option("--dtype", default=None, help="bfloat16, float16 or float32 (default: the artifact's).")
@json_option
def evaluate(ref, text, seqlen, max_windows, kl, source, device, dtype, as_json):
    """Perplexity of an artifact (registry id, id prefix, or folder; or a .gguf file) on a text:
    non-overlapping windows, mean NLL, exp. Recorded in the registry's metrics with the protocol."""
    _quiet_loading_bars()

    with progress_bars() as progress, Qconv(device=device, progress=progress) as api:
        result = api.evaluate(
            ref, text=text, seqlen=seqlen, max_windows=max_windows, kl=kl, source=source, dtype=dtype
        )
    if as_json:
        print_json(result.to_dict())
    else:
        m, p = result.metrics, result.protocol
        stdout.print(
            f"ppl {m['ppl']:.4f} (nll {m['nll']:.5f}) on {p['dataset']}: {p['windows']} windows of "
            f"{p['seqlen']} tokens, {p['tokens']:,} predicted, {p['device']} {p['dtype']}"
        )
        if "kl" in m:
            stdout.print(f"KL(source || artifact) {m['kl']:.5f} nats/token, top-1 agreement {m['top1']:.4f}")
        if result.recorded:
            stdout.print(f"recorded on {result.artifact_id}")
    if not result.recorded:
        stderr.print(f"note: {result.path} is not in the registry; nothing was recorded")


def _quiet_loading_bars() -> None:
    """transformers' own "Loading weights" bar would sit beside the per-window one."""
    import os

    if not os.environ.get("QCONV_DEBUG"):
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
