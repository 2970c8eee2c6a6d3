"""AQLM benchmarks (issue 5), run on the GPU machine; raw JSON goes to --out.

layer    one real SmolLM2-135M layer (``--layer``, default block 15's gate_proj, 1536x576)
         with its calibration statistics H = X^T X from the shipped WikiText-2 validation text
         (the source model run up to that block): qconv's ``quantize_layer`` against the
         authors' reference ``AQEngine`` (Vahe1994/AQLM, its ``src`` on PYTHONPATH through
         ``--reference``), same H, same published settings (1x16 g8, Adam lr 1e-4 for 100
         steps an epoch, beam 1, stop under 1% gain; k-means init 100 iterations in the
         reference, ``kmeans_iters`` in qconv's recipe). Time with synchronisation; error as the
         relative output error ``tr(dW H dW^T) / tr(W H W^T)`` of the float16-stored result.
         Both run once untimed first, then the median of ``--repeats`` / ``--reference-repeats``.
resume   a conversion killed (SIGKILL) after ``--kill-after`` blocks and resumed, against an
         uninterrupted one: every layer's error and the artifact bytes compared (GPU).
smollm2  ``qconv.pipeline.convert`` of the SmolLM2 gguf on the GPU for 1x16 and 2x8, with and
         without block fine-tuning, end to end (calibration, quantization, writing, verify);
         then wikitext-2 test perplexity (qconv/evaluate.py) through stock transformers +
         aqlm when its CUDA kernels build here, else through qconv's dequantized reference
         (recorded as ``ppl_model``).

  python bench/run_aqlm.py --out DIR --part layer --gguf /tmp/m/smol.gguf --reference .dev/aqlm_ref
      [--save-inputs F]   keep the layer's weight and X^T X; later runs take --inputs F, no gguf
  python bench/run_aqlm.py --out DIR --part smollm2 --gguf /tmp/m/smol.gguf --text .dev/data/wikitext2-test.txt

block8b  (issue 19) one Llama-3-8B-shaped decoder block with random bf16 weights, calibrated on
         real text (bench/aqlm_block8b.py says how) by qconv's own ``prepare``, every phase timed
         (X^T X, k-means init, beam search, Adam, fine-tuning...), extrapolated to 32 blocks.

  python bench/run_aqlm.py --out DIR --part block8b --gguf /tmp/m/smol.gguf --cases 1x16:ft,2x8:ft
      [--calib-tokens N] [--max-epochs N] [--finetune-epochs N] [--budget-s S]
  python bench/run_aqlm.py --out /tmp/out --part block8b --quick   # CPU smoke test, tiny block
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from aqlm_block8b import part_block8b  # noqa: E402


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def relative_output_error(weight: torch.Tensor, quantized: torch.Tensor, xtx: torch.Tensor) -> float:
    delta = (quantized.float() - weight.float()).double()
    w = weight.double()
    return float(((delta @ xtx.double()) * delta).sum() / ((w @ xtx.double()) * w).sum())


def layer_inputs(gguf: str, layer: str, tokens: int, device: torch.device):
    """H = X^T X / n of ``layer``'s inputs on the calibration text, with the source blocks run
    up to its block, and the layer's weight (float32)."""
    from qconv.calibration import BlockRunner, load_calibration
    from qconv.formats.blockwise import InputStatistics
    from qconv.sources import open_source

    source = open_source(gguf)
    calib = load_calibration(source, None, tokens, 2048)
    runner = BlockRunner(source, device)
    hidden, kwargs = runner.first_inputs(calib.ids)
    prefix = runner.prefix + "."
    index = int(layer[len(prefix) :].split(".")[0])
    for i in range(index):
        hidden = BlockRunner.run(runner.load_block(i), hidden, kwargs[i])
    block = runner.load_block(index)
    block_prefix = runner.block_name(index) + "."
    statistics = InputStatistics(block, block_prefix, [layer])  # as the conversion gathers it
    BlockRunner.run(block, hidden, kwargs[index])
    statistics.stop()
    weight = block.get_submodule(layer[len(block_prefix) :]).weight.detach().float()
    return weight, statistics.pop(layer), calib.fingerprint


def part_layer(args, out: dict) -> None:
    """qconv's quantize_layer and the reference's AQEngine on the same layer and H. Each is run
    once untimed first (Triton compilation, cuBLAS and CUDA-graph set-up, the reference's own
    first-call costs: paid once per conversion, not per layer), then ``--repeats`` timed runs;
    the median is compared."""
    from qconv.formats import get_format
    from qconv.formats.aqlm_layout import stored_tensors
    from qconv.formats.aqlm_solver import quantize_layer

    device = torch.device("cuda", 0)  # the reference compares devices with ==: name the index
    if args.inputs:  # saved by an earlier run's --save-inputs: skips running the model
        from safetensors import safe_open

        with safe_open(args.inputs, framework="pt", device="cpu") as f:
            weight, xtx = f.get_tensor("weight").to(device), f.get_tensor("xtx").to(device)
            fingerprint = json.loads((f.metadata() or {}).get("calibration", "null"))
    else:
        weight, xtx, fingerprint = layer_inputs(args.gguf, args.layer, args.calib_tokens, device)
    if args.save_inputs:
        from safetensors.torch import save_file

        tensors = {"weight": weight.contiguous().cpu(), "xtx": xtx.contiguous().cpu()}
        save_file(tensors, args.save_inputs, metadata={"calibration": json.dumps(fingerprint)})
    result = {"layer": args.layer, "shape": list(weight.shape), "calibration": fingerprint, "cases": {}}
    recipe = get_format("aqlm").make_recipe({"scheme": "1x16"})
    aqlm = get_format("aqlm")

    def run_qconv():
        return quantize_layer(weight, xtx, recipe, torch.Generator().manual_seed(0))

    def qconv_error(solved) -> float:  # of what the artifact stores (float16 codebooks and scales)
        stored = aqlm.dequantize(stored_tensors(solved.state, recipe["nbits_per_codebook"]), recipe)
        return relative_output_error(weight, stored, xtx)

    log("qconv: untimed first run")
    run_qconv()
    runs = [timed_run(run_qconv) for _ in range(args.repeats)]
    result["cases"]["qconv"] = {
        "seconds": statistics.median(seconds for seconds, _ in runs),
        "runs_s": [seconds for seconds, _ in runs],
        "epochs": runs[0][1].epochs,
        "rel_output_error": qconv_error(runs[0][1]),
        "rel_output_error_runs": [qconv_error(solved) for _, solved in runs],
        "kmeans_iters": recipe["kmeans_iters"],
    }
    log("qconv", result["cases"]["qconv"])

    if args.reference:
        sys.path.insert(0, str(Path(args.reference).resolve()))
        from argparse import Namespace

        from aq_engine import AQEngine

        namespace = Namespace(
            devices=[device],
            num_codebooks=1,
            nbits_per_codebook=16,
            in_group_size=8,
            out_group_size=1,
            codebook_value_nbits=16,
            codebook_value_num_groups=1,
            scale_nbits=0,
            init_max_iter=args.reference_kmeans_iters,
            init_max_points_per_centroid=None,
            lr=1e-4,
            beam_size=1,
            max_epochs=1000,
            relative_mse_tolerance=0.01,
            steps_per_epoch=100,
            print_frequency=1000,
        )

        def run_reference():
            linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=device)
            linear.weight.data = weight.clone()
            engine = AQEngine(linear)
            engine.XTX = xtx.double().clone()  # the same statistics (add_batch averages X^T X the same way)
            engine.nsamples = 1
            torch.manual_seed(0)
            return engine.quantize(args=namespace, verbose=False)

        def reference_error(quantized) -> float:
            with torch.no_grad():
                return relative_output_error(weight, quantized().half().float(), xtx)

        log("reference: untimed first run")
        run_reference()
        runs = [timed_run(run_reference) for _ in range(args.reference_repeats)]
        result["cases"]["reference"] = {
            "seconds": statistics.median(seconds for seconds, _ in runs),
            "runs_s": [seconds for seconds, _ in runs],
            "rel_output_error": reference_error(runs[0][1]),
            "rel_output_error_runs": [reference_error(quantized) for _, quantized in runs],
            "kmeans_iters": args.reference_kmeans_iters,
        }
        log("reference", result["cases"]["reference"])
        q, r = result["cases"]["qconv"], result["cases"]["reference"]
        result["speedup"] = r["seconds"] / q["seconds"]
        result["error_ratio"] = q["rel_output_error"] / r["rel_output_error"]
    out["layer"] = result


def timed_run(fn):
    sync()
    start = time.perf_counter()
    value = fn()
    sync()
    return time.perf_counter() - start, value


def perplexity_of(folder: Path, text: str, max_windows: int | None, source_gguf: str) -> dict:
    from qconv.artifact import Artifact
    from qconv.evaluate import perplexity, tokenize_text
    from qconv.loader import load_model

    device = torch.device("cuda")
    try:
        model = load_model(folder, device="cuda", dtype=torch.float16)
        how = "stock transformers + aqlm (CUDA kernels), float16"
    except Exception as exc:  # noqa: BLE001 - fall back to the dequantized reference, say so
        log("stock loader failed:", type(exc).__name__, str(exc)[:300])
        from qconv.modeling import reference_model
        from qconv.sources import open_source

        artifact = Artifact(folder)
        model = reference_model(open_source(source_gguf), device, torch.float32)
        modules = dict(model.named_modules())
        for module in artifact.layers:
            modules[module].weight.data = artifact.dequantize(module).to(device=device, dtype=torch.float32)
        stored = artifact.unquantized_keys()
        for name, param in model.named_parameters():  # fine-tuned norms come from the artifact
            if name in stored:
                param.data = artifact.read(name).to(device=device, dtype=torch.float32)
        how = f"qconv's dequantized reference, float32 (stock loader: {type(exc).__name__})"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    ids = tokenize_text(tokenizer, text)
    result = perplexity(model, ids, 2048, max_windows)
    result["ppl_model"] = how
    del model
    torch.cuda.empty_cache()
    return result


def part_smollm2(args, out: dict) -> None:
    from qconv.pipeline import convert

    results = out.setdefault("smollm2", {})
    for case in args.cases.split(","):
        scheme, _, ft = case.partition(":")
        options = {"scheme": scheme, "finetune": ft == "ft"}
        if args.calib_tokens:
            options["calib_tokens"] = args.calib_tokens
        folder = Path(args.work) / f"aqlm-{scheme}-{ft}"
        log("convert", case)
        try:
            sync()
            start = time.perf_counter()
            converted = convert(args.gguf, folder, "aqlm", options, device="cuda", force=True, logits=True)
            sync()
            seconds = time.perf_counter() - start
            entry = {
                "convert_s": seconds,
                "stats": converted.stats,
                "summary": converted.manifest["summary"],
                "verify": converted.manifest["verify"],
                "calibration": converted.manifest["calibration"],
            }
            log(case, f"{seconds:.1f} s", converted.manifest["summary"])
            entry["ppl"] = perplexity_of(folder, args.text, args.max_windows, args.gguf)
            log(case, "ppl", entry["ppl"]["ppl"])
        except Exception as exc:  # noqa: BLE001 - record and go on with the next case
            entry = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            log(entry["traceback"])
        results[case] = entry
        write(args, out)  # after every case: a later case running out of time loses nothing


def part_resume(args, out: dict) -> None:
    """Issue 5's GPU resume check: an uninterrupted conversion, then one killed (SIGKILL) after
    ``--kill-after`` blocks' checkpoints and finished with --resume; compares every layer's
    error and the artifact bytes. Same recipe (``--resume-case``), same seed, same GPU."""
    import os
    import signal
    import subprocess

    scheme, _, ft = args.resume_case.partition(":")
    options = ["--method", "aqlm", "--scheme", scheme, "--finetune" if ft == "ft" else "--no-finetune"]
    options += ["--device", "cuda", "--no-verify", "--no-record"]
    if args.calib_tokens:
        options += ["--calib-tokens", str(args.calib_tokens)]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    whole, resumed = work / "resume-whole", work / "resume-resumed"
    checkpoint = work / f".{resumed.name}.qconv-checkpoint"
    command = [sys.executable, "-m", "qconv", "convert", args.gguf]
    for folder in (whole, resumed):
        subprocess.run(["rm", "-rf", str(folder), str(work / f".{folder.name}.qconv-checkpoint")], check=True)
    env = dict(os.environ)
    log("resume: uninterrupted run")
    started = time.perf_counter()
    subprocess.run([*command, "-o", str(whole), *options], check=True, env=env)
    whole_s = time.perf_counter() - started
    log("resume: run to be killed")
    process = subprocess.Popen([*command, "-o", str(resumed), *options], env=env)
    marker = checkpoint / f"block-{args.kill_after - 1:05d}.safetensors"
    while not marker.exists():
        if process.poll() is not None:
            raise RuntimeError("the conversion ended before it could be killed")
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    state = json.loads((checkpoint / "state.json").read_text())
    log("resume: killed with", state["blocks_done"], "blocks done; resuming")
    subprocess.run([*command, "-o", str(resumed), *options, "--resume"], check=True, env=env)

    def layer_errors(folder: Path) -> dict:
        manifest = json.loads((folder / "qconv.json").read_text())
        # the weight error convert measures, and the output error the solver reached
        return {
            name: (layer["rel_error"], layer.get("rel_output_error"))
            for name, layer in manifest["layers"].items()
        }

    first, second = layer_errors(whole), layer_errors(resumed)
    differing = [name for name in first if first[name] != second.get(name)]
    shards = sorted(p.name for p in whole.glob("*.safetensors"))
    same_bytes = shards == sorted(p.name for p in resumed.glob("*.safetensors")) and all(
        (whole / name).read_bytes() == (resumed / name).read_bytes() for name in shards
    )
    out["resume"] = {
        "case": args.resume_case,
        "uninterrupted_s": whole_s,
        "killed_after_blocks": state["blocks_done"],
        "layers": len(first),
        "layers_with_a_different_error": differing,
        "largest_error_difference": max(
            (abs(a - b) for n in first for a, b in zip(first[n], second[n], strict=True) if a is not None),
            default=0.0,
        ),
        "errors": first,
        "same_bytes": same_bytes,
    }
    log("resume", out["resume"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--part", action="append", choices=["layer", "smollm2", "resume", "block8b"], required=True
    )
    parser.add_argument("--gguf", default=None)
    parser.add_argument("--text", default=".dev/data/wikitext2-test.txt")
    parser.add_argument("--layer", default="model.layers.15.mlp.gate_proj")
    parser.add_argument("--reference", default=None, help="folder with the reference's aq_engine.py and src/")
    parser.add_argument("--reference-kmeans-iters", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of qconv's layer quantizer")
    parser.add_argument("--reference-repeats", type=int, default=3, help="timed runs of the reference")
    parser.add_argument("--inputs", default=None, help="a layer's weight and X^T X saved by --save-inputs")
    parser.add_argument("--save-inputs", default=None, help="save the layer's weight and X^T X here")
    parser.add_argument(
        "--calib-tokens", type=int, default=None, help="default: qconv's (131,072); block8b --quick: 256"
    )
    parser.add_argument(
        "--cases", default=None, help="scheme:ft|noft,...; smollm2: all four by default, block8b: 1x16:ft"
    )
    parser.add_argument("--max-epochs", type=int, default=None, help="block8b: qconv's --max-epochs (rounds)")
    parser.add_argument(
        "--finetune-epochs", type=int, default=None, help="block8b: cap fine-tuning's epochs (recipe: 10)"
    )
    parser.add_argument("--seqlen", type=int, default=None, help="block8b: calibration sequence length")
    parser.add_argument("--budget-s", type=float, default=None, help="block8b: start no case after this")
    parser.add_argument("--quick", action="store_true", help="block8b: tiny block on the CPU (smoke test)")
    parser.add_argument(
        "--tokenizer", default=None, help="block8b: a folder of SmolLM2's tokenizer files instead of --gguf"
    )
    parser.add_argument("--max-windows", type=int, default=None)
    parser.add_argument("--resume-case", default="1x16:noft", help="scheme:ft|noft for --part resume")
    parser.add_argument("--kill-after", type=int, default=10, help="blocks checkpointed before the kill")
    parser.add_argument("--work", default="/tmp/aqlm-bench")
    parser.add_argument("--name", default=None, help="JSON name (aqlm_block8b for block8b alone, else aqlm)")
    args = parser.parse_args()
    if not args.gguf and not (args.part == ["layer"] and args.inputs) and args.part != ["block8b"]:
        parser.error("--gguf is needed (only --part layer with --inputs runs without it)")
    if args.name is None:
        args.name = "aqlm_block8b" if args.part == ["block8b"] else "aqlm"
    if args.cases is None:
        args.cases = "1x16:ft" if args.part == ["block8b"] else "1x16:ft,1x16:noft,2x8:ft,2x8:noft"
    if args.seqlen is None:
        args.seqlen = 128 if args.quick else 2048
    if args.quick:  # bounded, so that a smoke test on a busy 2-core machine stays near a minute
        args.max_epochs = 3 if args.max_epochs is None else args.max_epochs
        args.finetune_epochs = 2 if args.finetune_epochs is None else args.finetune_epochs
    out = {
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
    }
    if args.calib_tokens is None and ("layer" in args.part or "block8b" in args.part):
        args.calib_tokens = 256 if args.quick else 131_072
    parts = {
        "layer": part_layer,
        "smollm2": part_smollm2,
        "resume": part_resume,
        "block8b": lambda args, out: part_block8b(args, out, lambda doc: write(args, doc)),
    }
    for part in args.part:
        try:
            parts[part](args, out)
        except Exception as exc:  # noqa: BLE001 - keep what the other parts measured
            out[f"{part}_error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
            log(out[f"{part}_error"])
        write(args, out)


def write(args, out: dict) -> None:
    Path(args.out).mkdir(parents=True, exist_ok=True)
    # --quick runs on the CPU; the report leaves ..._quick.json out
    gpu = "cpu_quick" if args.quick else (out["gpu"] or "cpu").lower().replace(" ", "-")
    (Path(args.out) / f"{args.name}_{gpu}.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
