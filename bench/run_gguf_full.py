"""Calibrated GGUF against llama.cpp + imatrix under the FULL protocol (issue 17), on the CPU.

bench/run_gguf_calibrated.py and bench/run_gguf_imatrix.py compare four quantizers over the first
4 windows of the wikitext-2 test text (llama.cpp needs ~9 s a window on 2 cores). This script
takes the two columns the issue's goal compares, for the types asked, over every window of 2048
tokens (qconv eval's default protocol; ~148 windows, ~21 minutes a file on 2 quiet cores):

  calibrated      ``qconv convert BF16 --method gguf --type T --calibration wikitext2
                  --calib-tokens 8192 --device cpu --no-verify`` of run_gguf.py's BF16 file, then
                  ``qconv eval OUT --device cpu`` (llama.cpp through qconv.llamacpp.open_llama)
  llama_imatrix   the file bench/run_gguf_imatrix.py made (``llama-quantize --imatrix``), kept in
                  its ``--work`` folder: checked against that run's JSON (size, tensor types), then
                  run_gguf.py's ``ppl`` case with every window

    OMP_NUM_THREADS=2 nice -n 5 .venv/bin/python bench/run_gguf_full.py --imatrix-work /work/wt/imatrix-work \\
        [--types Q2_K,Q3_K_M,Q4_K_M]        # bench/results/gguf_calibrated_full_smollm2_cpu.json

The JSON is rewritten after every step; a column already measured is not run again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_bench import environment, write_json  # noqa: E402
from run_gguf import WINDOW, run_case  # noqa: E402
from run_gguf_calibrated import bf16_file  # noqa: E402
from run_gguf_calibrated import run_case as run_calibrated_case  # noqa: E402
from run_gguf_imatrix import sha256, tensor_types  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DEFAULT_OUT = RESULTS / "gguf_calibrated_full_smollm2_cpu.json"
IMATRIX = RESULTS / "gguf_imatrix_smollm2_cpu.json"
TYPES = ("Q2_K", "Q3_K_M", "Q4_K_M")


def imatrix_file(work: Path, file_type: str, recorded: dict) -> Path:
    """run_gguf_imatrix.py's file for ``file_type``, if it is the one its JSON describes."""
    path = work / f"imatrix-{file_type}.gguf"
    if not path.is_file():
        raise SystemExit(f"{path}: missing (run bench/run_gguf_imatrix.py --work {work})")
    case = recorded["cases"].get(file_type, {})
    if path.stat().st_size != case.get("file_bytes") or tensor_types(path) != case.get("tensor_types"):
        raise SystemExit(f"{path}: not the file {IMATRIX.name} measured (size or tensor types differ)")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--imatrix-work", type=Path, required=True, help="run_gguf_imatrix.py's --work folder"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--types", default=",".join(TYPES))
    parser.add_argument("--calib-tokens", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--timeout", type=float, default=7200, help="seconds a step may take")
    args = parser.parse_args()
    recorded = json.loads(IMATRIX.read_text())
    doc = json.loads(args.out.read_text()) if args.out.is_file() else {}
    doc.update(
        {
            "what": "SmolLM2-135M-Instruct: calibrated qconv GGUF (GPTQ, --calibration wikitext2) against "
            "llama.cpp's quantizer with an importance matrix from the same calibration tokens, full protocol",
            "protocol": f"wikitext-2 test perplexity by llama.cpp over every non-overlapping window of "
            f"{WINDOW} tokens (qconv eval's default)",
            "calibration_settings": {"text": "wikitext2 (the shipped WikiText-2 validation text)",
                                     "calib_tokens": args.calib_tokens},
            "imatrix_run": str(IMATRIX.relative_to(ROOT)),
            "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
            "threads": args.threads,
            "environment": environment("cpu", ("transformers", "gguf", "llama-cpp-python")),
        }
    )  # fmt: skip
    doc.setdefault("runs", []).append(
        {"command": " ".join(sys.argv), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    )
    cases = doc.setdefault("cases", {})

    def save() -> None:
        write_json(args.out, doc, indent=1)

    with tempfile.TemporaryDirectory(prefix="qconv-gguf-full-bench-") as scratch:
        work, home = Path(scratch) / "out", Path(scratch) / "home"
        bf16 = None
        for file_type in args.types.split(","):
            case = cases.setdefault(file_type, {})
            if "perplexity" not in case.get("calibrated", {}):
                bf16 = bf16 or bf16_file(work, home)
                options = SimpleNamespace(calib_tokens=args.calib_tokens, max_windows=None)

                def write(calibrated, case=case) -> None:
                    case["calibrated"] = calibrated
                    save()

                run_calibrated_case(file_type, bf16, work, home, options, write)
            if "perplexity" not in case.get("llama_imatrix", {}):
                path = imatrix_file(args.imatrix_work, file_type, recorded)
                spec = {"file": str(path), "seqlen": WINDOW, "max_windows": None, "threads": args.threads}
                evaluation = run_case("ppl", spec, args.timeout, dict(os.environ))
                if "error" in evaluation:
                    raise SystemExit(f"{path}: {evaluation['error'][-2000:]}")
                case["llama_imatrix"] = {
                    "file": path.name,
                    "sha256": sha256(path),
                    "eval": evaluation,
                    "perplexity": evaluation["ppl"],
                }
                save()
            print(file_type, {k: v.get("perplexity") for k, v in case.items()}, flush=True)
    save()


if __name__ == "__main__":
    main()
