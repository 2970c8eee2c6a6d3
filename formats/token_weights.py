"""Token-weighted input statistics for the calibrated walk (formats/blockwise.py): ``H`` of each
Linear's inputs with every calibration token weighted by how much the sequence reads it.

Inside the attention, tokens are weighted by how much the rest of the sequence reads them: ``H =
sum_t w_t x_t x_t^T / sum_t w_t`` with ``w_t = 1 + r_t``, ``r_t`` the attention token ``t``
receives in the block (the softmax weights of every later query summed over queries, averaged over
heads). An error in a token's keys and values reaches the loss through its own position (the 1)
and through every query that attends to it (``r_t``). With plain ``X^T X`` (``w_t = 1``) the
attention sink (the first token of every sequence, Xiao et al. 2023, arXiv:2309.17453; its input
in the directions of the model's massive activations, Sun et al. 2024, arXiv:2402.17762) is 1
token in 2048, so GPTQ pushes rounding error into the directions only it uses: on SmolLM2-135M at
GGUF Q2_K's mix the sink's v_proj output error reached 1.2-1.9x its norm (data-free: 0.04-0.13)
in the blocks after the massive activation appears, while every other token's error fell, and the
model got worse than the data-free one although each layer's plain output error was lower. The
weights come from a pass with eager attention and an explicit causal mask; where the block's
attention gives no weights, or that pass does not reproduce the block's own outputs, every token
weighs 1.

Only the Linears inside the modules that returned softmax weights take ``w_t``; the others (the
MLP's) weigh every token 1. The MLP works on each token alone, and the sink's MLP input is huge in
a few channels: weighted by its ``1 + r_t`` (about a third of a 2048-token sequence's weight) it
dominated ``H`` of down_proj, although what the MLP writes into the sink's residual is divided by
that residual's massive norm at the next norm layer. On SmolLM2-135M GGUF Q2_K, weighting every
Linear gave perplexity 25.59, all but down_proj 24.81, the attention's alone 24.51
(bench/results/gguf_weight_scope_Q2_K_*.json, a torch proxy for llama.cpp's perplexity).

Users: calibrated GGUF (formats/gguf_calibrated.py), HQQ and compressed-tensors
(formats/uniform_calibrated.py). AQLM still collects plain ``X^T X`` (blockwise.InputStatistics).
"""

from __future__ import annotations

import torch

from qconv.calibration import call_block

#: what the recipes record under ``token_weights``
SETTING = (
    "1 + attention received (mean over heads), eager attention with a causal mask; "
    "for the Linears inside the attention modules (the others: 1 a token)"
)


class TokenWeightedStatistics:
    """``H = sum_t w_t x_t x_t^T / sum_t w_t`` of the inputs of the Linears ``names`` of ``block``,
    ``w_t = 1 + r_t`` (the module doc), one sequence at a time: forward pre-hooks keep the
    sequence's inputs, forward hooks on the attention modules keep their softmax weights (a 4-D
    ``[batch, heads, queries, keys]`` tensor as the second output, which eager attention
    returns), and :meth:`end_sequence` adds the weighted products (float64)."""

    def __init__(self, block, prefix: str, names: list[str]) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.weight_sums: dict[str, float] = {}
        self._inputs: dict[str, torch.Tensor] = {}
        self._received: list[torch.Tensor] = []
        self.attention_seen = False
        self._hooks = [
            block.get_submodule(name[len(prefix) :]).register_forward_pre_hook(
                lambda module, args, name=name: self._inputs.__setitem__(name, args[0].detach())
            )
            for name in names
        ]
        attention = _attention_modules(block)
        #: whether the block has attention modules whose softmax weights can be kept
        self.watches_attention = bool(attention)
        self._hooks += [module.register_forward_hook(self._attention) for module in attention]
        #: the Linears ``names`` inside each watched module, by the module's id
        self._names_inside = {
            id(module): {name for name in names if _is_inside(block, prefix, name, module)}
            for module in attention
        }
        #: the Linears inside a module that returned softmax weights: those take the token weights
        self.weighted_names: set[str] = set()

    def forget_sequence(self) -> None:
        """Drop what the hooks kept of a pass that is not a calibration sequence (a check)."""
        self._inputs, self._received = {}, []

    def _attention(self, module, args, output) -> None:
        probs = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if isinstance(probs, torch.Tensor) and probs.dim() == 4 and probs.shape[-1] == probs.shape[-2]:
            # [batch, heads, queries, keys] -> what each key receives, summed over queries
            self._received.append(probs.detach().to(torch.float64).sum(2).mean(1).reshape(-1))
            self.weighted_names |= self._names_inside[id(module)]

    def end_sequence(self, weighted: bool) -> None:
        first = next(iter(self._inputs.values()), None)
        tokens = 0 if first is None else first.reshape(-1, first.shape[-1]).shape[0]
        weights = None
        if weighted and self._received and all(r.numel() == tokens for r in self._received):
            self.attention_seen = True
            weights = 1.0 + torch.stack(self._received).mean(0)
        for name, inputs in self._inputs.items():
            x = inputs.reshape(-1, inputs.shape[-1]).to(torch.float64)
            w = (
                torch.ones(x.shape[0], dtype=torch.float64, device=x.device)
                if weights is None or name not in self.weighted_names
                else weights.to(x.device)
            )
            xw = x * w.sqrt()[:, None]
            if name not in self.sums:
                self.sums[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
                self.weight_sums[name] = 0.0
            self.sums[name].addmm_(xw.t(), xw)
            self.weight_sums[name] += float(w.sum())
        self.forget_sequence()

    def stop(self) -> None:
        for hook in self._hooks:
            hook.remove()

    def pop(self, name: str) -> torch.Tensor:
        return (self.sums.pop(name) / self.weight_sums.pop(name)).to(torch.float32)


def _is_inside(block, prefix: str, name: str, module) -> bool:
    linear = block.get_submodule(name[len(prefix) :])
    return any(linear is inner for inner in module.modules())


def _attention_modules(block) -> list:
    """The block's modules whose config chooses the attention implementation."""
    return [
        module
        for module in block.modules()
        if module is not block and hasattr(getattr(module, "config", None), "_attn_implementation")
    ]


class _EagerAttention:
    """Eager attention (which returns its softmax weights) for the block's attention modules,
    the implementation they had put back on exit."""

    def __init__(self, block) -> None:
        self.configs = list({id(m.config): m.config for m in _attention_modules(block)}.values())

    def __enter__(self):
        self.saved = [config._attn_implementation for config in self.configs]
        for config in self.configs:
            config._attn_implementation = "eager"
        return self

    def __exit__(self, *exc) -> None:
        for config, saved in zip(self.configs, self.saved, strict=True):
            config._attn_implementation = saved


def collect_statistics(
    block, prefix: str, names: list[str], hidden: torch.Tensor, kwargs: dict, out: torch.Tensor
):
    """Token-weighted ``H`` of every Linear ``names`` (:class:`TokenWeightedStatistics`) and the
    block's outputs into ``out``. The weights need the attention's softmax: the block runs with
    eager attention and an explicit causal mask (the walk's kwargs carry none where the default
    attention masks causally itself), checked against the block's own output on the first
    sequence (that eager pass then serves as the first sequence's); without attention weights, or
    where they do not reproduce it, every token weighs 1."""
    statistics = TokenWeightedStatistics(block, prefix, names)
    seqlen = hidden.shape[1]
    weighted = statistics.watches_attention and kwargs.get("attention_mask") is None
    first = 0  # the first sequence the loop below runs
    with torch.no_grad():
        if weighted:
            reference = call_block(block, hidden[:1], kwargs)
            statistics.forget_sequence()
            causal = torch.full(
                (1, 1, seqlen, seqlen), float("-inf"), device=hidden.device, dtype=hidden.dtype
            ).triu(1)
            with _EagerAttention(block):
                eager = call_block(block, hidden[:1], {**kwargs, "attention_mask": causal})
            scale = float(reference.abs().max().clamp(min=1e-30))
            weighted = (
                bool(torch.isfinite(eager).all()) and float((eager - reference).abs().max()) <= 1e-3 * scale
            )
            if weighted:  # the checked pass is the first sequence's
                out[:1] = eager
                statistics.end_sequence(True)
                first = 1
            else:
                statistics.forget_sequence()
        for row in range(first, hidden.shape[0]):
            if weighted:
                with _EagerAttention(block):
                    out[row : row + 1] = call_block(
                        block, hidden[row : row + 1], {**kwargs, "attention_mask": causal}
                    )
            else:
                out[row : row + 1] = call_block(block, hidden[row : row + 1], kwargs)
            statistics.end_sequence(weighted)
    statistics.stop()
    return statistics
