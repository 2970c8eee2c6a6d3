"""HQQ benchmarks (issue 4), run on the GPU machine; raw JSON goes to --out.

  quantizer  qconv's solver vs hqq's own ``Quantizer.quantize(optimize=True)`` on
             Llama-3-8B-shaped bf16 matrices (4096x4096, 1024x4096, 14336x4096, 4096x14336),
             group 64, axis 1, bits 2/3/4/8, same run: throughput (source bytes / time, after a
             warm-up, with synchronisation, median of several) and reconstruction error at the
             precision each stores (hqq: its returned float16 scale/zero; qconv: float16).
  smollm2    wikitext-2 test perplexity (protocol: qconv/evaluate.py) of SmolLM2-135M-Instruct:
             bf16; qconv's hqq artifacts 8/4/3/2-bit (``qconv.pipeline.convert`` on the GPU, run by
             ``qconv.load_model``); hqq's own ``AutoHQQHFModel.quantize_model`` at the same bits.

    python bench/run_hqq.py --out DIR --part quantizer
    python bench/run_hqq.py --out DIR --part smollm2 --gguf /tmp/m/smol.gguf --text .dev/data/wikitext2-test.txt

``--quick`` shrinks everything for a CPU smoke test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_bench import environment  # noqa: E402

SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]
BITS = [2, 3, 4, 8]
GROUP = 64


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> list[float]:
    fn()  # warm-up: Triton compilation, allocator, hqq's first call
    sync(device)
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def matrices(shapes, device: str) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for shape in shapes:
        w = torch.randn(shape, generator=generator) * 0.02
        # heavier tails than a Gaussian, as trained weights have
        w += torch.randn(shape, generator=generator).pow(3) * 0.002
        out.append(w.to(torch.bfloat16).to(device))
    return out


def rel_error(w: torch.Tensor, deq: torch.Tensor) -> float:
    ref = w.float()
    return (
        torch.linalg.vector_norm(deq.float().reshape(ref.shape) - ref) / torch.linalg.vector_norm(ref)
    ).item()


def part_quantizer(device: str, shapes, repeats: int) -> dict:
    from hqq.core.quantize import Quantizer

    from qconv.formats import get_format

    hqq_format = get_format("hqq")
    weights = matrices(shapes, device)
    source_bytes = sum(w.numel() * w.element_size() for w in weights)
    results = []
    for bits in BITS:
        recipe = {**hqq_format.make_recipe({"bits": bits, "group_size": GROUP}), "dtype": "bfloat16"}
        log(f"quantizer: {bits}-bit")

        def run_qconv(recipe=recipe):
            return [hqq_format.quantize(w, recipe, torch.device(device)) for w in weights]

        def run_hqq(bits=bits):
            return [
                Quantizer.quantize(
                    w,
                    nbits=bits,
                    group_size=GROUP,
                    axis=1,
                    optimize=True,
                    round_zero=bits == 4,
                    device=device,
                    bitpack=True,
                )
                for w in weights
            ]

        qconv_times = timed(run_qconv, device, repeats)
        hqq_times = timed(run_hqq, device, max(2, repeats // 2))
        qconv_err, hqq_err = [], []
        for w, packed, (w_q, meta) in zip(weights, run_qconv(), run_hqq(), strict=True):
            qconv_err.append(rel_error(w, hqq_format.dequantize(packed, recipe)))
            meta = {**meta, "compute_dtype": torch.float32}
            hqq_err.append(rel_error(w, Quantizer.dequantize(w_q, meta)))
        # one error for the set: the norms of all matrices together
        weights_norm2 = [torch.linalg.vector_norm(w.float()).item() ** 2 for w in weights]

        def pooled(errors, norms2=weights_norm2):
            return (sum(e * e * n for e, n in zip(errors, norms2, strict=True)) / sum(norms2)) ** 0.5

        q_med, h_med = statistics.median(qconv_times), statistics.median(hqq_times)
        entry = {
            "bits": bits,
            "group_size": GROUP,
            "qconv_s": {"median": q_med, "best": min(qconv_times), "all": qconv_times},
            "hqq_s": {"median": h_med, "best": min(hqq_times), "all": hqq_times},
            "qconv_GBps": source_bytes / q_med / 1e9,
            "hqq_GBps": source_bytes / h_med / 1e9,
            "speedup": h_med / q_med,
            "qconv_rel_error": pooled(qconv_err),
            "hqq_rel_error": pooled(hqq_err),
            "error_ratio": pooled(qconv_err) / pooled(hqq_err),
            "per_matrix_rel_error": {
                "x".join(map(str, w.shape)): {"qconv": q, "hqq": h}
                for w, q, h in zip(weights, qconv_err, hqq_err, strict=True)
            },
        }
        log(
            f"  qconv {entry['qconv_GBps']:.1f} GB/s, hqq {entry['hqq_GBps']:.2f} GB/s, "
            f"{entry['speedup']:.1f}x; rel error {entry['qconv_rel_error']:.5f} vs {entry['hqq_rel_error']:.5f}"
        )
        results.append(entry)
    return {
        "shapes": [list(s) for s in shapes],
        "source_bytes": source_bytes,
        "timing": "source bytes / median time; qconv = HQQFormat.quantize (solve + pack + meta), "
        "hqq = Quantizer.quantize(optimize=True, bitpack=True); warm-up call first, cuda synchronised",
        "results": results,
    }


def smollm2_folder(gguf: Path, folder: Path) -> Path:
    from safetensors.torch import save_file

    from qconv.sources import open_source

    if (folder / "config.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with open_source(gguf) as source:
        tensors = {i.name: source.read(i.name).to(torch.bfloat16).contiguous() for i in source.tensors()}
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        source.write_support_files(folder)
        (folder / "config.json").write_text(json.dumps(source.config_dict(), indent=2))
    return folder


def hqq_reference_model(folder: Path, bits: int, compute_dtype: torch.dtype, device: str):
    """hqq's own path on a bf16 model folder: ``AutoHQQHFModel.quantize_model`` at ``bits``, group
    64; returns (the model in eval mode, seconds the quantization took, synchronised)."""
    from hqq.core.quantize import BaseQuantizeConfig
    from hqq.models.hf.base import AutoHQQHFModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=compute_dtype)
    start = time.perf_counter()
    AutoHQQHFModel.quantize_model(
        model,
        quant_config=BaseQuantizeConfig(nbits=bits, group_size=GROUP),
        compute_dtype=compute_dtype,
        device=device,
    )
    sync(device)
    return model.eval(), time.perf_counter() - start


def part_smollm2(device: str, gguf: Path, text: Path, work: Path, max_windows: int | None, bits_list) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import qconv
    from qconv.evaluate import perplexity, tokenize_text
    from qconv.pipeline import convert

    folder = smollm2_folder(gguf, work / "smollm2-bf16")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    ids = tokenize_text(tokenizer, text)
    log(f"smollm2: {ids.numel()} tokens")

    def evaluate(model) -> dict:
        start = time.perf_counter()
        result = perplexity(model, ids, max_windows=max_windows)
        result["eval_s"] = time.perf_counter() - start
        return result

    def fresh_model(dtype=torch.bfloat16):
        return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).to(device).eval()

    rows = []
    base = evaluate(fresh_model())
    rows.append({"model": "bf16", **base})
    log(f"  bf16 ppl {base['ppl']:.2f}")
    for bits in bits_list:
        for solver in ("qconv", "hqq"):
            try:
                out = work / f"smollm2-hqq{bits}-{solver}"
                start = time.perf_counter()
                result = convert(
                    str(folder),
                    out,
                    "hqq",
                    {"bits": bits, "solver": solver},
                    device=device,
                    force=True,
                    verify=True,
                    logits=True,
                )
                convert_s = time.perf_counter() - start
                model = qconv.load_model(out, device=device, dtype=torch.bfloat16)
                row = {
                    "model": f"qconv hqq {bits}-bit g64 (solver {solver})",
                    "bits": bits,
                    "solver": solver,
                    **evaluate(model),
                    "convert_s": convert_s,
                    "verified": result.manifest["verify"]["passed"],
                    "loader_rel_diff": result.manifest["verify"].get("logits", {}).get("loader_rel_diff"),
                }
                del model
            except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
                row = {
                    "model": f"qconv hqq {bits}-bit (solver {solver})",
                    "error": repr(exc),
                    "traceback": traceback.format_exc()[-2000:],
                }
            rows.append(row)
            log(f"  {row['model']}: ppl {row.get('ppl')}")
        for compute_dtype in (torch.bfloat16, torch.float16):
            name = f"hqq AutoHQQHFModel {bits}-bit g64 (compute {str(compute_dtype).removeprefix('torch.')})"
            try:
                model, quantize_s = hqq_reference_model(folder, bits, compute_dtype, device)
                row = {"model": name, "bits": bits, **evaluate(model), "quantize_s": quantize_s}
                del model
            except Exception as exc:  # noqa: BLE001
                row = {"model": name, "error": repr(exc), "traceback": traceback.format_exc()[-2000:]}
            rows.append(row)
            log(f"  {name}: ppl {row.get('ppl')}")
    return {"tokens": int(ids.numel()), "text": str(text), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--part", choices=["quantizer", "smollm2"], required=True)
    parser.add_argument("--gguf", type=Path)
    parser.add_argument("--text", type=Path)
    parser.add_argument("--work", type=Path, default=Path("/tmp/qbench-hqq"))
    parser.add_argument("--quick", action="store_true", help="CPU smoke test: tiny matrices, 2 windows")
    args = parser.parse_args()
    device = "cpu" if args.quick or not torch.cuda.is_available() else "cuda"
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {
        "part": args.part,
        "device": device,
        "environment": environment(device, ("transformers", "hqq", "triton")),
        "quick": args.quick,
    }
    if args.part == "quantizer":
        shapes = [(256, 512), (64, 512)] if args.quick else SHAPES
        doc.update(part_quantizer(device, shapes, 3 if args.quick else 7))
    else:
        doc.update(
            part_smollm2(
                device,
                args.gguf,
                args.text,
                args.work,
                2 if args.quick else None,
                [4] if args.quick else [8, 4, 3, 2],
            )
        )
    gpu = doc["environment"].get("gpu", "cpu").lower().replace(" ", "-")
    name = f"hqq_{args.part}_{gpu}{'_quick' if args.quick else ''}.json"
    (args.out / name).write_text(json.dumps(doc, indent=1))
    log(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
