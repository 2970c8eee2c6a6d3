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

Usage (on the GPU machine, PYTHONPATH holding qconv and the missing packages):
    python bench/run_bench.py --out bench/results [--workdir /tmp/qbench] [--gguf /tmp/m/smol.gguf]
"""

from __future__ import annotations

import argparse
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


def drop_caches() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def make_synthetic_source(folder: Path, layers: int | None) -> dict:
    """Random bf16 weights with the 8B shapes, saved by transformers in 5 GB shards."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**LLAMA3_8B, **({"num_hidden_layers": layers} if layers else {})})
    t0 = time.perf_counter()
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)  # random init on the GPU
    model.save_pretrained(folder, max_shard_size="5GB")
    del model
    torch.cuda.empty_cache()
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    return {"seconds_to_make": time.perf_counter() - t0, "bytes": size, "layers": config.num_hidden_layers}


# -- the measured cases, each run as `python run_bench.py --case NAME ...` in its own process --
def case_read_write(src: Path, out: Path, artifact_bytes: int) -> dict:
    """Read every source tensor to the GPU (safetensors, as transformers reads), then write
    `artifact_bytes` bytes to disk in 64 MB writes."""
    import torch
    from safetensors import safe_open

    t0 = time.perf_counter()
    total = 0
    for path in sorted(src.glob("*.safetensors")):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                total += f.get_tensor(key).to("cuda").numel()
    torch.cuda.synchronize()
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


def case_read_qconv(src: Path) -> dict:
    """qconv's own source reader alone, to the GPU (no quantizing, no writing)."""
    import torch

    from qconv.sources import open_source

    t0 = time.perf_counter()
    with open_source(str(src)) as source:
        for info in source.tensors():
            source.read(info.name).to("cuda")
    torch.cuda.synchronize()
    return {"read_s": time.perf_counter() - t0}


def case_hash_source(src: Path) -> dict:
    """sha256 of every source shard, one thread a file (what convert does alongside reading)."""
    from concurrent.futures import ThreadPoolExecutor

    from qconv.writer import sha256_file

    files = sorted(src.glob("*.safetensors"))
    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(files)) as pool:
        list(pool.map(sha256_file, files))
    return {"hash_s": time.perf_counter() - t0, "files": len(files)}


def case_transformers(src: Path, out: Path) -> dict:
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
        str(src), quantization_config=config, device_map="cuda:0", dtype=torch.bfloat16
    )
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    model.save_pretrained(str(out))
    os.sync()
    save_s = time.perf_counter() - t1
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return {
        "load_quantize_s": load_s,
        "save_s": save_s,
        "total_s": load_s + save_s,
        "bytes_written": size,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(),
    }


def case_qconv(src: Path, out: Path) -> dict:
    from qconv.pipeline import convert

    t0 = time.perf_counter()
    result = convert(
        str(src),
        out,
        "bnb",
        {"bits": 4, "quant_type": "nf4", "double_quant": True},
        device="cuda",
        force=True,
    )
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


def case_smollm2_gpu(gguf: Path, out: Path) -> dict:
    """The real model on the GPU: bytes equal bitsandbytes' on the same device, loader check."""
    import bitsandbytes.functional as F
    import torch
    from safetensors.torch import load_file

    from qconv.pipeline import convert
    from qconv.sources import open_source

    result = convert(str(gguf), out, "bnb", {"bits": 4}, device="cuda", force=True, logits=True)
    stored = {}
    for path in out.glob("*.safetensors"):
        stored.update(load_file(str(path)))
    mismatched = []
    with open_source(str(gguf)) as source:
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


CASES = {
    "read_write": case_read_write,
    "read_qconv": case_read_qconv,
    "hash_source": case_hash_source,
    "transformers": case_transformers,
    "qconv": case_qconv,
    "smollm2_gpu": case_smollm2_gpu,
}


def run_case(name: str, *args: str) -> dict:
    """Run one case in a fresh process after dropping the page cache; add its peak RSS."""
    cold = drop_caches()
    proc = subprocess.run([sys.executable, __file__, "--case", name, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"case {name} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
        return {"error": proc.stderr[-3000:], "cold_cache": cold}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["cold_cache"] = cold
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--workdir", default="/tmp/qbench")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers for a quick try")
    parser.add_argument("--gguf", default=None, help="the SmolLM2 gguf, for the GPU byte check")
    parser.add_argument("--case", default=None)
    parser.add_argument("args", nargs="*")
    ns = parser.parse_args()
    if ns.case:
        # Imports and CUDA start-up are paid before any clock starts, alike for every case (the
        # page cache is cold, so importing transformers alone takes seconds).
        import bitsandbytes  # noqa: F401
        import torch
        import transformers.models.llama.modeling_llama  # noqa: F401

        import qconv.pipeline  # noqa: F401

        torch.zeros(1, device="cuda")
        result = CASES[ns.case](*[Path(a) if not a.isdigit() else int(a) for a in ns.args])
        from qconv.environment import peak_rss_bytes

        result["peak_rss_bytes"] = peak_rss_bytes()
        if torch.cuda.is_available():
            result.setdefault("peak_gpu_bytes", torch.cuda.max_memory_allocated())
        print(json.dumps(result, default=str))
        return

    import torch

    work = Path(ns.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    src = work / "llama3-8b-shaped"
    report: dict = {
        "machine": {
            "gpu": torch.cuda.get_device_name(0),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
        },
        "source": make_synthetic_source(src, ns.layers),
    }
    report["qconv"] = run_case("qconv", str(src), str(work / "qconv-nf4"))
    artifact_bytes = report["qconv"].get("bytes_written", 4 * 10**9)
    report["read_write"] = run_case("read_write", str(src), str(work / "rw"), str(artifact_bytes))
    report["read_qconv"] = run_case("read_qconv", str(src))
    report["hash_source"] = run_case("hash_source", str(src))
    report["transformers"] = run_case("transformers", str(src), str(work / "hf-nf4"))
    report["qconv_again"] = run_case("qconv", str(src), str(work / "qconv-nf4"))
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
    if ns.gguf:
        report["smollm2_gpu"] = run_case("smollm2_gpu", ns.gguf, str(work / "smol-nf4"))
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")
    name = f"convert_nf4_8b{'' if ns.layers is None else f'_{ns.layers}layers'}_{gpu}.json"
    (out / name).write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
