"""GPTQ calibration time per layer at Llama-3-8B shapes: qconv's solve against llm-compressor's
(issues 17 and 19: "calibration time per layer reported next to llm-compressor's GPTQ on the same
machine", "calibration is not the bottleneck on an 8B model").

What is measured, per Linear shape of a Llama-3-8B decoder block (q_proj / o_proj 4096x4096,
k_proj / v_proj 1024x4096, gate_proj / up_proj 14336x4096, down_proj 4096x14336; each shape timed
once, the block's seven Linears counted by their shape), on the SAME weight and ``H``:

- ``qconv-ct-w4a16-g128``: qconv's GPTQ (formats/gptq.py) exactly as a conversion calls it:
  ``fmt.gptq_layer(weight, xtx, recipe)`` of ``formats/uniform_calibrated.prepare`` for
  ``--method compressed-tensors --scheme W4A16 --calibration wikitext2`` (symmetric int4, groups of
  128, scales in bf16; the recipe is the format's own ``make_recipe`` plus the working dtype the
  pipeline adds). The clock covers ``gptq_layer`` (the solve and its stored tensors);
  ``calibrate_s`` adds ``fmt.dequantize`` and ``output_error``, as the manifest's ``calibrate_s``
  of a conversion does.
- ``qconv-hqq-4bit-g64``: the same for ``--method hqq --bits 4 --group-size 64 --calibration
  wikitext2`` (asymmetric, float zero, groups of 64).
- ``llmcompressor-actorder-static`` / ``llmcompressor-actorder-none``: llm-compressor 0.14.0.1's
  own solve, ``llmcompressor.modifiers.gptq.gptq_quantize.quantize_weight``, unmodified, called as
  ``GPTQModifier.compress_module_list`` calls it: scheme W4A16 (compressed-tensors' preset: int4,
  symmetric, group 128), actorder ``static`` (GPTQModifier's default, ``resolve_actorder``) or
  ``None`` (qconv's column order), ``blocksize`` 128 and ``percdamp`` 0.01 (GPTQModifier's
  ``block_size`` / ``dampening_frac`` defaults), the weight stacked as float32 ``[1, out, in]`` (its
  ``prepare_batch``), scale and zero point from the weight's observer as initialize_observer picks
  it for weights (``memoryless_minmax`` on the bf16 weight, then ``get_qparams``). On CUDA its solve
  takes its fused Triton block update where its own ``_gptq_block_update_triton_req`` allows (the
  JSON's ``backend``); ``llmcompressor-actorder-static-eager`` (cuda only) sets
  ``LLMCOMPRESSOR_DISABLE_GPTQ_TRITON=1``, its own switch, to time its eager Torch path too. The
  clock covers ``quantize_weight``; the observer's seconds are recorded beside it
  (``observer_s``): llm-compressor computes them once per module before the solve.

Each case runs once untimed (warm-up: CUDA context, cuBLAS/cuSOLVER handles, Triton compilation),
then ``--repeats`` timed runs (median and all recorded), with ``torch.cuda.synchronize()`` before
starting and before reading the clock. Quality beside speed: each case's
``tr((W - Q) H (W - Q)^T) / tr(W H W^T)`` (qconv's ``formats.gptq.output_error``, float64).

Inputs (seeded, ``--seed``): W random normal, std 0.02, rounded to bf16 (the 8B's weights are
bf16). ``H = X^T X / tokens`` in float64, handed over as float32 (what qconv's
``InputStatistics.pop`` gives; GPTQ's result does not depend on H's scale, so llm-compressor's own
``2 X^T X / samples`` normalisation would give the same solve) from ``--tokens`` (16384) made-up
activation rows with the structure of a transformer's Linear inputs: per-channel scales
log-normal (sigma 0.5); a shared low-rank part (rank 64, 0.5 of the variance), so channels are
correlated as real hidden states are; 0.25% outlier channels (at least 2) scaled x20, the
"emergent outlier features" of Dettmers et al. 2022 (LLM.int8(), arXiv:2208.07339), which GPTQ's
error feedback and act-order are sensitive to. ``calibration_input`` in the JSON says so.

The 8B estimate: 32 blocks x the sum, over the block's seven Linears, of the median solve seconds
of their shape. It EXCLUDES the accumulation of X^T X, the block forwards, reading and writing the
model (what a conversion adds), and llm-compressor's batching of same-shape modules
(``batched_quantization="auto"``, which solves k/v and gate/up of a block in one batched call).

llm-compressor on the GPU machine: importing ``llmcompressor`` runs its package ``__init__``
(logger setup, ``llmcompressor.entrypoints``: oneshot with datasets, accelerate, auto-round, ...),
none of which the solve uses and several of which that machine lacks. So :func:`load_llmcompressor`
registers the packages ``llmcompressor``, ``llmcompressor.modifiers``,
``llmcompressor.modifiers.gptq`` and ``llmcompressor.observers`` as plain module objects with only
``__path__`` (and ``__spec__``) set, pointing at the installed source folders, and then imports the
real submodules ``llmcompressor.modifiers.gptq.gptq_quantize`` (with its ``helpers``),
``llmcompressor.observers.base`` and ``llmcompressor.observers.min_max`` (which registers
``memoryless_minmax``) by the normal import system. Bypassed: only those four ``__init__.py`` files
(``llmcompressor/__init__.py``: logger, session, entrypoints; ``modifiers/__init__.py``: the
Modifier base classes; ``modifiers/gptq/__init__.py``: re-exports ``GPTQModifier`` from ``base.py``;
``observers/__init__.py``: re-exports every observer, whose ``mse`` pulls ``llmcompressor.utils`` ->
``llmcompressor.typing`` -> ``datasets``). Every function that runs is llm-compressor's and compressed-tensors' unmodified
code. ``bench/pack_lcsite.sh`` fills ``.dev/lcsite`` with those packages for CPython 3.12; put it
FIRST on PYTHONPATH, so that llm-compressor gets the compressed-tensors it pins (0.19.0), not
another one installed. ``--lc-path DIR`` inserts DIR at the front of ``sys.path`` for the same.

    python bench/run_gptq_layer.py --out $OUT --device cuda             # GPU machine
    python bench/run_gptq_layer.py --out /tmp/out --quick --device cpu  # CPU smoke test

``--quick``: small shapes (the same ratios / 16), 1024 tokens, 1 repeat; the JSON is named
``gptq_layer_<device>_quick.json`` and the report leaves it out. The JSON
(``gptq_layer_<device>.json``, device as bench/run_bench.py's ``gpu_slug`` names it) is written
after every case.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import statistics
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

#: Llama-3-8B (meta-llama/Meta-Llama-3-8B config.json: hidden 4096, intermediate 14336, 32 heads,
#: 8 kv heads of 128): a block's Linears, (out, in)
BLOCK_LINEARS = {
    "q_proj": (4096, 4096),
    "k_proj": (1024, 4096),
    "v_proj": (1024, 4096),
    "o_proj": (4096, 4096),
    "gate_proj": (14336, 4096),
    "up_proj": (14336, 4096),
    "down_proj": (4096, 14336),
}
BLOCKS = 32
QUICK_DIVISOR = 16
CASES = (
    "qconv-ct-w4a16-g128",
    "qconv-hqq-4bit-g64",
    "llmcompressor-actorder-static",
    "llmcompressor-actorder-none",
    "llmcompressor-actorder-static-eager",
)
#: structure of the made-up activations (module doc)
LOW_RANK = 64
LOW_RANK_SHARE = 0.5
SCALE_SIGMA = 0.5
OUTLIER_FRACTION = 0.0025
OUTLIER_GAIN = 20.0
WEIGHT_STD = 0.02


def shapes(quick: bool) -> dict[tuple[int, int], list[str]]:
    """Distinct (out, in) shapes -> the block's Linears of that shape."""
    found: dict[tuple[int, int], list[str]] = {}
    for name, (rows, cols) in BLOCK_LINEARS.items():
        shape = (rows // QUICK_DIVISOR, cols // QUICK_DIVISOR) if quick else (rows, cols)
        found.setdefault(shape, []).append(name)
    return found


def make_weight(shape: tuple[int, int], seed: int, device):
    import torch

    generator = torch.Generator(device="cpu").manual_seed(seed)
    weight = torch.randn(shape, generator=generator, dtype=torch.float32) * WEIGHT_STD
    return weight.to(torch.bfloat16).to(device)


def make_xtx(columns: int, tokens: int, seed: int, device):
    """``H = X^T X / tokens`` (float64 sum, float32 result) of made-up activations (module doc)."""
    import torch

    generator = torch.Generator(device="cpu").manual_seed(seed)
    scales = torch.exp(torch.randn(columns, generator=generator, dtype=torch.float64) * SCALE_SIGMA)
    outliers = max(2, round(columns * OUTLIER_FRACTION))
    outlier_channels = torch.randperm(columns, generator=generator)[:outliers]
    scales[outlier_channels] *= OUTLIER_GAIN
    mixing = torch.randn(LOW_RANK, columns, generator=generator, dtype=torch.float64) / LOW_RANK**0.5
    scales, mixing = scales.to(device), mixing.to(device)
    xtx = torch.zeros(columns, columns, dtype=torch.float64, device=device)
    chunk = 2048
    for start in range(0, tokens, chunk):
        rows = min(chunk, tokens - start)
        shared = torch.randn(rows, LOW_RANK, generator=generator, dtype=torch.float64).to(device) @ mixing
        own = torch.randn(rows, columns, generator=generator, dtype=torch.float64).to(device)
        x = (LOW_RANK_SHARE**0.5 * shared + (1 - LOW_RANK_SHARE) ** 0.5 * own) * scales
        x = x.to(torch.bfloat16).to(torch.float64)  # a block's Linear inputs are bf16
        xtx.addmm_(x.t(), x)
    return (xtx / tokens).to(torch.float32), outlier_channels.tolist()


# --- llm-compressor -------------------------------------------------------------------------------


def load_llmcompressor():
    """llm-compressor's GPTQ solve, observers and compressed-tensors' W4A16 preset, without running
    llmcompressor's package ``__init__`` files (module doc)."""
    spec = importlib.util.find_spec("compressed_tensors")  # fails plainly when it is absent
    if spec is None:
        raise SystemExit(
            "compressed_tensors is not importable: run bench/pack_lcsite.sh, put .dev/lcsite first"
        )
    root = None
    for entry in sys.path:
        candidate = Path(entry or ".") / "llmcompressor"
        if (candidate / "modifiers" / "gptq" / "gptq_quantize.py").is_file():
            root = candidate
            break
    if root is None:
        raise SystemExit("llmcompressor's source is not on sys.path: run bench/pack_lcsite.sh")
    for name, folder in (
        ("llmcompressor", root),
        ("llmcompressor.modifiers", root / "modifiers"),
        ("llmcompressor.modifiers.gptq", root / "modifiers" / "gptq"),
        ("llmcompressor.observers", root / "observers"),
    ):
        if name in sys.modules:
            continue
        package = types.ModuleType(name)
        package.__path__ = [str(folder)]
        package.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        package.__spec__.submodule_search_locations = [str(folder)]
        sys.modules[name] = package
    gptq_quantize = importlib.import_module("llmcompressor.modifiers.gptq.gptq_quantize")
    importlib.import_module("llmcompressor.observers.min_max")  # registers "memoryless_minmax"
    observers = importlib.import_module("llmcompressor.observers.base")
    import compressed_tensors
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme

    return gptq_quantize, observers, preset_name_to_scheme, compressed_tensors, root


def lc_versions(root: Path, compressed_tensors) -> dict:
    import importlib.metadata as md

    versions = {}
    for dist in ("llmcompressor", "compressed-tensors", "pydantic", "loguru"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    versions["llmcompressor_path"] = str(root)
    versions["compressed_tensors_path"] = str(Path(compressed_tensors.__file__).parent)
    return versions


def lc_solver(lc, actorder: str | None, eager: bool, device):
    """``solve(weight, xtx) -> (dequantized, seconds, extra)`` by llm-compressor's quantize_weight."""
    import torch

    gptq_quantize, observers, preset_name_to_scheme, _, _ = lc
    from compressed_tensors.quantization import ActivationOrdering

    scheme = preset_name_to_scheme("W4A16", ["Linear"])
    args = scheme.weights.model_copy()
    args.actorder = ActivationOrdering(actorder) if actorder else None
    block_size, percdamp = 128, 0.01  # GPTQModifier.block_size / dampening_frac defaults

    def solve(weight, xtx):
        if eager:
            os.environ["LLMCOMPRESSOR_DISABLE_GPTQ_TRITON"] = "1"
        else:
            os.environ.pop("LLMCOMPRESSOR_DISABLE_GPTQ_TRITON", None)
        with torch.no_grad():
            sync(weight.device)
            started = time.perf_counter()
            # initialize_observer: weights get "memoryless_minmax" when the args name none
            observer = observers.Observer.load_from_registry(
                args.observer or "memoryless_minmax", base_name="weight", args=args
            )
            observer(weight)
            qparams = observer.get_qparams()
            sync(weight.device)
            observed = time.perf_counter()
            weights = weight.to(torch.float32).unsqueeze(0)  # prepare_batch: stacked, GPTQ_PRECISION
            hessians = xtx.unsqueeze(0).clone()
            scales = qparams["scale"].unsqueeze(0)
            zero_points = qparams["zero_point"].unsqueeze(0)
            sync(weight.device)
            solve_start = time.perf_counter()
            quantized, losses, fallback = gptq_quantize.quantize_weight(
                weights=weights,
                hessians=hessians,
                scale=scales,
                zero_point=zero_points,
                global_scale=None,
                quant_args=args,
                blocksize=block_size,
                percdamp=percdamp,
            )
            sync(weight.device)
            done = time.perf_counter()
        extra = {
            "observer_s": round(observed - started, 4),
            "rtn_fallback": bool(fallback.any()),
            "loss": float(losses.sum()),
        }
        return quantized[0].to(weight.dtype), done - solve_start, extra

    settings = {
        "backend": lc_backend(lc, device, eager, args),
        "quant_args": args.model_dump(mode="json"),
        "blocksize": block_size,
        "percdamp": percdamp,
        "observer": args.observer or "memoryless_minmax",
        "llmcompressor_disable_gptq_triton": eager,
    }
    return solve, settings


def lc_backend(lc, device, eager: bool, args) -> str:
    """Which block update llm-compressor's dispatch takes, asked of its own requirement check
    (``_gptq_block_update_triton_req``) on a block of the shape its solve uses."""
    import torch

    gptq_quantize = lc[0]
    if eager:
        os.environ["LLMCOMPRESSOR_DISABLE_GPTQ_TRITON"] = "1"
    else:
        os.environ.pop("LLMCOMPRESSOR_DISABLE_GPTQ_TRITON", None)
    block = torch.zeros(1, 16, 128, device=device)
    hinv = torch.zeros(1, 128, 128, device=device)
    triton = gptq_quantize._gptq_block_update_triton_req(
        block, hinv, block, block, block, scale=None, zero_point=None, global_scale=None, g_idx=None,
        quant_args=args, i1=0,
    )  # fmt: skip
    os.environ.pop("LLMCOMPRESSOR_DISABLE_GPTQ_TRITON", None)
    if triton:
        return "triton (its fused block update)"
    return "eager (LLMCOMPRESSOR_DISABLE_GPTQ_TRITON=1)" if eager else f"eager (no triton on {device.type})"


# --- qconv ------------------------------------------------------------------------------------------


def qconv_solver(method: str, options: dict):
    """``solve(weight, xtx)`` by the format's ``gptq_layer`` as uniform_calibrated.prepare calls it."""
    from qconv.formats.base import get_format
    from qconv.formats.gptq import output_error

    fmt = get_format(method)
    recipe = fmt.make_recipe({**options, "calibration": "wikitext2"})
    recipe.update({"dtype": "bfloat16", "skip": [], "label": fmt.label(recipe)})

    def solve(weight, xtx):
        sync(weight.device)
        started = time.perf_counter()
        tensors = fmt.gptq_layer(weight, xtx, recipe)
        sync(weight.device)
        seconds = time.perf_counter() - started
        approx = fmt.dequantize(tensors, recipe)
        output_error(weight, approx, xtx)  # uniform_calibrated.prepare's calibrate_s includes these
        sync(weight.device)
        return approx, seconds, {"calibrate_s": round(time.perf_counter() - started, 4)}

    settings = {k: v for k, v in recipe.items() if k != "calibration"}
    return solve, settings


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda; cpu with --quick)")
    parser.add_argument("--quick", action="store_true", help="small shapes, CPU smoke test")
    parser.add_argument(
        "--tokens", type=int, default=None, help="activation rows behind H (16384; quick 1024)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed runs a case (3; quick 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", default=None, help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--lc-path", type=Path, default=None, help="put this first on sys.path (.dev/lcsite)")
    ns = parser.parse_args()
    if ns.lc_path is not None:
        sys.path.insert(0, str(ns.lc_path.resolve()))
    import torch
    from run_bench import environment, gpu_slug, write_json

    from qconv.formats.gptq import output_error

    device_name = ns.device or ("cpu" if ns.quick else "cuda")
    device = torch.device(device_name)
    tokens = ns.tokens or (1024 if ns.quick else 16384)
    repeats = ns.repeats or (1 if ns.quick else 3)
    cases = (
        ns.cases.split(",") if ns.cases else [c for c in CASES if device.type == "cuda" or "eager" not in c]
    )
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        raise SystemExit(f"unknown case(s): {', '.join(unknown)}")
    lc = load_llmcompressor() if any(c.startswith("llmcompressor") for c in cases) else None
    slug = gpu_slug(device_name)
    path = ns.out / f"gptq_layer_{slug}{'_quick' if ns.quick else ''}.json"
    found = shapes(ns.quick)
    doc: dict = {
        "what": "GPTQ solve seconds per Linear shape of a Llama-3-8B block: qconv's formats/gptq.py through "
        "the formats' gptq_layer, and llm-compressor's own quantize_weight, on the same W and H",
        "device": slug,
        "quick": ns.quick,
        "environment": environment(device_name, ("transformers",)),
        "llmcompressor": lc_versions(lc[4], lc[3]) if lc else None,
        "torch_threads": torch.get_num_threads(),
        "repeats": repeats,
        "seed": ns.seed,
        "weights": f"random normal, std {WEIGHT_STD}, rounded to bf16",
        "calibration_input": {
            "what": "made-up activations, H = X^T X / tokens (float64 sum, float32): per-channel scales "
            f"log-normal sigma {SCALE_SIGMA}; a shared rank-{LOW_RANK} part carrying {LOW_RANK_SHARE} of the "
            f"variance; {OUTLIER_FRACTION:.2%} outlier channels (at least 2) x{OUTLIER_GAIN:g}; rows rounded "
            "to bf16. NOT a real model's activations.",
            "tokens": tokens,
        },
        "timing": "median of the timed runs after one untimed warm-up; torch.cuda.synchronize before "
        "starting and before reading the clock on cuda",
        "excludes": "X^T X accumulation, block forwards, reading and writing the model, llm-compressor's "
        "batching of same-shape modules",
        "shapes": {f"{r}x{c}": names for (r, c), names in found.items()},
        "settings": {},
        "results": {},
    }

    def save() -> None:
        write_json(path, doc, indent=1)

    solvers = {}
    for case in cases:
        if case == "qconv-ct-w4a16-g128":
            solvers[case] = qconv_solver("compressed-tensors", {"scheme": "W4A16"})
        elif case == "qconv-hqq-4bit-g64":
            solvers[case] = qconv_solver("hqq", {"bits": 4, "group_size": 64})
        else:
            eager = case.endswith("-eager")
            actorder = "static" if "static" in case else None
            solve, settings = lc_solver(lc, actorder, eager, device)
            solvers[case] = (solve, settings)
        doc["settings"][case] = solvers[case][1]
    save()
    for index, ((rows, cols), names) in enumerate(found.items()):
        key = f"{rows}x{cols}"
        weight = make_weight((rows, cols), ns.seed * 1000 + index, device)
        xtx, outliers = make_xtx(cols, tokens, ns.seed * 1000 + 500 + index, device)
        entry = doc["results"].setdefault(
            key, {"layers": names, "outlier_channels": len(outliers), "cases": {}}
        )
        for case in cases:
            solve = solvers[case][0]
            solve(weight, xtx)  # warm-up
            times, extra = [], {}
            for _ in range(repeats):
                approx, seconds, extra = solve(weight, xtx)
                times.append(seconds)
            error = output_error(weight, approx, xtx)
            entry["cases"][case] = {
                "solve_s": round(statistics.median(times), 4),
                "solve_s_all": [round(t, 4) for t in times],
                "rel_output_error": error,
                **extra,
            }
            print(f"{key:>11} {case:<38} {statistics.median(times):9.3f} s  error {error:.5f}", flush=True)
            save()
        del weight, xtx
        if device.type == "cuda":
            torch.cuda.empty_cache()
    estimate = {}
    for case in cases:
        per_block = 0.0
        for entry in doc["results"].values():
            timed = entry["cases"].get(case)
            if timed is None:
                per_block = None
                break
            per_block += timed["solve_s"] * len(entry["layers"])
        if per_block is not None:
            estimate[case] = {"block_s": round(per_block, 3), "model_s": round(per_block * BLOCKS, 1)}
    doc["estimate_8b"] = {
        "what": f"{BLOCKS} blocks x the sum over a block's 7 Linears of their shape's median solve seconds; "
        "excludes X^T X accumulation, forwards, model reading/writing, llm-compressor's batching"
        + (" (quick shapes: NOT an 8B estimate)" if ns.quick else ""),
        "cases": estimate,
    }
    save()
    for case, value in estimate.items():
        print(f"8B estimate {case:<38} {value['model_s']:9.1f} s ({value['block_s']:.3f} s a block)")
    print(path)


if __name__ == "__main__":
    main()
