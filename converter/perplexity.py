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


@torch.inference_mode()
def perplexity(
    model, ids: torch.Tensor, window: int = 2048, max_windows: int | None = None, progress=None
) -> dict:
    """Perplexity of ``model`` on ``ids`` (1-D) with the protocol above. ``progress``, when given,
    is called with (windows done, windows in all)."""
    if window < 2:
        raise UsageError("the window must hold at least 2 tokens")
    count = ids.numel() // window
    if count == 0:
        raise UsageError(f"the text has {ids.numel()} tokens, fewer than one window of {window}")
    if max_windows is not None:
        count = min(count, max_windows)
    device = next(model.parameters()).device
    windows = ids[: count * window].view(count, window)
    nll_sum = 0.0
    for index in range(count):
        tokens = windows[index : index + 1].to(device)
        logits = model(input_ids=tokens).logits[0, :-1].float()
        nll_sum += torch.nn.functional.cross_entropy(logits, tokens[0, 1:], reduction="sum").item()
        if progress:
            progress(index + 1, count)
    predicted = count * (window - 1)
    nll = nll_sum / predicted
    return {
        "ppl": math.exp(nll),
        "nll": nll,
        "window": window,
        "windows": count,
        "predicted_tokens": predicted,
        "tokens_total": int(ids.numel()),
        "protocol": PROTOCOL,
    }
