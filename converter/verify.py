"""How far each layer moved, whether the files are intact, and whether the real loader agrees.

Three checks, each a dict ``{"name", "passed", "detail"}`` in the report:
- ``files``: every file's sha256 equals the manifest's (a flipped byte names its file);
- ``layers``: every quantized layer's error against the source is finite and within
  ``--max-rel-error`` when given;
- ``loader``: the artifact loaded by the real loader (stock transformers for bnb) gives the same
  logits as qconv's own dequantized reference on fixed prompts; its top-1 agreement and KL
  against the source model are reported alongside.

An artifact imported from an already quantized model (``recipe.imported_from``) has no float
source: its ``layers`` check is that every layer decodes to finite weights, and its ``loader``
check that ``qconv.load_model`` runs it to finite logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qconv import gguf_export, llamacpp
from qconv.artifact import Artifact
from qconv.environment import resolve_device
from qconv.errors import QconvError, SourceError, UsageError
from qconv.files import sha256_file
from qconv.loader import load_model
from qconv.manifest import MANIFEST_NAME, imported_from
from qconv.modeling import reference_model
from qconv.sources import Source, open_source
from qconv.sources.hub import HubSource, cached_snapshot

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:",
    "Quantization reduces the memory a language model needs by",
)
RANDOM_PROMPT_LENGTH = 16


def layer_error(reference: torch.Tensor, dequantized: torch.Tensor) -> dict[str, float]:
    """Relative Frobenius error, max abs error and SNR (dB) of a layer, in float32."""
    ref = reference.to(torch.float32)
    diff = dequantized.to(device=ref.device, dtype=torch.float32) - ref
    zero = torch.zeros((), device=ref.device)
    # one device-to-host transfer for the three numbers
    ref_norm, diff_norm, max_abs = torch.stack(
        [
            torch.linalg.vector_norm(ref),
            torch.linalg.vector_norm(diff),
            diff.abs().max() if diff.numel() else zero,
        ]
    ).tolist()
    rel = diff_norm / ref_norm if ref_norm > 0 else (0.0 if diff_norm == 0 else math.inf)
    snr = 20 * math.log10(ref_norm / diff_norm) if diff_norm > 0 and ref_norm > 0 else math.inf
    return {"rel_error": rel, "max_abs": max_abs, "snr_db": snr}


@dataclass
class VerifyReport:
    path: str
    checks: list[dict[str, Any]] = field(default_factory=list)
    layers: dict[str, dict] = field(default_factory=dict)
    logits: dict[str, Any] | None = None
    max_rel_error: float | None = None
    source: str | None = None  # what the layers and logits were compared with (None: nothing)
    artifact_id: str | None = None  # its registry row, when recorded (set by qconv.Qconv.verify)

    @property
    def passed(self) -> bool:
        return all(c["passed"] for c in self.checks)

    def add(self, name: str, passed: bool, detail: str) -> None:
        self.checks.append({"name": name, "passed": bool(passed), "detail": detail})

    def worst_layers(self, n: int | None = None) -> list[tuple[str, dict]]:
        ranked = sorted(self.layers.items(), key=lambda kv: -_sortable(kv[1]["rel_error"]))
        return ranked[:n] if n else ranked

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "passed": self.passed,
            "checks": self.checks,
            "max_rel_error": self.max_rel_error,
            "logits": self.logits,
            "source": self.source,
            "layers": {k: _json_safe(v) for k, v in self.worst_layers()},
        }

    def manifest_entry(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "checks": self.checks,
            "max_rel_error": self.max_rel_error,
            "logits": self.logits,
        }


def _sortable(x: float | None) -> float:
    return math.inf if x is None or math.isnan(x) else x


def _json_safe(values: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}


# -- files ------------------------------------------------------------------------------------
def check_files(folder: Path, files: dict[str, dict], report: VerifyReport) -> None:
    bad = []
    for name, expected in sorted(files.items()):
        path = folder / name
        if not path.is_file():
            bad.append(f"{name} is missing")
        elif path.stat().st_size != expected["size"] or sha256_file(path) != expected["sha256"]:
            bad.append(f"{name} does not match its sha256")
    if bad:
        report.add("files", False, "; ".join(bad))
    else:
        report.add("files", True, f"{len(files)} files match their sha256")


# -- layers -----------------------------------------------------------------------------------
def check_max_rel_error(max_rel_error: float | None) -> None:
    """The one validator of ``--max-rel-error`` (None: no limit)."""
    if max_rel_error is not None and not max_rel_error > 0:
        raise UsageError("{option} must be positive", option="max_rel_error")


def check_layers(layers: dict[str, dict], max_rel_error: float | None, report: VerifyReport) -> None:
    report.layers = layers
    report.max_rel_error = max_rel_error
    if not layers:
        report.add("layers", False, "no quantized layer recorded")
        return
    # None: an error written as null (JSON has no NaN), so not a finite one either
    bad = [name for name, e in layers.items() if e["rel_error"] is None or not math.isfinite(e["rel_error"])]
    if bad:
        report.add("layers", False, f"{len(bad)} layers have non-finite error, first {bad[0]}")
        return
    worst_name, worst = report.worst_layers(1)[0]
    if max_rel_error is not None and worst["rel_error"] > max_rel_error:
        over = sum(1 for e in layers.values() if e["rel_error"] > max_rel_error)
        report.add(
            "layers",
            False,
            f"{over} layers exceed --max-rel-error {max_rel_error:g}; worst {worst_name} {worst['rel_error']:.4g}",
        )
    else:
        report.add(
            "layers", True, f"{len(layers)} layers, worst {worst_name} rel error {worst['rel_error']:.4g}"
        )


def check_decodes(artifact: Artifact, report: VerifyReport) -> None:
    """Every quantized layer decodes from the files to finite weights (for imported artifacts,
    which have no float source to measure errors against)."""
    bad = []
    for module in artifact.layers:
        try:
            weight = artifact.dequantize(module)
        except QconvError as exc:
            report.add("layers", False, f"layer {module}: {str(exc).splitlines()[0]}")
            return
        if not torch.isfinite(weight).all():
            bad.append(module)
    if bad:
        report.add("layers", False, f"{len(bad)} layers decode to non-finite weights, first {bad[0]}")
    elif not artifact.layers:
        report.add("layers", False, "no quantized layer recorded")
    else:
        report.add(
            "layers",
            True,
            f"{len(artifact.layers)} layers decode to finite weights (imported: errors unknown)",
        )


def recompute_layer_errors(
    artifact: Artifact, source: Source, device: torch.device, progress=None
) -> dict[str, dict]:
    """Dequantize every layer from the artifact's files and compare with the source, anew."""
    if artifact.format.container == "gguf":
        return _recompute_gguf_errors(artifact, source, device, progress)
    dtype = getattr(torch, artifact.recipe.get("dtype", "bfloat16"))
    infos = {t.name: t for t in source.tensors()}
    errors = {}
    for module, recorded in artifact.layers.items():
        key = f"{module}.weight"
        if key not in infos:
            raise SourceError(f"{source.ref}: the source has no tensor {key!r}")
        reference = source.read(key).to(device=device, dtype=dtype)
        dequantized = artifact.format.dequantize(
            {k: v.to(device) for k, v in artifact.layer_tensors(module).items()}, artifact.recipe
        )
        errors[module] = {
            **layer_error(reference, dequantized),
            "shape": list(reference.shape),
            "format": recorded.get("format"),
        }
        if progress:
            progress.advance("verify")
    return errors


def _recompute_gguf_errors(
    artifact: Artifact, source: Source, device: torch.device, progress=None
) -> dict[str, dict]:
    """A GGUF artifact's layers read back from its bytes (the ``gguf`` package's dequantizer,
    llama.cpp's row permutation undone: :class:`qconv.gguf_export.StoredGGUF`), compared with
    the source's float weights."""
    infos = {t.name: t for t in source.tensors()}
    stored = _stored_gguf(artifact, source)
    errors = {}
    for module, recorded in artifact.layers.items():
        key = f"{module}.weight"
        if key not in infos:
            raise SourceError(f"{source.ref}: the source has no tensor {key!r}")
        reference = source.read(key).to(device=device, dtype=torch.float32)
        value = stored.read(key, tuple(infos[key].shape)).to(device)
        errors[module] = {
            **layer_error(reference, value),
            "shape": list(reference.shape),
            "format": recorded.get("format"),
        }
        if progress:
            progress.advance("verify")
    return errors


def _stored_gguf(artifact: Artifact, source: Source) -> gguf_export.StoredGGUF:
    import tempfile

    paths = [artifact.folder / name for name in sorted(artifact.manifest["files"]) if name.endswith(".gguf")]
    with tempfile.TemporaryDirectory(prefix="qconv-verify-") as scratch:
        model = gguf_export.describe_source(source, Path(scratch))
    return gguf_export.StoredGGUF(paths, model)


# -- the real loader --------------------------------------------------------------------------
#: What a loader that fails on the artifact raises, which fails the loader check: qconv's own
#: errors (a malformed folder), an optional library that is missing (ImportError), unreadable
#: files (OSError) and the libraries' refusals (transformers, hqq and aqlm raise ValueError or
#: RuntimeError, torch's size mismatches and out-of-memory are RuntimeErrors). Any other
#: exception raised inside one of the loaders' own libraries (``LOADER_LIBRARIES``) fails the check
#: too: transformers' Falcon initialises the weight of every Linear subclass by ``module.weight``,
#: which compressed-tensors' compressed modules no longer have (an AttributeError). One raised
#: anywhere else (qconv, a format registered from elsewhere) is a bug and propagates.
LOADER_ERRORS = (QconvError, ImportError, OSError, ValueError, RuntimeError)
#: the top-level packages of the real loaders and what they run on
LOADER_LIBRARIES = frozenset(
    {"transformers", "torch", "compressed_tensors", "hqq", "aqlm", "bitsandbytes", "llama_cpp", "safetensors",
     "accelerate", "gguf", "triton"}
)  # fmt: skip


def _raised_by_a_library(exc: BaseException) -> bool:
    """Whether ``exc`` was raised by the code of one of ``LOADER_LIBRARIES`` (its innermost frame)."""
    if not isinstance(exc, Exception):
        return False  # KeyboardInterrupt, SystemExit: never a loader's verdict
    traceback = exc.__traceback__
    while traceback is not None and traceback.tb_next is not None:
        traceback = traceback.tb_next
    if traceback is None:
        return False
    module = traceback.tb_frame.f_globals.get("__name__") or ""
    return module.partition(".")[0] in LOADER_LIBRARIES


def _loader_failed(exc: BaseException, report: VerifyReport) -> None:
    """Record a failed real loader in ``report``, or re-raise a bug of qconv's own."""
    if not isinstance(exc, LOADER_ERRORS) and not _raised_by_a_library(exc):
        raise exc
    report.add(
        "loader",
        False,
        f"the real loader failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}",
    )


def prompt_ids(folder: Path, vocab_size: int) -> list[torch.Tensor]:
    """Fixed prompts: the artifact's tokenizer when it has one, else fixed random ids."""
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        ids = [tokenizer(p, return_tensors="pt").input_ids for p in PROMPTS]
        if all(i.numel() > 1 and int(i.max()) < vocab_size for i in ids):
            return ids
    except Exception:  # noqa: BLE001 - no usable tokenizer: fall back to fixed ids
        pass
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab_size, (1, RANDOM_PROMPT_LENGTH), generator=generator) for _ in PROMPTS]


@torch.no_grad()
def _logits(model, prompts: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    return [model(input_ids=p.to(device)).logits[0].float().cpu() for p in prompts]


def next_token_divergence(reference_logits: torch.Tensor, logits: torch.Tensor) -> tuple[float, int]:
    """Over the positions (rows) of two logits tensors: the summed KL(reference || other) of
    their next-token distributions, and how many positions put the same token first. Sums, so
    that ``qconv eval`` can add windows up and divide once; verify and eval both use it."""
    log_p = torch.log_softmax(reference_logits.float(), dim=-1)
    log_q = torch.log_softmax(logits.float(), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum().item()
    same_top1 = int((reference_logits.argmax(-1) == logits.argmax(-1)).sum().item())
    return kl, same_top1


def logits_comparison(artifact: Artifact, source: Source, device: torch.device) -> dict[str, Any]:
    """Source logits, qconv's dequantized reference, and the real loader's, on the same prompts."""
    if artifact.format.container == "gguf":
        return _gguf_logits_comparison(artifact, source, device)
    model = reference_model(source, device, getattr(torch, artifact.recipe.get("dtype", "float32")))
    prompts = prompt_ids(artifact.folder, model.config.vocab_size)
    source_logits = _logits(model, prompts, device)
    modules = dict(model.named_modules())
    for module in artifact.layers:
        weight = modules[module].weight
        weight.data = artifact.dequantize(module).to(device=device, dtype=torch.float32)
    # a method whose runtime quantizes each layer's input (W8A8) has the reference do the same
    quantize_input = artifact.format.input_quantizer(artifact.recipe)
    if quantize_input is not None:
        for module in artifact.layers:
            modules[module].register_forward_pre_hook(lambda _m, args: (quantize_input(args[0]), *args[1:]))
    stored = artifact.unquantized_keys()
    for name, param in model.named_parameters():  # as stored: rounded, or fine-tuned (aqlm's norms)
        if name in stored:
            param.data = artifact.read(name).to(device=device, dtype=torch.float32)
    reference_logits = _logits(model, prompts, device)
    del model, modules
    # eval(): dropout (OPT's 0.1, say) would otherwise perturb the loaded model's logits
    loaded = artifact.format.load_pretrained(artifact.folder, device, torch.float32).eval()
    loaded_logits = _logits(loaded, prompts, device)
    del loaded

    loaded_all, reference_all, source_all = (
        torch.cat(x) for x in (loaded_logits, reference_logits, source_logits)
    )
    loader_rel = (
        torch.linalg.vector_norm(loaded_all - reference_all) / torch.linalg.vector_norm(reference_all)
    ).item()
    kl_sum, same_top1 = next_token_divergence(source_all, loaded_all)
    kl, top1 = kl_sum / source_all.shape[0], same_top1 / source_all.shape[0]
    return {
        "prompts": len(prompts),
        "tokens": int(sum(p.numel() for p in prompts)),
        "loader_rel_diff": loader_rel,
        "loader_max_abs_diff": (loaded_all - reference_all).abs().max().item(),
        "loader_top1_vs_reference": (loaded_all.argmax(-1) == reference_all.argmax(-1)).float().mean().item(),
        "top1_agreement": top1,
        "kl": kl,
        "finite": bool(torch.isfinite(loaded_all).all()),
    }


def _gguf_logits_comparison(artifact: Artifact, source: Source, device: torch.device) -> dict[str, Any]:
    """llama.cpp (llama-cpp-python) runs the file; qconv's reference is the source model in
    float32 with every stored weight replaced by the file's values (dequantized by the ``gguf``
    package); the source runs in float32 as it is. All three see the token ids llama.cpp's own
    tokenizer gives the prompts."""
    path = artifact.gguf_file
    with llamacpp.open_llama(path, n_ctx=256) as llm:
        prompts = [torch.tensor([llm.tokenize(p.encode("utf-8"), add_bos=True)]) for p in PROMPTS]
        loaded_logits = [torch.from_numpy(llamacpp.logits(llm, ids[0].tolist())) for ids in prompts]
    # qconv's reference: the source model computing in float32, every weight the file stores
    # quantized replaced by what it stores (read back from the bytes), norms and biases as they are
    model = reference_model(source, device, torch.float32)
    source_logits = _logits(model, prompts, device)
    stored = _stored_gguf(artifact, source)
    parameters = dict(model.named_parameters())
    for module in artifact.layers:
        weight = parameters.get(f"{module}.weight")
        if weight is not None:
            weight.data = stored.read(f"{module}.weight", tuple(weight.shape)).to(device)
    reference_logits = _logits(model, prompts, device)
    del model, parameters
    vocab = min(x.shape[-1] for x in (loaded_logits[0], reference_logits[0], source_logits[0]))
    loaded_all, reference_all, source_all = (
        torch.cat([t[:, :vocab] for t in x]) for x in (loaded_logits, reference_logits, source_logits)
    )
    loader_rel = (
        torch.linalg.vector_norm(loaded_all - reference_all) / torch.linalg.vector_norm(reference_all)
    ).item()
    kl_sum, same_top1 = next_token_divergence(source_all, loaded_all)
    return {
        "prompts": len(prompts),
        "tokens": int(sum(p.numel() for p in prompts)),
        "loader": f"llama.cpp (llama-cpp-python {llamacpp.version()})",
        "loader_rel_diff": loader_rel,
        "loader_max_abs_diff": (loaded_all - reference_all).abs().max().item(),
        "loader_top1_vs_reference": (loaded_all.argmax(-1) == reference_all.argmax(-1)).float().mean().item(),
        "top1_agreement": same_top1 / source_all.shape[0],
        "kl": kl_sum / source_all.shape[0],
        "finite": bool(torch.isfinite(loaded_all).all()),
    }


def check_runs(folder: Path, device: torch.device, report: VerifyReport) -> None:
    """``qconv.load_model`` runs the artifact on the fixed prompts to finite logits (for imported
    artifacts: no float source to compare the logits with)."""
    try:
        model = load_model(folder, device=str(device), dtype=torch.float32)
        prompts = prompt_ids(Path(folder), model.config.vocab_size)
        logits = torch.cat(_logits(model, prompts, device))
        del model
    except Exception as exc:  # noqa: BLE001 - sorted by _loader_failed: a library's failure or qconv's bug
        _loader_failed(exc, report)
        return
    finite = bool(torch.isfinite(logits).all())
    report.logits = {
        "prompts": len(prompts),
        "tokens": int(sum(p.numel() for p in prompts)),
        "finite": finite,
    }
    detail = f"qconv.load_model runs {len(prompts)} prompts to finite logits (imported: no float source to compare)"
    report.add("loader", finite, detail if finite else "the real loader produced non-finite logits")


def check_loader(artifact: Artifact, source: Source, device: torch.device, report: VerifyReport) -> None:
    try:
        result = logits_comparison(artifact, source, device)
    except Exception as exc:  # noqa: BLE001 - sorted by _loader_failed: a library's failure or qconv's bug
        _loader_failed(exc, report)
        return
    report.logits = result
    tolerance = artifact.format.loader_tolerance(artifact.recipe)
    ok = result["finite"] and result["loader_rel_diff"] <= tolerance
    detail = (
        f"real loader vs qconv reference: rel diff {result['loader_rel_diff']:.2e} (tolerance {tolerance:g}); "
        f"vs source: top-1 {result['top1_agreement']:.3f}, KL {result['kl']:.4g}"
    )
    report.add("loader", ok, detail if result["finite"] else "the real loader produced non-finite logits")


# -- the whole verification of a folder -------------------------------------------------------
def verify_artifact(
    path: str | Path,
    source: Source | None,
    device: torch.device,
    max_rel_error: float | None = None,
    logits: bool = True,
    progress=None,
) -> VerifyReport:
    """Verify an artifact folder from disk. Without a float source only the files can be checked
    and the layer errors recorded at conversion are reported (a source quantized already, such as
    the HQQ folder an artifact was imported from, holds no float weights to measure against)."""
    if source is not None and source.imported_from is not None:
        source = None
    artifact = Artifact(path)
    report = VerifyReport(path=str(path))
    try:
        check_files(
            artifact.folder,
            {k: v for k, v in artifact.manifest.get("files", {}).items() if k != MANIFEST_NAME},
            report,
        )
        if source is None and imported_from(artifact.manifest):
            check_decodes(artifact, report)
            if logits:
                check_runs(artifact.folder, device, report)
            return report
        if source is None:
            check_layers(artifact.layers, max_rel_error, report)
            report.checks[-1]["detail"] += " (as recorded at conversion: no source to recompute from)"
            return report
        if progress:
            progress.start("verify", len(artifact.layers))
        try:
            layers = recompute_layer_errors(artifact, source, device, progress)
        except (QconvError, OSError, ValueError, RuntimeError) as exc:  # unreadable or malformed tensors
            report.add("layers", False, str(exc).splitlines()[0])
            return report
        check_layers(layers, max_rel_error, report)
        if logits:
            check_loader(artifact, source, device, report)
        return report
    finally:
        artifact.close()


def run_verify(
    path: str | Path,
    source_ref: str | None = None,
    *,
    device: str = "auto",
    max_rel_error: float | None = None,
    logits: bool = True,
    progress=None,
) -> VerifyReport:
    """``qconv verify``: verify a folder against ``source_ref`` (default: the manifest's source
    when it can be opened without a download: a path that still exists, or a Hub source at its
    recorded commit in the Hugging Face cache). Recording the result is
    :meth:`qconv.Qconv.verify`'s job."""

    torch_device = resolve_device(device)
    artifact = Artifact(path)  # fails early, naming the folder, if it is not an artifact
    recorded = artifact.manifest.get("source") or {}
    artifact.close()
    check_max_rel_error(max_rel_error)
    if source_ref is not None:
        with open_source(source_ref) as source:
            report = verify_artifact(path, source, torch_device, max_rel_error, logits, progress)
        report.source = source_ref
        return report
    recorded_ref = recorded.get("ref")
    if recorded.get("kind") == "hub" and recorded_ref and recorded.get("revision"):
        return _verify_against_cached_hub_source(
            path, recorded, torch_device, max_rel_error, logits, progress
        )
    if recorded_ref and Path(recorded_ref).exists():
        with open_source(recorded_ref) as source:
            report = verify_artifact(path, source, torch_device, max_rel_error, logits, progress)
        report.source = recorded_ref
        return report
    return verify_artifact(path, None, torch_device, max_rel_error, logits, progress)


def _verify_against_cached_hub_source(
    path, recorded: dict, device: torch.device, max_rel_error, logits: bool, progress
) -> VerifyReport:
    """A Hub source is reopened at the commit the manifest records, from the Hugging Face cache
    only (offline or not: a commit never changes, and verify never downloads a model unasked);
    not cached, the recorded layer errors are checked and the check says how to get the source."""
    pinned = f"{recorded['ref']}@{recorded['revision']}"
    folder = cached_snapshot(recorded["ref"], recorded["revision"], sorted(recorded.get("files") or {}))
    if folder is None:
        report = verify_artifact(path, None, device, max_rel_error, logits, progress)
        note = f"{pinned} is not in the Hugging Face cache; --source {pinned} downloads it"
        for check in report.checks:
            if check["name"] == "layers":
                check["detail"] = check["detail"].replace("no source to recompute from", note)
        return report
    with HubSource(recorded["ref"], recorded["revision"], folder=folder) as source:
        report = verify_artifact(path, source, device, max_rel_error, logits, progress)
    report.source = pinned
    return report
