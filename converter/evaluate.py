"""Measuring a model on a text: the one evaluation path of ``qconv eval``, ``qconv release``
and the benchmarks.

The protocol is the one the GPTQ, AQLM and HQQ papers report (shared/data/README.md): tokenize the
whole text once, cut it into non-overlapping windows of ``seqlen`` tokens (the remainder dropped),
average the negative log-likelihood of every predicted token (``seqlen - 1`` a window), exp. The
protocol travels with every number, since others give other values.

Default text: WikiText-2's test split, shipped in ``qconv/data`` (its attribution beside it).
With ``kl`` the source model runs on the same windows, one window at a time (never all logits in
memory): KL(source || artifact) per predicted token, averaged, and how often both put the same
token first. Both models compute in the same dtype (the artifact's), so the KL measures the
quantization, not the arithmetic.

Metric names, as the registry records them: ``ppl``, ``nll``, ``kl``, ``top1`` for the model
measured; ``qconv release`` adds ``ppl_source`` and ``nll_source``, the source's on the same
windows, which its gate compares with.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from qconv import llamacpp
from qconv.artifact import Artifact
from qconv.environment import resolve_device, resolve_dtype
from qconv.errors import ArtifactError, UsageError, literal
from qconv.files import WORKING_DTYPES, sha256_file
from qconv.formats import get_format
from qconv.loader import load_model
from qconv.manifest import imported_from, is_artifact, read_manifest
from qconv.modeling import context_length, reference_model
from qconv.progress import NO_PROGRESS, ProgressSink
from qconv.sources import open_source
from qconv.verify import next_token_divergence
from qconv.version import __version__

PROTOCOL = "non-overlapping windows, remainder dropped, mean NLL over window-1 predicted tokens each"
DEFAULT_TEXT = "wikitext2-test.txt"
#: the name that stands for the shipped text, in ``--text`` and in release plans
SHIPPED_TEXT_NAME = "wikitext2"
DEFAULT_DATASET = "wikitext-2-raw-v1 test"
DEFAULT_SEQLEN = 2048


def default_text() -> Path:
    """The shipped WikiText-2 test text."""
    return Path(str(resources.files("qconv") / "data" / DEFAULT_TEXT))


# -- the protocol -------------------------------------------------------------------------------
def tokenize_text(tokenizer, path: str | Path) -> torch.Tensor:
    """The whole text as one 1-D tensor of token ids (no special tokens added)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read the evaluation text ({exc})") from None
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def windows_of(ids: torch.Tensor, window: int, max_windows: int | None = None) -> torch.Tensor:
    """``ids`` (1-D) cut into non-overlapping windows of ``window`` tokens, remainder dropped:
    a (count, window) view; at most ``max_windows`` of them."""
    if window < 2:
        raise UsageError("the window must hold at least 2 tokens")
    if max_windows is not None and max_windows < 1:
        raise UsageError("{option} must be at least 1", option="max_windows")
    count = ids.numel() // window
    if count == 0:
        raise UsageError(f"the text has {ids.numel()} tokens, fewer than one window of {window}")
    if max_windows is not None:
        count = min(count, max_windows)
    return ids[: count * window].view(count, window)


def nll_sum(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    """Summed negative log-likelihood of ``tokens[1:]`` under ``logits[:-1]`` (one window)."""
    return torch.nn.functional.cross_entropy(logits[:-1].float(), tokens[1:], reduction="sum").item()


@torch.inference_mode()
def measure_windows(
    model, windows: torch.Tensor, device, reference_lm=None, progress: ProgressSink = NO_PROGRESS
) -> dict[str, float]:
    """The one loop over the windows: summed NLL of ``model``, and with ``reference_lm`` the
    summed KL(reference || model) and same-top-1 count (see :func:`next_token_divergence`)."""
    count = windows.shape[0]
    totals = {"nll": 0.0, "kl": 0.0, "top1": 0.0}
    progress.start("eval", count, "windows")
    try:
        for index in range(count):
            tokens = windows[index : index + 1].to(device)
            logits = model(input_ids=tokens).logits[0].float()
            totals["nll"] += nll_sum(logits, tokens[0])
            if reference_lm is not None:
                reference_logits = reference_lm(input_ids=tokens).logits[0, :-1].float()
                # a model's embedding may be padded past its tokenizer's vocabulary (llama.cpp
                # gives logits for the GGUF's tokens only): compare the tokens both know
                vocab = min(reference_logits.shape[-1], logits.shape[-1])
                kl, same_top1 = next_token_divergence(reference_logits[:, :vocab], logits[:-1, :vocab])
                totals["kl"] += kl
                totals["top1"] += same_top1
                del reference_logits
            del logits
            progress.advance("eval")
    finally:
        progress.finish("eval")
    return totals


def perplexity(
    model, ids: torch.Tensor, window: int = DEFAULT_SEQLEN, max_windows: int | None = None, progress=None
) -> dict:
    """Perplexity of an in-memory ``model`` on ``ids`` (1-D) by the protocol above, on the device
    of its parameters (for models built elsewhere: the benchmarks' reference paths)."""
    windows = windows_of(ids, window, max_windows)
    device = next(model.parameters()).device
    totals = measure_windows(model, windows, device, progress=progress or NO_PROGRESS)
    count = windows.shape[0]
    predicted = count * (window - 1)
    nll = totals["nll"] / predicted
    return {
        "ppl": math.exp(nll),
        "nll": nll,
        "window": window,
        "windows": count,
        "predicted_tokens": predicted,
        "tokens_total": int(ids.numel()),
        "protocol": PROTOCOL,
    }


# -- a model on disk ----------------------------------------------------------------------------
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
) -> EvalResult:
    """Evaluate the model at ``path``: a qconv artifact or any folder ``qconv.load_model``
    loads, or a ``.gguf`` file (dequantized to its working dtype). ``kl`` compares with
    ``source`` (default: the source recorded in the artifact's manifest). Nothing is recorded
    here: :meth:`qconv.Qconv.evaluate` records the metrics (ppl, nll, kl, top1) with the protocol."""
    path = Path(path).expanduser()
    _check_settings(seqlen, max_windows)
    resolve_dtype(dtype, allow_auto=False)
    is_gguf = path.is_file() and path.suffix == ".gguf"
    if not is_gguf and not path.is_dir():
        raise ArtifactError(f"{path}: no such model folder or .gguf file")
    manifest = _manifest(path) if not is_gguf else None
    reference = _reference(path, manifest, source) if kl else None
    torch_device = resolve_device(device)
    if manifest is not None and get_format(manifest["recipe"]["method"]).container == "gguf":
        return _evaluate_with_llama_cpp(
            path, manifest, text, seqlen, max_windows, reference, torch_device, progress
        )

    text_path, ids, windows = _windows(path, text, seqlen, max_windows)  # before any model is loaded
    _check_context(seqlen, _config(path, is_gguf))

    model = _load(path, is_gguf, torch_device, dtype)
    model_dtype = model.dtype
    reference_lm = None
    if reference is not None:
        # the weights rounded to the artifact's working dtype, as the quantizer was fed them
        recipe_dtype = WORKING_DTYPES.get((manifest or {}).get("recipe", {}).get("dtype"))
        with open_source(reference) as opened:
            working = recipe_dtype or opened.default_dtype()
            reference_lm = _in_dtype(reference_model(opened, torch_device, working), model_dtype)

    totals = measure_windows(model, windows, torch_device, reference_lm, progress)
    metrics, protocol = _results(totals, reference_lm is not None, text, text_path, ids, windows, max_windows)
    protocol.update(_where(torch_device, model_dtype, reference))
    return EvalResult(str(path), metrics, protocol)


class _LlamaCppModel:
    """llama.cpp behind the call :func:`measure_windows` makes of a model (``model(input_ids=)
    .logits``): one window at a time, from an empty context."""

    def __init__(self, llm):
        self.llm = llm

    def __call__(self, input_ids: torch.Tensor):
        from types import SimpleNamespace

        logits = llamacpp.logits(self.llm, input_ids[0].tolist())
        return SimpleNamespace(logits=torch.from_numpy(logits)[None])


def _evaluate_with_llama_cpp(
    folder: Path,
    manifest: dict,
    text,
    seqlen: int,
    max_windows: int | None,
    reference: str | None,
    device: torch.device,
    progress: ProgressSink,
) -> EvalResult:
    """A GGUF artifact measured by llama.cpp itself (its tokenizer, its arithmetic) under the
    same protocol; with a reference, the source runs in float32 on the same windows."""
    artifact = Artifact(folder)
    gguf_file = artifact.gguf_file
    text_path = default_text() if is_shipped_text(text) else Path(text).expanduser()
    try:
        content = text_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{text_path}: cannot read the evaluation text ({exc})") from None
    with llamacpp.open_llama(gguf_file, n_ctx=seqlen) as llm:
        context = llm._model.n_ctx_train()  # llama-cpp-python has no public accessor
        if context and seqlen > context:
            raise UsageError(
                "{option} {value} is longer than the model's context " + f"({context} positions)",
                option="seqlen",
                value=seqlen,
            )
        ids = torch.tensor(llm.tokenize(content.encode("utf-8"), add_bos=False, special=False))
        windows = windows_of(ids, seqlen, max_windows)
        reference_lm = None
        if reference is not None:
            with open_source(reference) as opened:
                reference_lm = reference_model(opened, device, torch.float32)
        totals = measure_windows(_LlamaCppModel(llm), windows, device, reference_lm, progress)
    metrics, protocol = _results(totals, reference_lm is not None, text, text_path, ids, windows, max_windows)
    protocol.update(_where(device, torch.float32, reference))
    protocol["engine"] = f"llama.cpp (llama-cpp-python {llamacpp.version()})"
    protocol["dtype"] = manifest["recipe"].get("type")
    protocol["gguf_file"] = gguf_file.name
    return EvalResult(str(folder), metrics, protocol)


def evaluate_source(
    ref: str,
    *,
    tokenizer_from: str | Path,
    working_dtype: str,
    text: str | Path | None = None,
    seqlen: int = DEFAULT_SEQLEN,
    max_windows: int | None = None,
    device: str = "auto",
    progress: ProgressSink = NO_PROGRESS,
) -> EvalResult:
    """Perplexity of the source model ``ref`` (any source qconv converts from: a folder, a
    ``.gguf``, a Hub id) by the same protocol, on the windows the tokenizer at ``tokenizer_from``
    (an artifact converted from it) makes of ``text``: its weights rounded to ``working_dtype``
    and computing in it, as an artifact converted in that dtype does. Metrics ``ppl``, ``nll``;
    the protocol's ``reference`` names the source."""
    _check_settings(seqlen, max_windows)
    if working_dtype not in WORKING_DTYPES:
        raise UsageError(f"the working dtype {working_dtype!r} is not one of {', '.join(WORKING_DTYPES)}")
    torch_device = resolve_device(device)
    folder = Path(tokenizer_from).expanduser()
    text_path, ids, windows = _windows(folder, text, seqlen, max_windows)
    with open_source(ref) as opened:
        _check_context(seqlen, opened.config_dict())
        working = WORKING_DTYPES[working_dtype]
        model = _in_dtype(reference_model(opened, torch_device, working), working)
    totals = measure_windows(model, windows, torch_device, None, progress)
    metrics, protocol = _results(totals, False, text, text_path, ids, windows, max_windows)
    protocol.update(_where(torch_device, working, ref))
    return EvalResult(ref, metrics, protocol)


def is_shipped_text(text) -> bool:
    """Whether ``text`` names the WikiText-2 test text qconv ships: None (the default) or the
    word ``wikitext2`` (so a release plan runs from any clone as it is)."""
    return text is None or str(text) == SHIPPED_TEXT_NAME


def _check_settings(seqlen: int, max_windows: int | None) -> None:
    if seqlen < 2:
        raise UsageError("{option} must be at least 2", option="seqlen")
    if max_windows is not None and max_windows < 1:
        raise UsageError("{option} must be at least 1", option="max_windows")


def _windows(tokenizer_at: Path, text, seqlen: int, max_windows: int | None):
    """(the text's path, all its token ids, the windows measured)."""
    text_path = default_text() if is_shipped_text(text) else Path(text).expanduser()
    is_gguf = tokenizer_at.is_file() and tokenizer_at.suffix == ".gguf"
    ids = tokenize_text(_tokenizer(tokenizer_at, is_gguf), text_path)
    return text_path, ids, windows_of(ids, seqlen, max_windows)


def _check_context(seqlen: int, config: dict | None) -> None:
    context = context_length(config) if config is not None else None
    if context is not None and seqlen > context:
        raise UsageError(
            "{option} {value} is longer than the model's context " + f"({context} positions)",
            option="seqlen",
            value=seqlen,
        )


def _results(totals: dict, with_reference: bool, text, text_path: Path, ids, windows, max_windows):
    """(metrics, protocol) from the loop's sums."""
    count, seqlen = windows.shape
    predicted = count * (seqlen - 1)
    nll = totals["nll"] / predicted
    metrics = {"ppl": math.exp(nll), "nll": nll}
    if with_reference:
        metrics["kl"] = totals["kl"] / predicted
        metrics["top1"] = totals["top1"] / predicted
    protocol = {
        "dataset": DEFAULT_DATASET if is_shipped_text(text) else text_path.name,
        "dataset_sha256": sha256_file(text_path),
        "seqlen": seqlen,
        "windows": count,
        "tokens": predicted,
        "tokens_total": int(ids.numel()),
        "max_windows": max_windows,
    }
    return metrics, protocol


def _where(device: torch.device, dtype: torch.dtype, reference: str | None) -> dict[str, Any]:
    return {
        "protocol": PROTOCOL,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "dtype": str(dtype).removeprefix("torch."),
        "reference": reference,
        "qconv": __version__,
    }


def _manifest(folder: Path) -> dict | None:
    return read_manifest(folder) if is_artifact(folder) else None  # names the folder if broken


def _reference(path: Path, manifest: dict | None, source: str | None) -> str:
    """The source model to compare with, checked to exist before anything is loaded."""
    if source is not None:
        ref = source
    else:
        recorded = (manifest or {}).get("source") or {}
        if manifest is None or not recorded.get("ref") or imported_from(manifest):
            raise UsageError(f"--kl: {path} records no float source to compare with; pass --source")
        ref = recorded["ref"]
        if not Path(ref).expanduser().exists():
            raise UsageError(f"--kl: the artifact's source {ref} is gone; pass --source")
    if not Path(ref).expanduser().exists():
        raise UsageError("{option} " + literal(f"{ref}: no such file or folder"), option="source")
    return str(ref)


def _tokenizer(path: Path, is_gguf: bool):
    # transformers' tokenizer machinery is a heavy import: only when a text is tokenized
    from transformers import AutoTokenizer

    try:
        if is_gguf:
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # noqa: BLE001 - any failure means no usable tokenizer there
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ArtifactError(f"{path}: no usable tokenizer ({detail})") from None


def _config(path: Path, is_gguf: bool) -> dict | None:
    """The model's config as a dict (None when it cannot be read: the context is then not checked)."""
    try:
        if is_gguf:
            with open_source(path) as source:
                return source.config_dict()
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None


def _load(path: Path, is_gguf: bool, device: torch.device, dtype: str | None):
    if is_gguf:
        with open_source(path) as source:
            working = WORKING_DTYPES[dtype] if dtype else source.default_dtype()
            return _in_dtype(reference_model(source, device, working), working)
    return load_model(path, device=str(device), dtype=dtype)


def _in_dtype(model, dtype: torch.dtype):
    """The parameters in ``dtype``, buffers left as built: rotary frequencies stay float32, as
    ``from_pretrained(dtype=...)`` (and so the artifact's loader) keeps them; ``model.to(dtype)``
    would round them too and move the logits for a reason that is not the weights."""
    for parameter in model.parameters():
        parameter.data = parameter.data.to(dtype)
    return model
