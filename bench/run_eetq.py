"""EETQ benchmark (issue 6), run on the GPU machine; raw JSON goes to --out.

wikitext-2 test perplexity (protocol: qconv/evaluate.py) of SmolLM2-135M-Instruct: bf16, and
qconv's EETQ int8 artifact (``qconv.pipeline.convert --method eetq`` on the device, verified,
then run by ``qconv.load_model``: un-preprocessed once at load, weight-only int8, computing in
bf16 and in fp16). FORMATS.md's anchors on the H100: bf16 21.61, bnb int8 22.02; EETQ
dequantized on the CPU 21.67. Needs neither bitsandbytes, hqq nor aqlm.

    python bench/run_eetq.py --out DIR --gguf /tmp/m/smol.gguf --text .dev/data/wikitext2-test.txt

``--max-windows N`` evaluates only the first N windows (a smoke test on the CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_bench import environment  # noqa: E402
from run_hqq import smollm2_folder  # noqa: E402  (the same bf16 folder, written from the gguf)

ANCHORS = {"bf16 (FORMATS.md, H100)": 21.61, "bnb int8 (FORMATS.md, H100)": 22.02}


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def run(device: str, gguf: Path, text: Path, work: Path, arch: str, max_windows: int | None) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import qconv
    from qconv.evaluate import perplexity, tokenize_text
    from qconv.pipeline import convert

    folder = smollm2_folder(gguf, work / "smollm2-bf16")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    ids = tokenize_text(tokenizer, text)
    log(f"smollm2: {ids.numel()} tokens")

    def evaluate(model) -> dict:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = perplexity(model, ids, max_windows=max_windows)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        result["eval_s"] = time.perf_counter() - start
        return result

    rows = []
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16).to(device).eval()
    rows.append({"model": "bf16", **evaluate(model)})
    del model
    log(f"  bf16 ppl {rows[-1]['ppl']:.3f}")

    out = work / f"smollm2-eetq-{arch}"
    try:
        start = time.perf_counter()
        result = convert(str(folder), out, "eetq", {"arch": arch}, device=device, force=True, logits=True)
        convert_s = time.perf_counter() - start
        verify = result.manifest["verify"]
        conversion = {
            "convert_s": convert_s,
            "verified": verify["passed"],
            "loader_rel_diff": (verify.get("logits") or {}).get("loader_rel_diff"),
            "top1_vs_source": (verify.get("logits") or {}).get("top1_agreement"),
            "worst_rel_error": result.manifest["summary"]["worst_rel_error"],
            "bits_per_weight": result.manifest["summary"]["bits_per_weight"],
            "quantized_layers": result.manifest["summary"]["quantized_layers"],
        }
        log(f"  converted in {convert_s:.1f} s, verified: {conversion['verified']}")
    except Exception as exc:  # noqa: BLE001 - recorded, nothing more to measure
        return {
            "tokens": int(ids.numel()),
            "rows": rows,
            "error": repr(exc),
            "traceback": traceback.format_exc()[-2000:],
        }
    for dtype in (torch.bfloat16, torch.float16):
        name = f"qconv eetq int8 {arch} (compute {str(dtype).removeprefix('torch.')})"
        try:
            model = qconv.load_model(out, device=device, dtype=dtype)
            row = {"model": name, "arch": arch, **evaluate(model), **conversion}
            del model
        except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
            row = {"model": name, "error": repr(exc), "traceback": traceback.format_exc()[-2000:]}
        rows.append(row)
        log(f"  {name}: ppl {row.get('ppl')}")
    return {"tokens": int(ids.numel()), "text": str(text), "anchors": ANCHORS, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON")
    parser.add_argument("--gguf", type=Path, required=True, help="SmolLM2-135M-Instruct .gguf")
    parser.add_argument("--text", type=Path, required=True, help="wikitext-2 test text")
    parser.add_argument("--work", type=Path, default=Path("/tmp/qbench-eetq"))
    parser.add_argument("--arch", default="sm80", choices=["sm70", "sm80"])
    parser.add_argument("--device", default=None, help="default: cuda when there is one, else cpu")
    parser.add_argument("--max-windows", type=int, default=None, help="only the first N windows")
    args = parser.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {
        "part": "smollm2",
        "method": "eetq",
        "device": device,
        "environment": environment(device, ("transformers", "eetq")),
        "max_windows": args.max_windows,
    }
    doc.update(run(device, args.gguf, args.text, args.work, args.arch, args.max_windows))
    gpu = doc["environment"].get("gpu", "cpu").lower().replace(" ", "-")
    quick = "_quick" if args.max_windows is not None else ""
    name = f"eetq_smollm2_{gpu}{quick}.json"
    (args.out / name).write_text(json.dumps(doc, indent=1))
    log(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
