"""Perplexity protocol arithmetic on a tiny random model."""

from __future__ import annotations

import math

import pytest
import torch

from qconv.errors import UsageError
from qconv.evaluate import perplexity, tokenize_text


@pytest.fixture(scope="module")
def model(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()


def test_windows_and_mean_nll_by_hand(model):
    torch.manual_seed(0)
    ids = torch.randint(0, 320, (3 * 16 + 5,))  # 3 windows of 16, 5 tokens dropped
    result = perplexity(model, ids, window=16)
    total = 0.0
    for k in range(3):
        chunk = ids[16 * k : 16 * (k + 1)]
        with torch.no_grad():
            logits = model(input_ids=chunk[None]).logits[0]
        log_p = torch.log_softmax(logits.float(), -1)
        total -= sum(log_p[i, chunk[i + 1]].item() for i in range(15))
    assert result["windows"] == 3 and result["predicted_tokens"] == 45 and result["tokens_total"] == 53
    assert result["nll"] == pytest.approx(total / 45, rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(total / 45), rel=1e-5)
    assert perplexity(model, ids, window=16, max_windows=1)["windows"] == 1


def test_text_shorter_than_a_window_is_refused(model):
    with pytest.raises(UsageError, match="the text has 10 tokens, fewer than one window of 16"):
        perplexity(model, torch.arange(10), window=16)


def test_unreadable_text_is_refused(tmp_path):
    with pytest.raises(UsageError, match="cannot read the evaluation text"):
        tokenize_text(None, tmp_path / "missing.txt")
