"""Perplexity on a text, by the protocol the GPTQ, AQLM and HQQ papers report (shared/data/README.md):
tokenize the whole text once, cut it into non-overlapping windows of ``window`` tokens (the
remainder dropped), average the negative log-likelihood of every predicted token (``window - 1``
a window), exp. The protocol travels with every number, since others give other values."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from qconv.errors import UsageError

PROTOCOL = "non-overlapping windows, remainder dropped, mean NLL over window-1 predicted tokens each"


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
        raise UsageError("--max-windows must be at least 1")
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
def perplexity(
    model, ids: torch.Tensor, window: int = 2048, max_windows: int | None = None, progress=None
) -> dict:
    """Perplexity of ``model`` on ``ids`` (1-D) with the protocol above. ``progress``, when given,
    is called with (windows done, windows in all)."""
    windows = windows_of(ids, window, max_windows)
    count = windows.shape[0]
    device = next(model.parameters()).device
    total = 0.0
    for index in range(count):
        tokens = windows[index : index + 1].to(device)
        total += nll_sum(model(input_ids=tokens).logits[0], tokens[0])
        if progress:
            progress(index + 1, count)
    predicted = count * (window - 1)
    nll = total / predicted
    return {
        "ppl": math.exp(nll),
        "nll": nll,
        "window": window,
        "windows": count,
        "predicted_tokens": predicted,
        "tokens_total": int(ids.numel()),
        "protocol": PROTOCOL,
    }
