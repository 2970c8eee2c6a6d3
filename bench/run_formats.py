"""Every format against its reference (issue 8), run on the GPU machine; raw JSON goes to --out.

For each format (bnb nf4+dq, bnb fp4, bnb int8, hqq 4-bit g64, hqq 8-bit g64, eetq int8), on the
real SmolLM2-135M-Instruct gguf and the wikitext-2 test text, each step in its own process after
dropping the page cache (run_bench.run_case):

  convert     ``qconv.pipeline.convert`` of the gguf on the GPU (what ``qconv convert`` runs; layer
              errors checked, the logits check left to the perplexity step, which loads the
              artifact with the real loader anyway): seconds, bits per weight (manifest summary),
              artifact bytes, peak GPU memory and host RSS.
  ppl         perplexity of that artifact by ``qconv eval``'s protocol (qconv/evaluate.py:
              non-overlapping windows of 2048 tokens, remainder dropped).
  reference   perplexity of the reference path on the bf16 model (the gguf dequantized to a bf16
              folder, as run_hqq.py makes it): transformers' ``BitsAndBytesConfig`` load-time
              quantization for bnb; hqq's own ``AutoHQQHFModel`` for hqq (run_hqq.py's function);
              eetq has none that installs (recorded as unavailable, with the reason).
  bf16        perplexity of the bf16 folder itself (21.61 on the H100: shared/data/README.md).
  throughput  quantization throughput on Llama-3-8B-shaped bf16 matrices (run_hqq.py's SHAPES and
              matrices), median after a warm-up, synchronised: qconv's per-tensor entry
              ``get_format(method).quantize`` against ``bitsandbytes.functional.quantize_4bit`` /
              ``int8_vectorwise_quant`` (the same calls qconv makes, without qconv's packing of the
              state), eetq qconv only; hqq's comparison is run_hqq.py's quantizer part, not re-run.

    python bench/run_formats.py --out DIR --gguf /tmp/m/smol.gguf --text .dev/data/wikitext2-test.txt
        [--formats nf4,fp4,int8,hqq4,hqq8,eetq] [--parts bf16,convert,ppl,reference,throughput]
        [--name formats_smollm2] [--max-windows N]
    python bench/run_formats.py --out /tmp/out --gguf G --text T --quick     # CPU smoke test

The JSON, ``NAME_<gpu-slug>.json`` (``_quick`` added for --quick or --max-windows), is written
after every step. Split the formats over calls with --formats and a --name each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_bench import (  # noqa: E402
    case_process,
    environment,
    folder_bytes,
    gpu_slug,
    run_case,
    sync,
    write_json,
)
from run_hqq import SHAPES, hqq_reference_model, matrices, smollm2_folder, timed  # noqa: E402

# key -> qconv's method and options, and the reference path that matches it
FORMATS = {
    "nf4": {
        "method": "bnb",
        "options": {"bits": 4, "quant_type": "nf4", "double_quant": True},
        "reference_path": "bnb",
    },
    "fp4": {
        "method": "bnb",
        "options": {"bits": 4, "quant_type": "fp4", "double_quant": False},
        "reference_path": "bnb",
    },
    "int8": {"method": "bnb", "options": {"bits": 8}, "reference_path": "bnb"},
    "hqq4": {"method": "hqq", "options": {"bits": 4, "group_size": 64}, "reference_path": "hqq"},
    "hqq8": {"method": "hqq", "options": {"bits": 8, "group_size": 64}, "reference_path": "hqq"},
    "eetq": {"method": "eetq", "options": {"arch": "sm80"}, "reference_path": None},
}
# shared/FORMATS.md, "EETQ": why there is no reference to run
EETQ_UNAVAILABLE = (
    "no EETQ reference can run here: the eetq wheel on the index is built for one old CPython and torch "
    "and cannot be installed, and upstream EETQ refuses SM90 and later ('Unsupported Arch') for "
    "quantizing too (shared/FORMATS.md)"
)
PARTS = ("bf16", "convert", "ppl", "reference", "throughput")
WINDOW = 2048  # qconv eval's default seqlen (qconv/evaluate.py DEFAULT_SEQLEN)


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def label(key: str) -> str:
    from qconv.formats import get_format

    fmt = get_format(FORMATS[key]["method"])
    return fmt.label(fmt.make_recipe(dict(FORMATS[key]["options"])))


# -- the cases, each run as `python run_formats.py --case NAME --device D SPEC` (SPEC: JSON) ------
def _perplexity(path: str, args: dict, device: str, dtype: str | None = None) -> tuple[dict, float]:
    """``qconv eval``'s metrics and protocol for the model at ``path``, and the seconds taken."""
    from qconv.evaluate import evaluate

    start = time.perf_counter()
    result = evaluate(
        path,
        text=args["text"],
        seqlen=args["seqlen"],
        max_windows=args["max_windows"],
        device=device,
        dtype=dtype,
    )
    return {**result.metrics, "protocol": result.protocol}, time.perf_counter() - start


def case_bf16(spec: str, device: str = "cuda") -> dict:
    """Perplexity of the bf16 folder, by qconv eval's protocol (in bf16: a plain folder would
    otherwise load in its config's dtype, float32 for one written from the gguf)."""
    args = json.loads(spec)
    metrics, seconds = _perplexity(args["folder"], args, device, "bfloat16")
    return {**metrics, "eval_s": seconds}


def case_convert(spec: str, device: str = "cuda") -> dict:
    from qconv.pipeline import convert

    args = json.loads(spec)
    fmt = FORMATS[args["key"]]
    sync(device)
    start = time.perf_counter()
    result = convert(
        args["source"],
        args["out"],
        fmt["method"],
        dict(fmt["options"]),
        device=device,
        force=True,
        logits=False,
    )
    sync(device)
    seconds = time.perf_counter() - start
    return {
        "convert_s": seconds,
        "label": result.manifest["recipe"]["label"],
        "stats": result.stats,
        "summary": result.manifest["summary"],
        "verify_passed": result.report.passed if result.report else None,
        "artifact_bytes": folder_bytes(Path(args["out"])),
        "peak_gpu_bytes": result.stats.get("peak_gpu_bytes"),
    }


def case_ppl(spec: str, device: str = "cuda") -> dict:
    """Perplexity of a qconv artifact: ``qconv eval`` (its loader, its protocol)."""
    args = json.loads(spec)
    metrics, seconds = _perplexity(args["artifact"], args, device)
    return {**metrics, "load_and_eval_s": seconds}


def bnb_reference_config(options: dict):
    """transformers' load-time equivalent of qconv's bnb options (bf16 compute, as the model)."""
    import torch
    from transformers import BitsAndBytesConfig

    if options["bits"] == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=options["quant_type"],
        bnb_4bit_use_double_quant=options["double_quant"],
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def case_reference(spec: str, device: str = "cuda") -> dict:
    """The reference path's model from the bf16 folder, timed, then its perplexity (same protocol)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qconv.evaluate import perplexity, tokenize_text

    args = json.loads(spec)
    fmt = FORMATS[args["key"]]
    folder = args["folder"]
    if fmt["reference_path"] == "bnb":
        how = "transformers from_pretrained(quantization_config=BitsAndBytesConfig(...)), bf16"
        config = bnb_reference_config(fmt["options"])
        device_map = "cuda:0" if device.startswith("cuda") else device
        sync(device)
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=config, device_map=device_map, dtype=torch.bfloat16
        ).eval()
        sync(device)
        quantize_s = time.perf_counter() - start
    else:
        how = f"hqq AutoHQQHFModel.quantize_model, {fmt['options']['bits']}-bit g64, compute bf16"
        model, quantize_s = hqq_reference_model(Path(folder), fmt["options"]["bits"], torch.bfloat16, device)
    ids = tokenize_text(AutoTokenizer.from_pretrained(folder), args["text"])
    start = time.perf_counter()
    result = perplexity(model, ids, args["seqlen"], args["max_windows"])
    sync(device)
    return {"how": how, "quantize_s": quantize_s, **result, "eval_s": time.perf_counter() - start}


def case_throughput(spec: str, device: str = "cuda") -> dict:
    import bitsandbytes.functional as F
    import torch

    from qconv.formats import get_format

    args = json.loads(spec)
    weights = matrices([tuple(s) for s in args["shapes"]], device)
    source_bytes = sum(w.numel() * w.element_size() for w in weights)
    results = {}
    for key in args["formats"]:
        fmt_spec = FORMATS[key]
        if fmt_spec["method"] == "hqq":
            results[key] = {"see": "hqq_quantizer_*.json (run_hqq.py --part quantizer), not re-run here"}
            continue
        fmt = get_format(fmt_spec["method"])
        recipe = {**fmt.make_recipe(dict(fmt_spec["options"])), "dtype": "bfloat16"}
        log(f"throughput: {key}")

        def run_qconv(fmt=fmt, recipe=recipe):
            return [fmt.quantize(w, recipe, torch.device(device)) for w in weights]

        def run_reference(options=fmt_spec["options"]):
            if options["bits"] == 8:  # bf16 source: the cast to fp16 transformers' Int8Params makes
                return [F.int8_vectorwise_quant(w.to(torch.float16)) for w in weights]
            return [
                F.quantize_4bit(
                    w,
                    blocksize=64,
                    compress_statistics=options["double_quant"],
                    quant_type=options["quant_type"],
                    quant_storage=torch.uint8,
                )
                for w in weights
            ]

        entry: dict = {"label": fmt.label(recipe)}
        try:
            qconv_times = timed(run_qconv, device, args["repeats"])
            median = statistics.median(qconv_times)
            entry["qconv_s"] = {"median": median, "best": min(qconv_times), "all": qconv_times}
            entry["qconv_GBps"] = source_bytes / median / 1e9
            if fmt_spec["reference_path"] == "bnb":
                reference_times = timed(run_reference, device, args["repeats"])
                median_ref = statistics.median(reference_times)
                entry["reference"] = "bitsandbytes.functional " + (
                    "int8_vectorwise_quant" if fmt_spec["options"]["bits"] == 8 else "quantize_4bit"
                )
                entry["reference_s"] = {
                    "median": median_ref,
                    "best": min(reference_times),
                    "all": reference_times,
                }
                entry["reference_GBps"] = source_bytes / median_ref / 1e9
                entry["speedup"] = median_ref / median
                ours, theirs = run_qconv()[0]["weight"], run_reference()[0][0]
                entry["same_packed_weight"] = bool(torch.equal(ours, theirs))
            else:
                entry["reference"] = None
                entry["reference_unavailable"] = EETQ_UNAVAILABLE
        except Exception as exc:  # noqa: BLE001 - recorded, the other formats go on
            entry.update(error=repr(exc), traceback=traceback.format_exc()[-2000:])
        results[key] = entry
    return {
        "shapes": args["shapes"],
        "source_bytes": source_bytes,
        "repeats": args["repeats"],
        "timing": "source bytes / median time after a warm-up call, synchronised; qconv = "
        "QuantFormat.quantize (bitsandbytes' call + its state packed as transformers stores it)",
        "results": results,
    }


CASES = {
    "bf16": case_bf16,
    "convert": case_convert,
    "ppl": case_ppl,
    "reference": case_reference,
    "throughput": case_throughput,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--gguf", help="SmolLM2-135M-Instruct .gguf")
    parser.add_argument("--text", help="wikitext-2 test text")
    parser.add_argument(
        "--formats", default=",".join(FORMATS), help=f"comma-separated from {', '.join(FORMATS)}"
    )
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated from {', '.join(PARTS)}")
    parser.add_argument("--work", type=Path, default=Path("/tmp/qbench-formats"))
    parser.add_argument("--name", default="formats_smollm2", help="the JSON's name before the GPU")
    parser.add_argument("--max-windows", type=int, default=None, help="only the first N windows")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of each quantizer")
    parser.add_argument("--quick", action="store_true", help="CPU smoke test: short windows, small matrices")
    parser.add_argument("--case", default=None)
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --quick)")
    parser.add_argument("args", nargs="*")
    ns = parser.parse_args()
    device = ns.device or ("cpu" if ns.quick else "cuda")
    if ns.case:
        case_process(CASES, ns.case, ns.args, device)
        return
    keys = [k for k in ns.formats.split(",") if k]
    parts = [p for p in ns.parts.split(",") if p]
    if set(keys) - set(FORMATS) or set(parts) - set(PARTS):
        parser.error(f"--formats from {', '.join(FORMATS)}; --parts from {', '.join(PARTS)}")
    if {"bf16", "convert", "ppl", "reference"} & set(parts) and not (ns.gguf and ns.text):
        parser.error("--gguf and --text are needed for the bf16, convert, ppl and reference parts")

    max_windows = 2 if ns.quick and ns.max_windows is None else ns.max_windows
    seqlen = 256 if ns.quick else WINDOW  # --quick: short windows, the CPU's numbers mean nothing
    quick = "_quick" if ns.quick or max_windows is not None else ""
    path = ns.out / f"{ns.name}_{gpu_slug(device)}{quick}.json"
    doc: dict = {
        "device": device,
        "environment": environment(device, ("transformers", "bitsandbytes", "hqq", "eetq")),
        "command": " ".join(sys.argv),
        "gguf": ns.gguf,
        "text": ns.text,
        "seqlen": seqlen,
        "max_windows": max_windows,
        "quick": ns.quick,
        "formats": {},
    }
    folder = None
    if ns.gguf:
        folder = smollm2_folder(Path(ns.gguf), ns.work / "smollm2-bf16")  # the reference paths' model
    common = {"text": ns.text, "seqlen": seqlen, "max_windows": max_windows}
    if "bf16" in parts:
        doc["bf16"] = run_case(
            "bf16", json.dumps({"folder": str(folder), **common}), device=device, script=__file__
        )
        log("bf16:", doc["bf16"].get("ppl", doc["bf16"].get("error", "")[-300:]))
        write_json(path, doc)
    for key in keys:
        entry = doc["formats"].setdefault(key, {**FORMATS[key], "label": label(key)})
        artifact = ns.work / f"smollm2-{key}"
        if "convert" in parts:
            spec = {"key": key, "source": ns.gguf, "out": str(artifact)}
            entry["convert"] = run_case("convert", json.dumps(spec), device=device, script=__file__)
            log(key, "convert:", entry["convert"].get("convert_s", entry["convert"].get("error", "")[-300:]))
            write_json(path, doc)
        if "ppl" in parts:
            if (artifact / "qconv.json").is_file():
                spec = {"artifact": str(artifact), **common}
                entry["ppl"] = run_case("ppl", json.dumps(spec), device=device, script=__file__)
            else:
                entry["ppl"] = {"error": f"{artifact}: no artifact (the convert step failed or did not run)"}
            log(key, "ppl:", entry["ppl"].get("ppl", entry["ppl"].get("error", "")[-300:]))
            write_json(path, doc)
        if "reference" in parts:
            if FORMATS[key]["reference_path"] is None:
                entry["reference"] = {"unavailable": EETQ_UNAVAILABLE}
            else:
                spec = {"key": key, "folder": str(folder), **common}
                entry["reference"] = run_case("reference", json.dumps(spec), device=device, script=__file__)
            log(key, "reference:", entry["reference"].get("ppl", str(entry["reference"])[-300:]))
            write_json(path, doc)
    if "throughput" in parts:
        spec = {
            "formats": keys,
            "shapes": [[256, 512], [64, 512]] if ns.quick else [list(s) for s in SHAPES],
            "repeats": 3 if ns.quick else ns.repeats,
        }
        doc["throughput"] = run_case("throughput", json.dumps(spec), device=device, script=__file__)
        write_json(path, doc)
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
