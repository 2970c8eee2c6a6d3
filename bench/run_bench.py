"""`make bench`: conversion benchmarks on the GPU machine; raw JSON under bench/results/.

Issue 3, item 9: end-to-end nf4 (+double quant) conversion, verification included, of a
synthetic Llama-3-8B-shaped bf16 checkpoint (sharded safetensors written on this machine's
disk), against (a) the time to merely read every source tensor to the GPU and write the
artifact's bytes, and (b) transformers' own path (quantize at load time, then save_pretrained),
all in the same run, each with a cold page cache (``echo 3 > /proc/sys/vm/drop_caches``), each
in its own process so that its peak host RSS is its own. Every timed step ends with ``os.sync()``
so that "written" means on disk for all three alike.

Also: the real SmolLM2-135M gguf converted on the GPU, its packed bytes compared layer by layer
with bitsandbytes' functions on the same GPU, and the stock-loader logits check.

Part ``load`` (issue 8): on the same synthetic source, a qconv nf4 + double quant artifact and a
qconv int8 artifact (``qconv.pipeline.convert`` on the GPU; the ``convert`` part's nf4 artifact is
reused when both parts run), then, each in a fresh process after dropping the page cache,
stock ``AutoModelForCausalLM.from_pretrained(artifact, device_map="cuda:0")`` against
load-time quantization of the bf16 source with ``BitsAndBytesConfig`` (nf4 + double quant, bf16
compute; ``load_in_8bit``): seconds until the model is on the GPU, bytes read (/proc/self/io and
the system's pgpgin), peak host RSS and GPU memory, bytes on disk, and a forward pass on a few
tokens (finite logits). Both paths are I/O-bound, so the bytes read matter as much as the time.

Usage (on the GPU machine, PYTHONPATH holding qconv and the missing packages):
    python bench/run_bench.py --out bench/results [--parts convert,load] [--workdir /tmp/qbench]
        [--gguf /tmp/m/smol.gguf] [--layers N]
    python bench/run_bench.py --out /tmp/out --quick     # CPU smoke test: tiny Llama, both parts
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

# Llama-3-8B (meta-llama/Meta-Llama-3-8B config.json): the shapes, not the weights.
LLAMA3_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
# --quick: a Llama of the same kind small enough for a CPU smoke test (its numbers mean nothing).
TINY = dict(
    vocab_size=4096,
    hidden_size=512,
    intermediate_size=1792,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
)
# the load part's two schemes: qconv's options, and transformers' load-time equivalent
SCHEMES = {
    "nf4": {"bits": 4, "quant_type": "nf4", "double_quant": True},
    "int8": {"bits": 8},
}


def drop_caches() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())


def io_counters() -> dict:
    """This process's I/O counters (/proc/self/io: read_bytes = what it made the block layer
    fetch, rchar = what its read calls returned; neither counts page faults on a memory map
    the same way on every kernel) and the system-wide pgpgin (/proc/vmstat, KiB paged in)."""
    counters = {}
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            key, _, value = line.partition(":")
            counters[key.strip()] = int(value)
    except OSError:
        pass
    try:
        for line in Path("/proc/vmstat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "pgpgin":
                counters["pgpgin_bytes"] = int(value) * 1024
    except OSError:
        pass
    return counters


def io_delta(before: dict, after: dict) -> dict:
    delta = {
        "read_bytes": after.get("read_bytes", 0) - before.get("read_bytes", 0),
        "rchar": after.get("rchar", 0) - before.get("rchar", 0),
        "system_pgpgin_bytes": after.get("pgpgin_bytes", 0) - before.get("pgpgin_bytes", 0),
    }
    # The one to quote: the process's own count where the kernel keeps it, else the system's.
    for key in ("read_bytes", "system_pgpgin_bytes", "rchar"):
        if delta[key] > 0:
            delta["bytes_read"], delta["bytes_read_counter"] = delta[key], key
            break
    return delta


def make_synthetic_source(folder: Path, layers: int | None, device: str = "cuda", tiny: bool = False) -> dict:
    """Random bf16 weights with the 8B shapes, saved by transformers in 5 GB shards."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shapes = {**LLAMA3_8B, **(TINY if tiny else {})}
    config = LlamaConfig(**{**shapes, **({"num_hidden_layers": layers} if layers else {})})
    t0 = time.perf_counter()
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)  # random init on the GPU
    model.save_pretrained(folder, max_shard_size="5GB")
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    return {
        "seconds_to_make": time.perf_counter() - t0,
        "bytes": size,
        "layers": config.num_hidden_layers,
        "shapes": "tiny (--quick)" if tiny else "Llama-3-8B",
    }


# -- the measured cases, each run as `python run_bench.py --case NAME ...` in its own process --
def case_read_write(src: str, out: str, artifact_bytes: str, device: str = "cuda") -> dict:
    """Read every source tensor to the GPU (safetensors, as transformers reads), then write
    `artifact_bytes` bytes to disk in 64 MB writes."""
    from safetensors import safe_open

    src, out, artifact_bytes = Path(src), Path(out), int(artifact_bytes)
    t0 = time.perf_counter()
    total = 0
    for path in sorted(src.glob("*.safetensors")):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                total += f.get_tensor(key).to(device).numel()
    sync(device)
    read_s = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    block = os.urandom(64 * 2**20)
    t1 = time.perf_counter()
    written = 0
    with open(out / "artifact.bin", "wb") as f:
        while written < artifact_bytes:
            n = min(len(block), artifact_bytes - written)
            f.write(block[:n])
            written += n
    os.sync()
    write_s = time.perf_counter() - t1
    return {
        "read_s": read_s,
        "write_s": write_s,
        "read_plus_write_s": read_s + write_s,
        "params_read": total,
        "bytes_written": written,
    }


def case_read_qconv(src: str, device: str = "cuda") -> dict:
    """qconv's own source reader alone, to the GPU (no quantizing, no writing)."""
    from qconv.sources import open_source

    t0 = time.perf_counter()
    with open_source(src) as source:
        for info in source.tensors():
            source.read(info.name).to(device)
    sync(device)
    return {"read_s": time.perf_counter() - t0}


def case_hash_source(src: str) -> dict:
    """sha256 of every source shard, one thread a file (what convert does alongside reading)."""
    from concurrent.futures import ThreadPoolExecutor

    from qconv.files import sha256_file

    files = sorted(Path(src).glob("*.safetensors"))
    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(files)) as pool:
        list(pool.map(sha256_file, files))
    return {"hash_s": time.perf_counter() - t0, "files": len(files)}


def case_transformers(src: str, out: str, device: str = "cuda") -> dict:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        src,
        quantization_config=config,
        device_map="cuda:0" if device == "cuda" else device,
        dtype=torch.bfloat16,
    )
    sync(device)
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    model.save_pretrained(str(out))
    os.sync()
    save_s = time.perf_counter() - t1
    size = sum(p.stat().st_size for p in Path(out).glob("*.safetensors"))
    return {
        "load_quantize_s": load_s,
        "save_s": save_s,
        "total_s": load_s + save_s,
        "bytes_written": size,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if device.startswith("cuda") else None,
    }


def case_qconv(src: str, out: str, scheme: str = "nf4", device: str = "cuda") -> dict:
    from qconv.pipeline import convert

    t0 = time.perf_counter()
    result = convert(src, out, "bnb", dict(SCHEMES[scheme]), device=device, force=True)
    os.sync()
    total = time.perf_counter() - t0
    return {
        "total_s": total,
        **{f"qconv_{k}": v for k, v in result.stats.items()},
        "bytes_written": sum(f["size"] for f in result.manifest["files"].values()),
        "verify_passed": result.report.passed if result.report else None,
        "verify_checks": [c["name"] for c in result.report.checks] if result.report else [],
        "worst_rel_error": result.manifest["summary"]["worst_rel_error"],
        "bits_per_weight": result.manifest["summary"]["bits_per_weight"],
    }


def case_smollm2_gpu(gguf: str, out: str) -> dict:
    """The real model on the GPU: bytes equal bitsandbytes' on the same device, loader check."""
    import bitsandbytes.functional as F
    import torch
    from safetensors.torch import load_file

    from qconv.pipeline import convert
    from qconv.sources import open_source

    result = convert(gguf, out, "bnb", {"bits": 4}, device="cuda", force=True, logits=True)
    stored = {}
    for path in Path(out).glob("*.safetensors"):
        stored.update(load_file(str(path)))
    mismatched = []
    with open_source(gguf) as source:
        for module in result.manifest["layers"]:
            weight = source.read(f"{module}.weight").to("cuda", torch.bfloat16)
            packed, state = F.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
            expected = {"weight": packed, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
            for key, value in expected.items():
                if not torch.equal(stored[f"{module}.{key}"], value.cpu()):
                    mismatched.append(f"{module}.{key}")
    return {
        "layers": len(result.manifest["layers"]),
        "bytes_equal_bitsandbytes_gpu": not mismatched,
        "mismatched": mismatched[:10],
        "verify": result.report.to_dict()["checks"],
        "logits": result.report.logits,
        "total_s": result.stats["total_s"],
    }


def bnb_load_config(scheme: str):
    """transformers' load-time equivalent of SCHEMES[scheme] (bf16 compute, as the source)."""
    import torch
    from transformers import BitsAndBytesConfig

    if scheme == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def case_load(folder: str, how: str, scheme: str, device: str = "cuda") -> dict:
    """Load ``folder`` to the device with stock transformers: ``prequantized`` = a quantized
    artifact as it is on disk; ``load_quantize`` = a bf16 folder quantized while loading. Time
    until every weight is on the device (synchronised), then a forward pass on a few tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    extra = {"quantization_config": bnb_load_config(scheme)} if how == "load_quantize" else {}
    device_map = "cuda:0" if device.startswith("cuda") else device
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    before = io_counters()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, device_map=device_map, dtype=torch.bfloat16, **extra)
    sync(device)
    load_s = time.perf_counter() - t0
    io = io_delta(before, io_counters())
    peak_gpu = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    kinds: dict[str, int] = {}
    for module in model.modules():
        if type(module).__name__ in ("Linear4bit", "Linear8bitLt", "Linear"):
            kinds[type(module).__name__] = kinds.get(type(module).__name__, 0) + 1
    with torch.inference_mode():
        ids = torch.arange(1, 9, device=model.device).unsqueeze(0)  # 8 tokens, any ids will do
        logits = model(input_ids=ids).logits
        sync(device)
    return {
        "how": how,
        "scheme": scheme,
        "load_s": load_s,
        **io,
        "folder_bytes": folder_bytes(Path(folder)),
        "peak_gpu_bytes_load": peak_gpu,
        "linear_modules": kinds,
        "logits_finite": bool(torch.isfinite(logits).all()),
    }


CASES = {
    "read_write": case_read_write,
    "read_qconv": case_read_qconv,
    "hash_source": case_hash_source,
    "transformers": case_transformers,
    "qconv": case_qconv,
    "smollm2_gpu": case_smollm2_gpu,
    "load": case_load,
}


def run_case(name: str, *args: str, device: str = "cuda", script: str = __file__) -> dict:
    """Run one case of ``script`` (``--case NAME``) in a fresh process after dropping the page
    cache; its result is the JSON on the last line of its stdout. An error is recorded, not raised."""
    cold = drop_caches()
    command = [sys.executable, script, "--case", name, "--device", device, *map(str, args)]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"case {name} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
        return {"error": proc.stderr[-3000:], "cold_cache": cold}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["cold_cache"] = cold
    return result


def case_process(cases: dict, name: str, args: list[str], device: str) -> None:
    """The child side of ``run_case``: imports and CUDA start-up are paid before any clock
    starts, alike for every case (the page cache is cold, so importing transformers alone takes
    seconds); prints the case's result, with this process's peak RSS and GPU memory, as JSON."""
    import bitsandbytes  # noqa: F401
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    import qconv.pipeline  # noqa: F401
    from qconv.environment import peak_rss_bytes

    torch.zeros(1, device=device)
    function = cases[name]
    if "device" in inspect.signature(function).parameters:  # the cases that can run off the GPU
        result = function(*args, device=device)
    else:
        result = function(*args)
    result["peak_rss_bytes"] = peak_rss_bytes()
    if device.startswith("cuda"):
        result.setdefault("peak_gpu_bytes", torch.cuda.max_memory_allocated())
    print(json.dumps(result, default=str))


def environment(device: str, packages: tuple[str, ...]) -> dict:
    """Python, torch and ``packages``' versions (None where one is not installed), and the GPU
    with its compute capability when ``device`` is CUDA: recorded in every bench JSON."""
    import importlib.metadata as md

    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in packages:
        try:
            env[dist] = md.version(dist)
        except md.PackageNotFoundError:
            env[dist] = None
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(0)
        major, minor = torch.cuda.get_device_capability(0)
        env["capability"] = f"sm{major}{minor}"
    return env


def gpu_slug(device: str) -> str:
    """The device in file names: ``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``; cpu."""
    if not device.startswith("cuda"):
        return "cpu"
    import torch

    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")


def write_json(path: Path, report: dict, indent: int = 2) -> None:
    """Write ``report`` to ``path`` whole or not at all (a run cut off while saving leaves the last
    complete JSON): a temporary file beside it, then renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=indent, default=str) + "\n")
    os.replace(tmp, path)


def part_convert(report: dict, src: Path, work: Path, device: str, gguf: str | None, path: Path) -> None:
    """Issue 3's end-to-end nf4 conversion against read+write and transformers (see the top)."""
    report["qconv"] = run_case("qconv", src, work / "qconv-nf4", "nf4", device=device)
    artifact_bytes = report["qconv"].get("bytes_written", 4 * 10**9)
    report["read_write"] = run_case("read_write", src, work / "rw", artifact_bytes, device=device)
    shutil.rmtree(work / "rw", ignore_errors=True)  # only its time matters; free the disk
    report["read_qconv"] = run_case("read_qconv", src, device=device)
    report["hash_source"] = run_case("hash_source", src, device=device)
    report["transformers"] = run_case("transformers", src, work / "hf-nf4", device=device)
    shutil.rmtree(work / "hf-nf4", ignore_errors=True)
    report["qconv_again"] = run_case("qconv", src, work / "qconv-nf4", "nf4", device=device)
    baseline = report["read_write"].get("read_plus_write_s")
    runs = [r["total_s"] for r in (report["qconv"], report["qconv_again"]) if "total_s" in r]
    best = min(runs) if runs else None
    if baseline and best:
        report["ratios"] = {
            "qconv_over_read_plus_write": best / baseline,
            "qconv_over_transformers": best / report["transformers"]["total_s"]
            if "total_s" in report["transformers"]
            else None,
            "goal": "qconv_over_read_plus_write <= 1.1",
        }
    if gguf:
        report["smollm2_gpu"] = run_case("smollm2_gpu", gguf, work / "smol-nf4", device=device)
    write_json(path, report)


def part_load(report: dict, src: Path, work: Path, device: str, reuse_nf4: bool, path: Path) -> None:
    """Issue 8's load times: a pre-quantized artifact against quantizing at load time."""
    device_map = "cuda:0" if device.startswith("cuda") else device
    report["call"] = (
        f'AutoModelForCausalLM.from_pretrained(folder, device_map="{device_map}", dtype=torch.bfloat16'
        "[, quantization_config=BitsAndBytesConfig(...)])"
    )
    schemes = report.setdefault("schemes", {})
    for scheme in SCHEMES:
        entry = schemes.setdefault(scheme, {})
        artifact = work / f"qconv-{scheme}"
        if scheme == "nf4" and reuse_nf4 and (artifact / "qconv.json").is_file():
            entry["artifact"] = "made by the convert part of this run"
        else:
            entry["convert"] = run_case("qconv", src, artifact, scheme, device=device)
        entry["prequantized"] = run_case("load", artifact, "prequantized", scheme, device=device)
        write_json(path, report)
        entry["load_quantize"] = run_case("load", src, "load_quantize", scheme, device=device)
        pre, at_load = entry["prequantized"].get("load_s"), entry["load_quantize"].get("load_s")
        if pre and at_load:
            entry["load_quantize_over_prequantized"] = at_load / pre
        write_json(path, report)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--workdir", default="/tmp/qbench")
    parser.add_argument("--parts", default="convert,load", help="comma-separated: convert, load")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers for a quick try")
    parser.add_argument("--gguf", default=None, help="the SmolLM2 gguf, for the GPU byte check")
    parser.add_argument("--quick", action="store_true", help="CPU smoke test on a tiny Llama")
    parser.add_argument("--case", default=None)
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --quick)")
    parser.add_argument("args", nargs="*")
    ns = parser.parse_args()
    device = ns.device or ("cpu" if ns.quick else "cuda")
    if ns.case:
        case_process(CASES, ns.case, ns.args, device)
        return

    import torch

    parts = [p for p in ns.parts.split(",") if p]
    unknown = sorted(set(parts) - {"convert", "load"})
    if unknown:
        parser.error(f"--parts: unknown {', '.join(unknown)} (choose from convert, load)")
    work = Path(ns.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    src = work / "llama3-8b-shaped"
    machine = {
        "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
    }
    source = make_synthetic_source(src, ns.layers, device, tiny=ns.quick)
    out = Path(ns.out)
    suffix = ("" if ns.layers is None else f"_{ns.layers}layers") + "_" + gpu_slug(device)
    suffix += "_quick" if ns.quick else ""
    if "convert" in parts:
        report: dict = {"machine": machine, "source": source}
        part_convert(report, src, work, device, ns.gguf, out / f"convert_nf4_8b{suffix}.json")
        print(json.dumps(report, indent=2, default=str))
    if "load" in parts:
        report = {"machine": machine, "source": source}
        part_load(report, src, work, device, "convert" in parts, out / f"load_8b{suffix}.json")
        print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
