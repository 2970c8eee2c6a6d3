"""``qconv eval``: perplexity of an artifact on a text, and optionally how far its next-token
distribution moved from the source model's, by the protocol of :mod:`qconv.perplexity`.

Default text: WikiText-2's test split, shipped in ``qconv/data`` (its attribution beside it).
Tokenized once, cut into non-overlapping windows of ``seqlen`` tokens (remainder dropped); the
mean negative log-likelihood over every predicted token, exp. With ``kl`` the source model runs
on the same windows, one window at a time (never all logits in memory): KL(source || artifact)
per predicted token, averaged, and how often both put the same token first. Both models compute
in the same dtype (the artifact's), so the KL measures the quantization, not the arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from qconv import __version__
from qconv.errors import ArtifactError, UsageError
from qconv.perplexity import PROTOCOL, nll_sum, tokenize_text, windows_of
from qconv.progress import NO_PROGRESS, ProgressSink

DEFAULT_TEXT = "wikitext2-test.txt"
DEFAULT_DATASET = "wikitext-2-raw-v1 test"
DEFAULT_SEQLEN = 2048
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def default_text() -> Path:
    """The shipped WikiText-2 test text."""
    return Path(str(resources.files("qconv") / "data" / DEFAULT_TEXT))


@dataclass
class EvalResult:
    path: str
    metrics: dict[str, float]
    protocol: dict[str, Any]
    artifact_id: str | None = None
    recorded: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.artifact_id,
            "path": self.path,
            "recorded": self.recorded,
            "metrics": self.metrics,
            "protocol": self.protocol,
        }


def evaluate(
    path: str | Path,
    *,
    text: str | Path | None = None,
    seqlen: int = DEFAULT_SEQLEN,
    max_windows: int | None = None,
    kl: bool = False,
    source: str | None = None,
    device: str = "auto",
    dtype: str | None = None,
    progress: ProgressSink = NO_PROGRESS,
    registry=None,
    artifact_id: str | None = None,
) -> EvalResult:
    """Evaluate the model at ``path``: a qconv artifact or any folder ``qconv.load_model``
    loads, or a ``.gguf`` file (dequantized to its working dtype). ``kl`` compares with
    ``source`` (default: the source recorded in the artifact's manifest). With ``registry`` and
    ``artifact_id`` the metrics (ppl, nll, kl, top1) are recorded with their protocol."""
    from qconv.environment import resolve_device

    path = Path(path).expanduser()
    if seqlen < 2:
        raise UsageError("--seqlen must be at least 2")
    if max_windows is not None and max_windows < 1:
        raise UsageError("--max-windows must be at least 1")
    if dtype is not None and dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r}: choose {', '.join(DTYPES)}")
    is_gguf = path.is_file() and path.suffix == ".gguf"
    if not is_gguf and not path.is_dir():
        raise ArtifactError(f"{path}: no such model folder or .gguf file")
    manifest = _manifest(path) if not is_gguf else None
    reference = _reference(path, manifest, source) if kl else None
    torch_device = resolve_device(device)

    text_path = Path(text).expanduser() if text is not None else default_text()
    tokenizer = _tokenizer(path, is_gguf)
    ids = tokenize_text(tokenizer, text_path)
    windows = windows_of(ids, seqlen, max_windows)  # fails before any model is loaded
    context = _context_length(path, is_gguf)
    if context is not None and seqlen > context:
        raise UsageError(f"--seqlen {seqlen} is longer than the model's context ({context} positions)")

    model = _load(path, is_gguf, torch_device, dtype)
    model_dtype = model.dtype
    reference_model = None
    if reference is not None:
        from qconv.sources import open_source
        from qconv.verify import source_model

        # the weights rounded to the artifact's working dtype, as the quantizer was fed them
        recipe_dtype = DTYPES.get((manifest or {}).get("recipe", {}).get("dtype"))
        with open_source(reference) as opened:
            working = recipe_dtype or opened.default_dtype()
            reference_model = _in_dtype(source_model(opened, torch_device, working), model_dtype)

    totals = _run(model, reference_model, windows, torch_device, progress)
    count = windows.shape[0]
    predicted = count * (seqlen - 1)
    nll = totals["nll"] / predicted
    metrics = {"ppl": math.exp(nll), "nll": nll}
    if reference_model is not None:
        metrics["kl"] = totals["kl"] / predicted
        metrics["top1"] = totals["top1"] / predicted
    protocol = {
        "dataset": DEFAULT_DATASET if text is None else text_path.name,
        "dataset_sha256": _sha256(text_path),
        "seqlen": seqlen,
        "windows": count,
        "tokens": predicted,
        "tokens_total": int(ids.numel()),
        "max_windows": max_windows,
        "protocol": PROTOCOL,
        "device": str(torch_device),
        "gpu": torch.cuda.get_device_name(torch_device) if torch_device.type == "cuda" else None,
        "dtype": str(model_dtype).removeprefix("torch."),
        "reference": reference,
        "qconv": __version__,
    }
    result = EvalResult(str(path), metrics, protocol, artifact_id=artifact_id)
    if registry is not None and artifact_id is not None:
        registry.record_metrics(artifact_id, metrics, protocol)
        result.recorded = True
    return result


@torch.inference_mode()
def _run(model, reference_model, windows: torch.Tensor, device, progress: ProgressSink) -> dict[str, float]:
    count = windows.shape[0]
    totals = {"nll": 0.0, "kl": 0.0, "top1": 0.0}
    progress.start("eval", count, "windows")
    try:
        for index in range(count):
            tokens = windows[index : index + 1].to(device)
            logits = model(input_ids=tokens).logits[0].float()
            totals["nll"] += nll_sum(logits, tokens[0])
            if reference_model is not None:
                logits = logits[:-1]  # the predicting positions
                ref_logits = reference_model(input_ids=tokens).logits[0, :-1].float()
                log_p = torch.log_softmax(ref_logits, dim=-1)
                log_q = torch.log_softmax(logits, dim=-1)
                totals["kl"] += (log_p.exp() * (log_p - log_q)).sum().item()
                totals["top1"] += (ref_logits.argmax(-1) == logits.argmax(-1)).sum().item()
                del ref_logits, log_p, log_q
            del logits
            progress.advance("eval")
    finally:
        progress.finish("eval")
    return totals


def _manifest(folder: Path) -> dict | None:
    if not (folder / "qconv.json").is_file():
        return None
    from qconv.artifact import Artifact

    artifact = Artifact(folder)  # names the folder if the manifest is broken
    artifact.close()
    return artifact.manifest


def _reference(path: Path, manifest: dict | None, source: str | None) -> str:
    """The source model to compare with, checked to exist before anything is loaded."""
    if source is not None:
        ref = source
    else:
        recorded = (manifest or {}).get("source") or {}
        if manifest is None or not recorded.get("ref") or manifest.get("recipe", {}).get("imported_from"):
            raise UsageError(f"--kl: {path} records no float source to compare with; pass --source")
        ref = recorded["ref"]
        if not Path(ref).expanduser().exists():
            raise UsageError(f"--kl: the artifact's source {ref} is gone; pass --source")
    if not Path(ref).expanduser().exists():
        raise UsageError(f"--source {ref}: no such file or folder")
    return str(ref)


def _tokenizer(path: Path, is_gguf: bool):
    from transformers import AutoTokenizer

    try:
        if is_gguf:
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # noqa: BLE001 - any failure means no usable tokenizer there
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ArtifactError(f"{path}: no usable tokenizer ({detail})") from None


def _context_length(path: Path, is_gguf: bool) -> int | None:
    import json

    try:
        if is_gguf:
            from qconv.sources import open_source

            with open_source(path) as source:
                config = source.config_dict()
        else:
            config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("max_position_embeddings")
    return value if isinstance(value, int) and value > 0 else None


def _load(path: Path, is_gguf: bool, device: torch.device, dtype: str | None):
    if is_gguf:
        from qconv.sources import open_source
        from qconv.verify import source_model

        with open_source(path) as source:
            working = DTYPES[dtype] if dtype else source.default_dtype()
            return _in_dtype(source_model(source, device, working), working)
    from qconv.loader import load_model

    return load_model(path, device=str(device), dtype=dtype)


def _in_dtype(model, dtype: torch.dtype):
    """The parameters in ``dtype``, buffers left as built: rotary frequencies stay float32, as
    ``from_pretrained(dtype=...)`` (and so the artifact's loader) keeps them; ``model.to(dtype)``
    would round them too and move the logits for a reason that is not the weights."""
    for parameter in model.parameters():
        parameter.data = parameter.data.to(dtype)
    return model


def _sha256(path: Path) -> str:
    from qconv.writer import sha256_file

    return sha256_file(path)
