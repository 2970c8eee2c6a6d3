"""GGUF block quantizers on Llama-3-8B-shaped matrices: qconv's two solvers per GGML type, and on
a machine with llama-cpp-python, llama.cpp's own ``ggml_quantize_chunk`` on the same matrices
(the function ``llama_model_quantize`` calls per tensor; one thread here, as ggml quantizes one
tensor per thread).

    python bench/run_gguf_quantizer.py --out bench/results --device cuda   # the GPU machine
    python bench/run_gguf_quantizer.py --out bench/results --device cpu    # here, with llama.cpp

Throughput = source bytes (bf16, as an 8B checkpoint stores them) / median time after a warm-up;
qconv's time is the quantizer call on float32 rows already on the device, synchronized.
Relative error: Frobenius, of the stored bytes dequantized by the ``gguf`` package.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

# Llama-3-8B's Linear shapes (meta-llama/Meta-Llama-3-8B config.json): q/o, k/v, gate/up, down
SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]
QUICK_SHAPES = [(256, 1024)]
TYPES = ["Q8_0", "Q4_0", "Q5_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K"]


def _ggml():
    """llama.cpp's ggml_quantize_chunk, or None without llama-cpp-python."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "lib"
    for name in sorted(folder.glob("libggml*.so*")):
        ctypes.CDLL(str(name), mode=ctypes.RTLD_GLOBAL)
    lib = ctypes.CDLL(str(sorted(folder.glob("libggml-base.so*"))[0]), mode=ctypes.RTLD_GLOBAL)
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 3
    lib.ggml_quantize_chunk.argtypes.append(ctypes.c_void_p)
    return lib


def _timed(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up (kernels compiled, caches filled)
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


def _rel_error(rows: np.ndarray, data: np.ndarray, type_name: str) -> float:
    import gguf

    restored = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[type_name]).reshape(rows.shape)
    return float(np.linalg.norm(restored - rows) / np.linalg.norm(rows))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--types", default=",".join(TYPES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one small matrix (a smoke test)")
    ns = parser.parse_args()

    import gguf

    from qconv.formats.format_gguf import QUANTIZERS

    device = torch.device(ns.device)
    shapes = QUICK_SHAPES if ns.quick else SHAPES
    generator = torch.Generator().manual_seed(0)
    matrices = [(torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16) for shape in shapes]
    source_bytes = sum(m.numel() * 2 for m in matrices)
    ggml = _ggml() if device.type == "cpu" else None
    if device.type == "cpu":
        torch.set_num_threads(1)  # as ggml's one thread per tensor
    results = {}
    for type_name in ns.types.split(","):
        qtype = gguf.GGMLQuantizationType[type_name]
        entry: dict = {}
        rows = [m.to(device=device, dtype=torch.float32) for m in matrices]
        for solver in ("llama", "qconv"):
            quantize = QUANTIZERS[type_name]
            seconds = sum(_timed(lambda r=r, q=quantize, s=solver: q(r, s), ns.repeats, device) for r in rows)
            # the error on the first matrix (numpy's dequantizer is slow on all four)
            first = rows[0]
            entry[solver] = {
                "seconds": seconds,
                "gb_per_s": source_bytes / seconds / 1e9,
                "rel_error_first_matrix": _rel_error(
                    first.cpu().numpy(), quantize(first, solver).cpu().numpy(), type_name
                ),
            }
        if ggml is not None:
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            arrays = [np.ascontiguousarray(m.float().numpy()) for m in matrices]

            def run_ggml(arrays=arrays, qtype=qtype, type_size=type_size, block=block):
                for a in arrays:
                    out = np.empty((a.shape[0], a.shape[1] // block * type_size), dtype=np.uint8)
                    ggml.ggml_quantize_chunk(int(qtype), a.ctypes.data, out.ctypes.data, 0, *a.shape, None)

            seconds = _timed(run_ggml, ns.repeats, device)
            entry["llama.cpp"] = {"seconds": seconds, "gb_per_s": source_bytes / seconds / 1e9}
        results[type_name] = entry
        print(type_name, json.dumps(entry), flush=True)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    gpu or f"cpu-{platform.machine()}"
    doc = {
        "what": "GGUF block quantizers on Llama-3-8B-shaped matrices (random normal std 0.02, bf16 source)",
        "shapes": shapes,
        "source_bytes": source_bytes,
        "device": str(device),
        "gpu": gpu,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "repeats": ns.repeats,
        "timing": "median of repeats after a warm-up, synchronized; llama.cpp: ggml_quantize_chunk, one thread",
        "results": results,
    }
    slug = (gpu or "cpu").lower().replace(" ", "-")
    ns.out.mkdir(parents=True, exist_ok=True)
    path = ns.out / f"gguf_quantizer_{'quick_' if ns.quick else ''}{slug}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
