"""GGUF block quantizers on Llama-3-8B-shaped matrices: qconv's two solvers per GGML type, and on
a machine with llama-cpp-python, llama.cpp's own ``ggml_quantize_chunk`` on the same matrices
(the function ``llama_model_quantize`` calls per tensor; one thread here, as ggml quantizes one
tensor per thread).

    python bench/run_gguf_quantizer.py --out bench/results --device cuda   # the GPU machine
    python bench/run_gguf_quantizer.py --out bench/results --device cpu    # here, with llama.cpp

Throughput = source bytes (bf16, as an 8B checkpoint stores them) / median time after a warm-up;
qconv's time is the quantizer call on float32 rows already on the device, synchronized.
Relative error: Frobenius, of the stored bytes dequantized by the ``gguf`` package.

On the CPU, ``--threads 1,2`` times qconv's quantizers at each torch thread count, and
``--baseline REV`` also times the quantizers as they were at git revision REV (its
formats/gguf_quants.py and formats/gguf_kquants.py, loaded from ``git show``) and checks that they
write the same bytes as today's: a before/after on the same machine, interleaved, with each
case's CPU seconds and the load averages recorded (the machine may be shared). For example:

    python bench/run_gguf_quantizer.py --device cpu --shapes 576x1536,1024x4096 \
        --threads 1,2 --baseline 0d1e7ca --repeats 1
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
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


def _timed(fn, repeats: int, device: torch.device, warm=None) -> float:
    return _timed_cpu(fn, repeats, device, warm)[0]


def _timed_cpu(fn, repeats: int, device: torch.device, warm=None) -> tuple[float, float]:
    """(median wall seconds, median process CPU seconds) of ``fn`` after a warm-up (``warm``, a
    smaller call, where the whole call would take long)."""
    (warm or fn)()  # warm-up (kernels compiled, caches filled)
    times, cpu = [], []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(times), statistics.median(cpu)


def _baseline_quantizers(rev: str) -> dict:
    """QUANTIZERS of formats/gguf_quants.py and formats/gguf_kquants.py as they were at git
    revision ``rev``, imported from ``git show`` under private module names."""
    root = Path(__file__).resolve().parent.parent
    folder = Path(tempfile.mkdtemp(prefix="gguf-baseline-"))
    table = {}
    for stem in ("gguf_quants", "gguf_kquants"):
        text = subprocess.run(
            ["git", "show", f"{rev}:formats/{stem}.py"], cwd=root, check=True, capture_output=True, text=True
        ).stdout
        name = f"_baseline_{stem}"
        path = folder / f"{name}.py"
        path.write_text(text)
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        table.update(module.QUANTIZERS)
    return table


def _rel_error(rows: np.ndarray, data: np.ndarray, type_name: str) -> float:
    import gguf

    restored = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[type_name]).reshape(rows.shape)
    return float(np.linalg.norm(restored - rows) / np.linalg.norm(rows))


def _shape(text: str) -> tuple[int, int]:
    rows, cols = text.lower().split("x")
    return int(rows), int(cols)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--types", default=",".join(TYPES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one small matrix (a smoke test)")
    parser.add_argument("--shapes", default=None, help="ROWSxCOLS,... in place of Llama-3-8B's four")
    parser.add_argument(
        "--threads", default=None, help="CPU: torch thread counts to time qconv's quantizers at, e.g. 1,2"
    )
    parser.add_argument("--baseline", default=None, help="also time the quantizers of this git revision")
    parser.add_argument("--name", default=None, help="output file name (default gguf_quantizer_<device>)")
    ns = parser.parse_args()

    import gguf

    from qconv.formats.format_gguf import QUANTIZERS

    device = torch.device(ns.device)
    shapes = [_shape(t) for t in ns.shapes.split(",")] if ns.shapes else QUICK_SHAPES if ns.quick else SHAPES
    generator = torch.Generator().manual_seed(0)
    matrices = [(torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16) for shape in shapes]
    source_bytes = sum(m.numel() * 2 for m in matrices)
    ggml = _ggml() if device.type == "cpu" else None
    thread_counts = [int(t) for t in ns.threads.split(",")] if ns.threads else None
    if device.type == "cpu" and thread_counts is None:
        thread_counts = [1]  # as ggml's one thread per tensor
    baseline = _baseline_quantizers(ns.baseline) if ns.baseline else None
    tables = {"": QUANTIZERS, **({"_before": baseline} if baseline else {})}
    results = {}
    for type_name in ns.types.split(","):
        qtype = gguf.GGMLQuantizationType[type_name]
        entry: dict = {"loadavg_before": list(os.getloadavg())}
        rows = [m.to(device=device, dtype=torch.float32) for m in matrices]
        first = rows[0]
        warm_rows = first[:16]
        for index, threads in enumerate(thread_counts or [None]):
            if threads is not None:
                torch.set_num_threads(threads)
            timings: dict = {}
            for solver in ("llama", "qconv"):
                for suffix, table in tables.items():
                    quantize = table[type_name]
                    wall = cpu = 0.0
                    for r in rows:
                        w, c = _timed_cpu(
                            lambda r=r, q=quantize, s=solver: q(r, s),
                            ns.repeats,
                            device,
                            warm=lambda q=quantize, s=solver, w=warm_rows: q(w, s),
                        )
                        wall, cpu = wall + w, cpu + c
                    timings[solver + suffix] = {
                        "seconds": wall,
                        "cpu_seconds": cpu,
                        "gb_per_s": source_bytes / wall / 1e9,
                    }
                if index == 0:
                    data = QUANTIZERS[type_name](first, solver).cpu().numpy()
                    # the error on the first matrix (numpy's dequantizer is slow on all four)
                    timings[solver]["rel_error_first_matrix"] = _rel_error(
                        first.cpu().numpy(), data, type_name
                    )
                    if baseline is not None:
                        before = baseline[type_name](first, solver).cpu().numpy()
                        timings[solver]["same_bytes_as_before_first_matrix"] = bool(
                            np.array_equal(before, data)
                        )
            if threads is None:
                entry.update(timings)
                continue
            if index == 0:
                entry.update(timings)  # the first thread count's numbers at the top, as without --threads
            entry.setdefault("by_threads", {})[str(threads)] = timings
        if ggml is not None:
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            arrays = [np.ascontiguousarray(m.float().numpy()) for m in matrices]

            def run_ggml(arrays=arrays, qtype=qtype, type_size=type_size, block=block):
                for a in arrays:
                    out = np.empty((a.shape[0], a.shape[1] // block * type_size), dtype=np.uint8)
                    ggml.ggml_quantize_chunk(int(qtype), a.ctypes.data, out.ctypes.data, 0, *a.shape, None)

            seconds, cpu = _timed_cpu(run_ggml, ns.repeats, device)
            entry["llama.cpp"] = {
                "seconds": seconds,
                "cpu_seconds": cpu,
                "gb_per_s": source_bytes / seconds / 1e9,
            }
        entry["loadavg_after"] = list(os.getloadavg())
        results[type_name] = entry
        print(type_name, json.dumps(entry), flush=True)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    doc = {
        "what": "GGUF block quantizers on Llama-3-8B-shaped matrices (random normal std 0.02, bf16 source)",
        "shapes": shapes,
        "source_bytes": source_bytes,
        "device": str(device),
        "gpu": gpu,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": thread_counts or torch.get_num_threads(),
        "repeats": ns.repeats,
        "timing": (
            "median of repeats after a warm-up, synchronized; seconds = wall, cpu_seconds = this process's "
            "CPU time (all its threads); llama.cpp: ggml_quantize_chunk, one thread"
        ),
        "command": " ".join(sys.argv),
        "qconv_commit": _commit(),
        "results": results,
    }
    if ns.baseline:
        doc["baseline"] = {
            "revision": ns.baseline,
            "what": "<solver>_before: formats/gguf_quants.py and gguf_kquants.py at this revision, same matrices",
        }
    if device.type == "cpu":
        doc["machine_note"] = (
            "a shared machine: other work ran meanwhile; each type's loadavg_before/after are the 1, 5 "
            "and 15-minute load averages (cores: see 'cores')"
        )
    slug = (gpu or "cpu").lower().replace(" ", "-")
    ns.out.mkdir(parents=True, exist_ok=True)
    name = ns.name or f"gguf_quantizer_{'quick_' if ns.quick else ''}{slug}"
    path = ns.out / f"{name}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {path}")


def _commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "formats"], cwd=root, capture_output=True, text=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


if __name__ == "__main__":
    main()
