"""``--solver hqq`` for compressed-tensors' integer schemes: a per-group search of the scheme's
grid for the lowest importance-weighted error (llama.cpp's data-free k-quant search, refitted
with HQQ's half-quadratic step), never above llm-compressor's round to nearest per layer.

The bytes are those of ``--solver rtn`` (``ct_layout``): per group of ``group_size`` inputs (or
per output channel) a scale in the checkpoint's dtype and, for W4A16_ASYM only, an integer zero
point in the code range; codes in the full signed range ([-8, 7] for 4 bits), dequantized as
``(code - zero) * scale``. Only the values change.

Why not the plain error. Version 1 of this solver minimised each group's plain squared error
(HQQ's iterations on the scale) and lowered every SmolLM2 layer's relative error (0.944 of rtn's
at W4A16 g64), yet raised the wikitext-2 perplexity (26.83 -> 27.05, bench/run_ct.py). A
group's plain error is mostly its many small weights' error; the output depends more on its few
large weights, those behind the outlier features (SmolLM2's ``layers.2.mlp.down_proj`` row 507
holds two "super weights", Yu et al. 2024, "The Super Weight in Large Language Models", +5.09
and -5.31 in groups whose other weights stay below 1.35). bench/diagnose_ct_solver.py (70 of
the 210 layers, W4A16): the error at each group's largest weight, relative to it, is 6.6% with
rtn, 4.9% with version 1, 2.1% with this one, while the error of each layer's output under
SmolLM2's activations ranks version 1 (0.90 of rtn's) above this one (0.92) although its
perplexity is the higher. Version 1's search (two starts, the scale only moving up from the
smallest unclipped one) also shrank the largest weights on average (mean signed error there
-3.5% of the weight, rtn's -0.9%: its half-step errors shrink positive extremes and grow
negative ones).

What it does now, per group (all groups at once, batched torch):

- importance: each squared error weighs ``w^2``, llama.cpp's data-free choice for its k-quants
  (ggml-quants.c ``make_qx_quants`` with ``rmse_type`` 1, Q6_K; ``make_q3_quants``, Q3_K);
- starting scales: llama.cpp's grid (``make_qx_quants``: the largest magnitude mapped to its code
  +- tenths, ``SYMMETRIC_OFFSETS``; W4A16_ASYM: ``make_qkx2_quants``' range spread over 14..16
  steps, ``ASYMMETRIC_OFFSETS``, with llm-compressor's rule for the integer zero point);
- from each, ``ITERS`` refits: the weighted least-squares scale for the codes (``make_qx_quants``'
  ``sumlx / suml2``; asymmetric: the weighted line, its zero rounded to an integer code and the
  scale refitted), fitted to HQQ's target ``W - W_e`` (``W_e = shrink_lp(W - W_r)``, p = 0.7,
  beta = 10: nonzero only for residuals above 0.17, which LLM weights rarely reach);
- every candidate is measured in the numbers that would be stored (the scale rounded to the
  checkpoint's dtype, integer codes and zero points, the nearest codes for them, float32), and
  none may leave a weight farther than half a step from its code (rtn's bound: no clipping;
  clipping outliers raised SmolLM2's W4A16 perplexity to 28.69 in an earlier version);
- the group keeps the candidate with the lowest weighted error (rtn's own numbers, byte for byte,
  unless one is lower by more than float32's rounding of the sum: ``MARGIN``).

The guarantees. Per group the weighted error is at most rtn's (rtn is a candidate). The plain
error may rise in a group (a positive outlier reproduced exactly costs its neighbours a coarser
step), so the layer is measured as the manifest measures it (``relative_error``, as
``qconv.verify.layer_error``): if the layer's relative error is above rtn's, each group takes
instead its lowest weighted error among the candidates whose plain error is also below rtn's
("bounded"), and if even that layer is not lower (float32 sums over other groupings could in
principle disagree), rtn's numbers whole. So each layer's relative error is at most rtn's
(tests/test_ct_hqq.py checks it on random, heavy-tailed and tiny-Llama weights, and the
per-group bounds of both choices).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qconv.formats import ct_layout
from qconv.formats.hqq_solver import BETA, LP_NORM

#: the starting scales, llama.cpp's ``make_qx_quants`` grid (ggml-quants.c: the group's
#: largest magnitude mapped to its code plus ``is / 10``, ``is`` in -9..9), cut at +5 tenths: no
#: start may leave the extreme weight more than half a step from its code (no clipping)
SYMMETRIC_OFFSETS = tuple(k / 10 for k in range(-9, 6))
#: W4A16_ASYM: the group's range spread over ``steps + is / 10`` steps, ``is`` in -10..10
#: (``make_qkx2_quants``' ``rmin = -1, rdelta = 0.1, nstep = 20`` as Q4_K calls it)
ASYMMETRIC_OFFSETS = tuple(k / 10 for k in range(-10, 11))
#: refits after each start (each evaluates the stored numbers once more)
ITERS = 1
#: the largest error a weight may keep, in steps: half of one (no clipping), with float32's
#: rounding of ``w / s`` allowed for
HALF_STEP = 0.5 * (1 + 1e-5)
#: how much lower (relatively) a candidate's error must be to replace the best so far:
#: above float32's rounding of a group's sum, so that "lower" holds however it is summed
MARGIN = 1e-5
#: weights a chunk of groups holds at most (bounds the float32 temporaries to ~4 MB each)
CHUNK_ELEMENTS = 1 << 20
#: recorded in the recipe (bench JSON says which solver made its numbers)
SOLVER_VERSION = 2


@dataclass(frozen=True)
class Solved:
    """The layer's stored numbers and how they compare with llm-compressor's round to nearest:
    ``rel_error`` / ``rtn_rel_error`` as ``qconv.verify.layer_error`` computes them (relative
    Frobenius error, float32), ``groups_improved`` how many groups left rtn's numbers, out of
    ``groups``."""

    quantized: ct_layout.Quantized
    rel_error: float
    rtn_rel_error: float
    groups_improved: int
    groups: int
    #: which choice was kept: "free" (every group its lowest weighted error), "bounded" (each
    #: group's plain error also below rtn's, where "free" raised the layer's) or "rtn"
    choice: str = "free"


def solver_settings() -> dict:
    """The solver's constants, recorded in the recipe (so the manifest says what ran)."""
    return {
        "version": SOLVER_VERSION,
        "importance": "x^2",
        "symmetric_offsets": list(SYMMETRIC_OFFSETS),
        "asymmetric_offsets": list(ASYMMETRIC_OFFSETS),
        "iters": ITERS,
        "lp_norm": LP_NORM,
        "beta": BETA,
    }


@torch.inference_mode()
def quantize_hqq(weight: torch.Tensor, scheme: ct_layout.Scheme, group_size: int | None) -> Solved:
    """``weight`` ``[out, in]`` in the checkpoint's dtype (finite; ``group_size`` divides ``in``),
    an integer scheme. Returns numbers in :class:`ct_layout.Quantized`'s layout: per group the
    lowest importance-weighted error, the layer's relative error never above
    :func:`ct_layout.quantize_rtn`'s (module doc)."""
    if scheme.weight_type != "int":
        raise ValueError(f"{scheme.name}: the hqq solver searches integer grids only")
    rtn = ct_layout.quantize_rtn(weight, scheme, group_size)
    out_features, in_features = weight.shape
    size = in_features if scheme.strategy == "channel" else group_size
    rows = weight.to(torch.float32).reshape(-1, size)  # one group a row
    rtn_codes = rtn.codes.reshape(-1, size)
    rtn_scale = rtn.scale.reshape(-1, 1)
    rtn_zero = None if rtn.zero_point is None else rtn.zero_point.reshape(-1, 1)
    # two choices per group: the lowest weighted error ("free") and the lowest among those whose
    # plain squared error is also below rtn's ("bounded"); numbers of each, [groups, 1] / [groups, size]
    picks = {kind: (torch.empty_like(rtn_codes), torch.empty_like(rtn_scale)) for kind in ("free", "bounded")}
    zeros = {kind: None if rtn_zero is None else torch.empty_like(rtn_zero) for kind in picks}
    improved = dict.fromkeys(picks, 0)
    step = max(1, CHUNK_ELEMENTS // size)
    for start in range(0, rows.shape[0], step):
        part = slice(start, start + step)
        chunk = _solve_rows(
            rows[part], rtn_codes[part], rtn_scale[part], None if rtn_zero is None else rtn_zero[part], scheme
        )
        for kind, (codes, scale, zero, count) in chunk.items():
            picks[kind][0][part], picks[kind][1][part] = codes, scale
            if zero is not None:
                zeros[kind][part] = zero
            improved[kind] += count
    groups = rtn_scale.numel()
    rtn_rel_error = relative_error(weight, rtn, in_features)
    for kind in ("free", "bounded"):
        codes, scale = picks[kind]
        zero = zeros[kind]
        solved = ct_layout.Quantized(
            codes.reshape(out_features, in_features),
            scale.reshape(out_features, -1),
            None if zero is None else zero.reshape(out_features, -1),
        )
        rel_error = relative_error(weight, solved, in_features)
        if rel_error <= rtn_rel_error:
            return Solved(solved, rel_error, rtn_rel_error, improved[kind], groups, kind)
    return Solved(rtn, rtn_rel_error, rtn_rel_error, 0, groups, "rtn")


def relative_error(weight: torch.Tensor, quantized: ct_layout.Quantized, in_features: int) -> float:
    """||dequantized - weight|| / ||weight|| in float32, as ``qconv.verify.layer_error`` computes
    it from the stored tensors (same operations, so the two agree to the bit)."""
    reference = weight.to(torch.float32)
    diff = ct_layout.dequantize(quantized, in_features).to(reference.device) - reference
    norm = torch.linalg.vector_norm(reference).item()
    diff_norm = torch.linalg.vector_norm(diff).item()
    if norm > 0:
        return diff_norm / norm
    return 0.0 if diff_norm == 0 else float("inf")


class _Best:
    """The best (lowest weighted error) numbers met so far per group, under a constraint."""

    def __init__(self, weighted: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
        self.weighted, self.scale, self.zero = weighted, scale, zero
        self.from_rtn = torch.ones_like(weighted, dtype=torch.bool)

    def offer(
        self, weighted: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, allowed: torch.Tensor
    ) -> None:
        better = allowed & (weighted < self.weighted * (1 - MARGIN))
        self.weighted = torch.where(better, weighted, self.weighted)
        self.scale = torch.where(better, scale, self.scale)
        self.zero = torch.where(better, zero, self.zero)
        self.from_rtn &= ~better


def _solve_rows(
    w: torch.Tensor,
    rtn_codes: torch.Tensor,
    rtn_scale: torch.Tensor,
    rtn_zero: torch.Tensor | None,
    scheme: ct_layout.Scheme,
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]]:
    """Groups are the rows of ``w`` (float32). Returns, for the "free" and the "bounded" choice,
    codes, scale, zero (None when symmetric) and the number of groups that left rtn's numbers."""
    q_min, q_max = ct_layout.code_range(scheme)
    steps = q_max - q_min  # 15 for 4 bits
    dtype = rtn_scale.dtype
    importance = w.square()  # make_qx_quants' rmse_type 1: an error counts by the weight's square
    # rtn's errors, from its own codes (computed in the checkpoint's dtype, so not always the
    # nearest codes for its scale: kept as they are, since those are the bytes it writes)
    rtn_values = rtn_codes.to(torch.float32)
    if rtn_zero is not None:
        rtn_values -= rtn_zero.to(torch.float32)
    rtn_residual = torch.addcmul(w, rtn_values, rtn_scale.to(torch.float32), value=-1)
    rtn_error = _row_dot_self(rtn_residual)
    rtn_weighted = _row_dot(importance * rtn_residual, rtn_residual)
    start_zero = torch.zeros_like(rtn_error) if rtn_zero is None else rtn_zero.to(torch.float32)
    best = {
        kind: _Best(rtn_weighted, rtn_scale.to(torch.float32), start_zero) for kind in ("free", "bounded")
    }

    low = w.amin(dim=1, keepdim=True)
    high = w.amax(dim=1, keepdim=True)
    shrink_floor = BETA ** (-1 / (2 - LP_NORM))  # hqq's shrink is nonzero only above this
    if rtn_zero is None:
        # make_qx_quants maps the largest magnitude to the end of the range on its side: q_max
        # for a positive extreme, -q_min (one code more) for a negative one
        negative = -low > high
        extreme = torch.where(negative, -low, high)
        extreme_code = torch.where(negative, -q_min, q_max)
        starts = [(extreme / (extreme_code + offset), None) for offset in SYMMETRIC_OFFSETS]
    else:
        starts = []
        for offset in ASYMMETRIC_OFFSETS:
            scale = (high - low) / (steps + offset)
            starts.append((scale, torch.round(q_min - low / scale).nan_to_num_(0.0).clamp_(q_min, q_max)))
    for scale, zero in starts:
        if zero is None:
            zero = torch.zeros_like(scale)
        for iteration in range(ITERS + 1):
            stored_scale = _stored(scale, dtype, rtn_scale)
            # values = codes - zero, codes = clamp(round(w / s + z)): the nearest codes for the
            # stored s and z, so the lowest error for them under any weighting. w * (1 / s) rather
            # than w / s: any rule will do as long as the final codes are computed by the same one
            values = torch.addcmul(zero, w, 1.0 / stored_scale).round_().clamp_(q_min, q_max).sub_(zero)
            residual = torch.addcmul(w, values, stored_scale, value=-1)
            error = _row_dot_self(residual)
            weighted = _row_dot(importance * residual, residual)
            unclipped = residual.abs().amax(dim=1, keepdim=True) <= stored_scale * HALF_STEP
            best["free"].offer(weighted, stored_scale, zero, unclipped)
            best["bounded"].offer(
                weighted, stored_scale, zero, unclipped & (error < rtn_error * (1 - MARGIN))
            )
            if iteration == ITERS:
                break
            # the refit: make_qx_quants' weighted least squares for these codes, on hqq's target
            # w - W_e (W_e: hqq's sparse part of the residual, nonzero only for residuals above
            # shrink_floor, which LLM weights rarely reach)
            target = w
            if bool((residual.abs() > shrink_floor).any()):
                target = w - _shrink_lp(residual, BETA, LP_NORM)
            if rtn_zero is None:
                scale = _fit_scale(
                    _row_dot(importance * target, values), _row_dot(importance * values, values), scale
                )
            else:
                scale, zero = _fit_line(target, values, importance, scale, zero, q_min, q_max)

    out = {}
    for kind, chosen in best.items():
        values = torch.addcmul(chosen.zero, w, 1.0 / chosen.scale).round_().clamp_(q_min, q_max)
        codes = torch.where(chosen.from_rtn, rtn_codes, values.to(torch.int8))
        scale = torch.where(chosen.from_rtn, rtn_scale, chosen.scale.to(dtype))
        zero = (
            None if rtn_zero is None else torch.where(chosen.from_rtn, rtn_zero, chosen.zero.to(torch.int8))
        )
        out[kind] = (codes, scale, zero, int((~chosen.from_rtn).sum()))
    return out


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row dot products ``[rows, 1]`` (one batched matmul: one pass, no temporary)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1, 1)


def _row_dot_self(a: torch.Tensor) -> torch.Tensor:
    return _row_dot(a, a)


def _stored(scale: torch.Tensor, dtype: torch.dtype, fallback: torch.Tensor) -> torch.Tensor:
    """The scale as the checkpoint stores it (rounded to ``dtype``), back in float32. One that
    is not a positive finite number there (an all-zero group, a degenerate fit) takes rtn's."""
    finfo = torch.finfo(dtype)
    stored = scale.nan_to_num(0.0).clamp(max=finfo.max).to(dtype)
    return torch.where(stored > 0, stored, fallback).to(torch.float32)


def _shrink_lp(x: torch.Tensor, beta: float, lp_norm: float) -> torch.Tensor:
    """hqq's generalized soft threshold: sign(x) * relu(|x| - |x|^(p-1) / beta)."""
    magnitude = x.abs()
    shrunk = (magnitude - magnitude.pow(lp_norm - 1) / beta).clamp_min_(0.0)
    return torch.sign(x) * shrunk


def _fit_scale(target_dot: torch.Tensor, energy: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The least-squares scale of ``target ~ values * s`` per row from its (weighted) sums
    (make_qx_quants' ``sumlx / suml2``; the previous scale where the sums leave none)."""
    fitted = target_dot / energy.clamp_min(1e-30)
    return torch.where((energy > 0) & (fitted > 0), fitted, scale)


def _fit_line(
    target: torch.Tensor,
    values: torch.Tensor,
    importance: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    q_min: float,
    q_max: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``target ~ (codes - z) * s`` by weighted least squares per row, ``values`` = codes - z_old:
    the line ``target ~ slope * values + intercept`` gives z = z_old - intercept / slope, rounded
    to a code in range, and s is refitted for that integer z (make_qkx2_quants fits a float
    minimum; the scheme stores an integer zero). Rows without a usable fit keep s and z."""
    total = importance.sum(dim=1, keepdim=True)
    weighted_values = importance * values
    value_sum = weighted_values.sum(dim=1, keepdim=True)
    energy = _row_dot(weighted_values, values)
    target_sum = _row_dot(importance, target)
    target_dot = _row_dot(weighted_values, target)
    safe_total = total.clamp_min(1e-30)
    variance = energy - value_sum.square() / safe_total
    slope = (target_dot - target_sum * value_sum / safe_total) / variance.clamp_min(1e-30)
    usable = (total > 0) & (variance > 1e-6 * energy.clamp_min(1e-30)) & (slope > 0)
    slope = torch.where(usable, slope, scale)
    intercept = (target_sum - slope * value_sum) / safe_total
    new_zero = torch.round(zero - intercept / slope).nan_to_num_(0.0).clamp_(q_min, q_max)
    shift = zero - new_zero  # values' = values + shift
    shifted_dot = target_dot + shift * target_sum
    shifted_energy = energy + 2 * shift * value_sum + total * shift.square()
    new_scale = shifted_dot / shifted_energy.clamp_min(1e-30)
    usable &= (shifted_energy > 0) & (new_scale > 0)
    return torch.where(usable, new_scale, scale), torch.where(usable, new_zero, zero)
