"""compressed-tensors quantizers on Llama-3-8B-shaped matrices: qconv's ``quantize`` of the
compressed-tensors method (the call the converter makes per weight, packing included) for each
scheme and solver, on the device given.

    python bench/run_ct_quantizer.py --out bench/results --device cuda   # the GPU machine
    python bench/run_ct_quantizer.py --out /tmp/out --device cpu --quick  # a smoke test

Throughput = source bytes (bf16, as an 8B checkpoint stores them) / median time after a warm-up,
the weight already on the device, synchronized. ``rtn`` is llm-compressor's round to nearest
reproduced byte for byte (tests/test_format_compressed_tensors.py), so its row is the reference's
numbers; llm-compressor itself is not installed on the GPU machine, so its own speed is not
measured here. Relative error: Frobenius, of the stored numbers dequantized by qconv's pure-torch
inverse, on the first matrix.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

# Llama-3-8B's Linear shapes (meta-llama/Meta-Llama-3-8B config.json): q/o, k/v, gate/up, down
SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]
QUICK_SHAPES = [(256, 1024)]
CASES = [
    "W4A16:rtn",
    "W4A16:hqq",
    "W4A16_ASYM:rtn",
    "W4A16_ASYM:hqq",
    "W8A16:rtn",
    "W8A8:rtn",
    "FP8_DYNAMIC:rtn",
]


def _timed(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--cases", default=",".join(CASES), help="SCHEME:SOLVER,...")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one small matrix (a smoke test)")
    ns = parser.parse_args()

    from qconv.formats import get_format

    fmt = get_format("compressed-tensors")
    device = torch.device(ns.device)
    shapes = QUICK_SHAPES if ns.quick else SHAPES
    generator = torch.Generator().manual_seed(0)
    matrices = [(torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16) for shape in shapes]
    source_bytes = sum(m.numel() * 2 for m in matrices)
    weights = [m.to(device) for m in matrices]
    results = {}
    for case in ns.cases.split(","):
        scheme, solver = case.split(":")
        recipe = fmt.make_recipe({"scheme": scheme, "solver": solver})
        seconds = sum(
            _timed(lambda w=w, r=recipe: fmt.quantize(w, r, device), ns.repeats, device) for w in weights
        )
        first = weights[0]
        restored = fmt.dequantize(fmt.quantize(first, recipe, device), recipe)
        reference = first.to(torch.float32)
        rel_error = float(
            torch.linalg.norm(restored.to(reference.device) - reference) / torch.linalg.norm(reference)
        )
        results[case] = {
            "seconds": seconds,
            "gb_per_s": source_bytes / seconds / 1e9,
            "rel_error_first_matrix": rel_error,
        }
        print(case, json.dumps(results[case]), flush=True)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    doc = {
        "what": "compressed-tensors quantize (qconv's method call, packing included) on Llama-3-8B-shaped "
        "matrices (random normal std 0.02, bf16 source)",
        "shapes": shapes,
        "source_bytes": source_bytes,
        "device": str(device),
        "gpu": gpu,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "repeats": ns.repeats,
        "timing": "median of repeats after a warm-up, synchronized, summed over the shapes",
        "reference": "rtn is llm-compressor's round to nearest, byte-identical; llm-compressor's own speed not measured",
        "results": results,
    }
    slug = (gpu or "cpu").lower().replace(" ", "-")
    ns.out.mkdir(parents=True, exist_ok=True)
    path = ns.out / f"ct_quantizer_{'quick_' if ns.quick else ''}{slug}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
