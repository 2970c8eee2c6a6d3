"""Why a lower weight error did not give a lower perplexity (compressed-tensors ``--solver hqq``,
formats/ct_solver.py): each solver's layers measured under SmolLM2's own activations.

For every third quantized Linear (``--every``; 70 of SmolLM2-135M-Instruct's 210, all seven
kinds) of the Q4_1 gguf source bench/run_ct.py quantizes, in the working dtype bfloat16, at
W4A16 or W4A16_ASYM with groups of 64: ``H = X^T X`` of the layer's inputs over two wikitext-2 test windows of 2048 tokens taken
AFTER the eight ``qconv eval --max-windows 8`` scores (windows 8 and 9), and per solver
(dequantized weight ``D``, source ``W``):

  output gain       <W H, D> / <W H, W>: how much of the true output the layer's output keeps
                    along it (below 1: the outputs shrink; a bias every token shares)
  activation error  tr((D - W) H (D - W)^T) / tr(W H W^T), and its ratio to rtn's
  weight error      ||D - W|| / ||W|| (the manifest's rel_error), and its ratio to rtn's
  weighted error    ||(D - W) * W|| / ||W * W||: each error counted by its weight's square (the
                    hqq solver's criterion since version 2)
  largest weights   per group of 64, |D - W| / |W| at the group's largest-magnitude weight, mean;
                    and signed, (D - W) / W there (below 0: the largest weights shrink on average)

Solvers: ``rtn`` (llm-compressor's round to nearest), ``hqq`` (the installed ct_solver), and with
``--old FILE`` a ct_solver.py of an earlier version (e.g. ``git show 2bd51d7:formats/ct_solver.py``,
version 1, which minimised the plain squared error).

    .venv/bin/python bench/diagnose_ct_solver.py --old /tmp/ct_solver_v1.py
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_bench import environment  # noqa: E402
from run_ct import smollm2_gguf  # noqa: E402

from qconv.evaluate import DEFAULT_SEQLEN, default_text, tokenize_text  # noqa: E402
from qconv.formats import ct_layout, ct_solver  # noqa: E402
from qconv.modeling import reference_model  # noqa: E402
from qconv.sources import open_source  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "ct_solver_diagnosis_cpu.json"
GROUP_SIZE = 64
#: the windows eval scores are 0..7; these come after them
WINDOWS = (8, 9)


def layer_inputs_xtx(model, ids: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    xtx, hooks = {}, []
    for name in names:

        def hook(_module, inputs, _output, name=name):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            xtx[name] = xtx.get(name, 0) + x.T @ x

        hooks.append(modules[name].register_forward_hook(hook))
    with torch.no_grad():
        for window in WINDOWS:
            model(input_ids=ids[window * DEFAULT_SEQLEN : (window + 1) * DEFAULT_SEQLEN].unsqueeze(0))
    for hook in hooks:
        hook.remove()
    return xtx


def measures(weight: torch.Tensor, quantized: ct_layout.Quantized, xtx: torch.Tensor) -> dict:
    reference = weight.float()
    dequantized = ct_layout.dequantize(quantized, weight.shape[1])
    diff = dequantized - reference
    energy = ((reference @ xtx) * reference).sum().item()
    # each group's largest-magnitude weight: its error relative to it
    groups = reference.unflatten(-1, (-1, GROUP_SIZE))
    largest = groups.abs().argmax(dim=-1, keepdim=True)
    extreme = groups.gather(-1, largest)
    extreme_signed = diff.unflatten(-1, (-1, GROUP_SIZE)).gather(-1, largest)
    extreme_error = extreme_signed.abs()
    nonzero = extreme != 0
    return {
        "output_gain": ((reference @ xtx) * dequantized).sum().item() / energy,
        "activation_error": ((diff @ xtx) * diff).sum().item() / energy,
        "rel_error": (diff.norm() / reference.norm()).item(),
        "weighted_rel_error": ((diff * reference).norm() / reference.square().norm()).item(),
        "largest_weight_rel_error": (extreme_error[nonzero] / extreme[nonzero].abs()).mean().item(),
        # signed: above 0 where the largest weight grows in magnitude, below where it shrinks
        "largest_weight_signed_error": (extreme_signed[nonzero] / extreme[nonzero]).mean().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--schemes", default="W4A16")
    parser.add_argument(
        "--every",
        type=int,
        default=3,
        help="every N-th quantized Linear (210 in SmolLM2; 3: all seven kinds)",
    )
    parser.add_argument("--old", type=Path, help="an earlier formats/ct_solver.py, measured as 'hqq-old'")
    args = parser.parse_args()
    solvers = {"rtn": None, "hqq": ct_solver.quantize_hqq}
    old_version = None
    if args.old:
        spec = importlib.util.spec_from_file_location("ct_solver_old", args.old)
        old = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = old  # its dataclasses look their module up there
        spec.loader.exec_module(old)
        solvers["hqq-old"] = old.quantize_hqq
        old_version = old.solver_settings().get("version", 1)
    gguf = smollm2_gguf()
    with open_source(gguf) as source, tempfile.TemporaryDirectory(prefix="qconv-diagnose-") as support:
        model = reference_model(source, torch.device("cpu"), torch.bfloat16)
        source.write_support_files(Path(support))
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(support)
    ids = tokenize_text(tokenizer, default_text())
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    names = linears[:: args.every]
    xtx = layer_inputs_xtx(model, ids, names)
    modules = dict(model.named_modules())
    result = {
        "what": "compressed-tensors solvers under SmolLM2's activations (bench/diagnose_ct_solver.py)",
        "source": gguf.name,
        "activations": f"wikitext-2 test windows {list(WINDOWS)} of {DEFAULT_SEQLEN} tokens (after the 8 eval scores)",
        "group_size": GROUP_SIZE,
        "solver_version": ct_solver.solver_settings()["version"],
        "old_solver_version": old_version,
        "environment": environment("cpu", ("transformers",)),
        "schemes": {},
    }
    for scheme_name in args.schemes.split(","):
        scheme = ct_layout.SCHEMES[scheme_name]
        layers = {}
        for name in names:
            weight = modules[name].weight.detach().to(torch.bfloat16)
            row = {}
            for solver, solve in solvers.items():
                if solve is None:
                    quantized = ct_layout.quantize_rtn(weight, scheme, GROUP_SIZE)
                else:
                    quantized = solve(weight, scheme, GROUP_SIZE).quantized
                row[solver] = measures(weight, quantized, xtx[name])
            layers[name] = row
            print(scheme_name, name, {k: round(v["output_gain"], 4) for k, v in row.items()}, file=sys.stderr)
        summary = {}
        for solver in solvers:
            rows = [layer[solver] for layer in layers.values()]
            ratios = [
                layer[solver]["activation_error"] / layer["rtn"]["activation_error"]
                for layer in layers.values()
            ]
            weight_ratios = [
                layer[solver]["rel_error"] / layer["rtn"]["rel_error"] for layer in layers.values()
            ]
            summary[solver] = {
                "mean_output_gain": sum(r["output_gain"] for r in rows) / len(rows),
                "mean_weighted_rel_error": sum(r["weighted_rel_error"] for r in rows) / len(rows),
                "mean_largest_weight_rel_error": sum(r["largest_weight_rel_error"] for r in rows) / len(rows),
                "mean_largest_weight_signed_error": sum(r["largest_weight_signed_error"] for r in rows)
                / len(rows),
                "mean_activation_error_ratio": sum(ratios) / len(ratios),
                "worst_activation_error_ratio": max(ratios),
                "mean_rel_error_ratio": sum(weight_ratios) / len(weight_ratios),
            }
        result["schemes"][scheme_name] = {"layers": layers, "summary": summary}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v["summary"] for k, v in result["schemes"].items()}, indent=1))


if __name__ == "__main__":
    main()
