"""AQLM increment check on the GPU:

    source bench/gpu_env.sh && python bench/aqlm_search_check.py --out DIR

The fused nearest-codeword search equals a float64 brute force on exact (integer) data, ties
included; its time against the chunked torch search on a SmolLM2-sized 1x16 problem (110,592
groups x 65,536 codewords); and the data-free quantizer on one 1536x576 layer. Writes
aqlm_search.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from qconv.formats import format_aqlm, get_format
from qconv.formats.aqlm_triton import nearest_codewords_fused
from qconv.formats.format_aqlm import quantize_weight


def best_time(fn, repeats: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    result: dict = {"gpu": torch.cuda.get_device_name(0)}

    exact = []
    for n, k, d in [(300, 256, 8), (50, 1000, 8), (129, 4096, 4), (70, 65536, 8)]:
        x = torch.randint(-8, 9, (n, d)).float()
        c = torch.randint(-8, 9, (k, d)).float()
        c[7] = c[3]
        x[0] = c[3]
        brute = torch.cdist(x.double(), c.double()).argmin(1)
        exact.append(bool(torch.equal(nearest_codewords_fused(x.cuda(), c.cuda()).cpu(), brute)))
    result["fused_equals_brute_force"] = all(exact)

    x = torch.randn(110592, 8, device="cuda")
    c = torch.randn(65536, 8, device="cuda")
    fused = nearest_codewords_fused(x, c)
    format_aqlm.triton_available = lambda: False  # the chunked torch search
    result["search_agree"] = (fused == format_aqlm.nearest_codewords(x, c)).float().mean().item()
    result["search_chunked_s"] = best_time(lambda: format_aqlm.nearest_codewords(x, c))
    format_aqlm.triton_available = lambda: True
    result["search_fused_s"] = best_time(lambda: nearest_codewords_fused(x, c))

    aqlm = get_format("aqlm")
    w = torch.randn(1536, 576, device="cuda") * 0.02
    for scheme in ("1x16", "2x8"):
        recipe = {**aqlm.make_recipe({"scheme": scheme}), "dtype": "bfloat16"}
        start = time.perf_counter()
        packed = quantize_weight(w, recipe)
        torch.cuda.synchronize()
        result[f"{scheme}_layer_s"] = time.perf_counter() - start
        deq = aqlm.dequantize(packed, recipe)
        result[f"{scheme}_rel_error"] = (
            torch.linalg.vector_norm(deq - w) / torch.linalg.vector_norm(w)
        ).item()
    print(json.dumps(result))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "aqlm_search.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
