"""``--solver hqq`` for compressed-tensors' integer schemes: HQQ's half-quadratic solver, held to
the numbers llm-compressor stores, and never worse than its round to nearest.

The bytes are those of ``--solver rtn`` (``ct_layout``): per group of ``group_size`` inputs (or
per output channel) a scale in the checkpoint's dtype and, for W4A16_ASYM only, an integer zero
point in the code range; codes in the full signed range ([-8, 7] for 4 bits), dequantized as
``(code - zero) * scale``. Only the values change: the solver picks scales (and zero points)
that reconstruct the weight better than llm-compressor's min/max ones.

Per group it runs HQQ's proximal iterations (formats/hqq_solver.py for the algorithm hqq
publishes) from several starting ranges, the grid kept as the scheme fixes it::

    W_q = clamp(round(W / s + z))                codes for the stored s (and integer z)
    W_r = (W_q - z) * s
    W_e = shrink_lp(W - W_r, beta, p)            hqq's sparse error term (p = 0.7, beta = 10)
    symmetric:  s = <W - W_e, W_q> / <W_q, W_q>  (z stays 0: the half-quadratic step on the scale)
    asymmetric: the line through (W_q, W - W_e) by least squares gives s and z; z is rounded to
                an integer code and s refitted for it

hqq itself moves only a float zero point with the scale fixed; the schemes here leave no float
zero (symmetric: none; asymmetric: an integer), so the scale is what the iterations move. With
hqq's beta = 10, ``shrink_lp`` is nonzero only for residuals above 0.17, which LLM weights
rarely reach (a clipped outlier does): for most groups the step is the plain least-squares one,
and outliers are left out of the fit as hqq leaves them.

The starting scales run from llm-compressor's (absmax / 7.5, or (max - min) / 15) down to the
smallest one that clips no weight (``START_FACTORS``), and no candidate may leave any weight
farther than half a step from its code, the bound rtn keeps: the search spends the grid better
(symmetric: a group whose largest magnitude is negative can use code -8 fully) but never clips
outliers. Clipping lowers the mean squared error further (9.8% below rtn's on SmolLM2's layers
at W4A16 g64, against about 5% here) but raised SmolLM2's wikitext-2 perplexity from 26.83
(rtn) to 28.69 (bench/run_ct.py, 8 windows): the outliers it sacrifices matter more than the
error it saves.

The guarantee: every candidate is measured in the numbers that would be stored (the scale
rounded to the checkpoint's dtype, integer codes and zero points, float32 arithmetic), and a
group keeps llm-compressor's own numbers (``ct_layout.quantize_rtn``, byte for byte) unless a
candidate's squared error is lower (by more than float32's rounding of the sum: ``MARGIN``).
A layer whose total error would still not be lower (float32 sums over different groupings
could in principle disagree) is stored as rtn's whole.
So each layer's relative error is at most rtn's, as ``layer_error`` measures both
(tests/test_ct_hqq.py checks it on random, heavy-tailed and tiny-Llama weights).

Everything is batched torch over all groups (chunks of rows bound the temporaries): no Python
loop per group, and the same code runs on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qconv.formats import ct_layout
from qconv.formats.hqq_solver import BETA, LP_NORM

#: HQQ iterations from each start (each evaluates the stored numbers once, then steps)
ITERS = 3
#: starting scales, from the smallest that clips no weight (0) to llm-compressor's (1)
START_FACTORS = (1.0, 0.0)
#: the largest error a weight may keep, in steps: half of one (no clipping), with float32's
#: rounding of ``w / s`` allowed for
HALF_STEP = 0.5 * (1 + 1e-5)
#: how much lower (relatively) a candidate's squared error must be to replace the best so far:
#: above float32's rounding of a group's sum, so that "lower" holds however it is summed
MARGIN = 1e-5
#: weights a chunk of groups holds at most (bounds the float32 temporaries to ~4 MB each)
CHUNK_ELEMENTS = 1 << 20


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


def solver_settings() -> dict:
    """The solver's constants, recorded in the recipe (so the manifest says what ran)."""
    return {"iters": ITERS, "start_factors": list(START_FACTORS), "lp_norm": LP_NORM, "beta": BETA}


@torch.inference_mode()
def quantize_hqq(weight: torch.Tensor, scheme: ct_layout.Scheme, group_size: int | None) -> Solved:
    """``weight`` ``[out, in]`` in the checkpoint's dtype (finite; ``group_size`` divides ``in``),
    an integer scheme. Returns numbers in :class:`ct_layout.Quantized`'s layout, never worse per
    group than :func:`ct_layout.quantize_rtn` (module doc)."""
    if scheme.weight_type != "int":
        raise ValueError(f"{scheme.name}: the hqq solver searches integer grids only")
    rtn = ct_layout.quantize_rtn(weight, scheme, group_size)
    out_features, in_features = weight.shape
    size = in_features if scheme.strategy == "channel" else group_size
    rows = weight.to(torch.float32).reshape(-1, size)  # one group a row
    rtn_codes = rtn.codes.reshape(-1, size)
    rtn_scale = rtn.scale.reshape(-1, 1)
    rtn_zero = None if rtn.zero_point is None else rtn.zero_point.reshape(-1, 1)
    codes = torch.empty_like(rtn_codes)
    scale = torch.empty_like(rtn_scale)
    zero = None if rtn_zero is None else torch.empty_like(rtn_zero)
    improved = 0
    step = max(1, CHUNK_ELEMENTS // size)
    for start in range(0, rows.shape[0], step):
        part = slice(start, start + step)
        chunk = _solve_rows(
            rows[part], rtn_codes[part], rtn_scale[part], None if rtn_zero is None else rtn_zero[part], scheme
        )
        codes[part], scale[part] = chunk[0], chunk[1]
        if zero is not None:
            zero[part] = chunk[2]
        improved += chunk[3]
    groups = scale.numel()
    solved = ct_layout.Quantized(
        codes.reshape(out_features, in_features),
        scale.reshape(out_features, -1),
        None if zero is None else zero.reshape(out_features, -1),
    )
    rel_error = relative_error(weight, solved, in_features)
    rtn_rel_error = relative_error(weight, rtn, in_features)
    if not rel_error <= rtn_rel_error:
        return Solved(rtn, rtn_rel_error, rtn_rel_error, 0, groups)
    return Solved(solved, rel_error, rtn_rel_error, improved, groups)


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


def _solve_rows(
    w: torch.Tensor,
    rtn_codes: torch.Tensor,
    rtn_scale: torch.Tensor,
    rtn_zero: torch.Tensor | None,
    scheme: ct_layout.Scheme,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """Groups are the rows of ``w`` (float32). Returns codes, scale, zero (None when symmetric)
    and the number of groups that left rtn's numbers."""
    q_min, q_max = ct_layout.code_range(scheme)
    steps = q_max - q_min  # 15 for 4 bits
    dtype = rtn_scale.dtype
    size = w.shape[1]
    # rtn's error, from its own codes (computed in the checkpoint's dtype, so not always the
    # nearest codes for its scale: kept as they are, since those are the bytes it writes)
    rtn_values = rtn_codes.to(torch.float32)
    if rtn_zero is not None:
        rtn_values -= rtn_zero.to(torch.float32)
    best_error = _row_dot_self(torch.addcmul(w, rtn_values, rtn_scale.to(torch.float32), value=-1))
    best_scale = rtn_scale.to(torch.float32)
    best_zero = torch.zeros_like(best_scale) if rtn_zero is None else rtn_zero.to(torch.float32)
    from_rtn = torch.ones_like(best_error, dtype=torch.bool)

    low = w.amin(dim=1, keepdim=True)
    high = w.amax(dim=1, keepdim=True)
    w_sum = w.sum(dim=1, keepdim=True)
    # hqq's shrink is nonzero only for residuals above this; a row whose squared error is
    # below its square has none
    shrink_floor = BETA ** (-1 / (2 - LP_NORM))
    # no weight may end farther than half a step from its code (rtn's bound, which keeps the
    # outliers): the smallest scale that allows it, and a candidate breaking it is refused.
    # Symmetric: high <= (q_max + 1/2) s and -low <= (1/2 - q_min) s; asymmetric: the range
    # must fit steps + 1 half-open steps
    if rtn_zero is None:
        scale_floor = torch.maximum(high / (q_max + 0.5), -low / (0.5 - q_min))
    else:
        scale_floor = (high - low) / (steps + 1)
    for factor in START_FACTORS:
        if rtn_zero is None:
            # factor 1: llm-compressor's absmax / 7.5; 0: the floor (finer where absmax is -low)
            rtn_like = torch.maximum(low.abs(), high.abs()) / (steps / 2)
            scale = scale_floor + factor * (rtn_like - scale_floor)
            zero = torch.zeros_like(scale)
        else:
            scale = scale_floor + factor * ((high - low) / steps - scale_floor)
            middle = (low + high) / 2
            zero = torch.round((q_min + q_max) / 2 - middle / scale).nan_to_num_(0.0).clamp_(q_min, q_max)
        for iteration in range(ITERS + 1):
            stored_scale = _stored(scale, dtype, rtn_scale)
            # values = codes - zero, codes = clamp(round(w / s + z)); w * (1 / s) rather than
            # w / s: any rule will do as long as the final codes are computed by the same one
            values = torch.addcmul(zero, w, 1.0 / stored_scale).round_().clamp_(q_min, q_max).sub_(zero)
            residual = torch.addcmul(w, values, stored_scale, value=-1)
            error = _row_dot_self(residual)
            unclipped = residual.abs().amax(dim=1, keepdim=True) <= stored_scale * HALF_STEP
            better = (error < best_error * (1 - MARGIN)) & unclipped
            best_error = torch.where(better, error, best_error)
            best_scale = torch.where(better, stored_scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
            from_rtn &= ~better
            if iteration == ITERS:
                break
            # the half-quadratic step: fit the scale (and zero) to w - W_e, where W_e is hqq's
            # sparse part of the residual; sums over w - W_e are sums over w minus W_e's
            target_dot = _row_dot(w, values)
            target_sum = w_sum
            sparse_rows = (error > shrink_floor**2).flatten().nonzero().flatten()
            if sparse_rows.numel():
                sparse = _shrink_lp(residual[sparse_rows], BETA, LP_NORM)
                target_dot = target_dot.index_add(0, sparse_rows, -_row_dot(sparse, values[sparse_rows]))
                target_sum = target_sum.index_add(0, sparse_rows, -sparse.sum(dim=1, keepdim=True))
            energy = _row_dot_self(values)
            if rtn_zero is None:
                scale = torch.maximum(_fit_scale(target_dot, energy, scale), scale_floor)
            else:
                value_sum = values.sum(dim=1, keepdim=True)
                scale, zero = _fit_line(
                    target_dot, target_sum, energy, value_sum, size, scale, zero, q_min, q_max
                )
                scale = torch.maximum(scale, scale_floor)

    values = torch.addcmul(best_zero, w, 1.0 / best_scale).round_().clamp_(q_min, q_max)
    codes = torch.where(from_rtn, rtn_codes, values.to(torch.int8))
    scale = torch.where(from_rtn, rtn_scale, best_scale.to(dtype))
    zero = None if rtn_zero is None else torch.where(from_rtn, rtn_zero, best_zero.to(torch.int8))
    return codes, scale, zero, int((~from_rtn).sum())


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
    """The least-squares scale of ``target ~ values * s`` per row from its sums (the previous
    scale where all values are 0)."""
    fitted = target_dot / energy.clamp_min(1.0)
    return torch.where((energy > 0) & (fitted > 0), fitted, scale)


def _fit_line(
    target_dot: torch.Tensor,
    target_sum: torch.Tensor,
    energy: torch.Tensor,
    value_sum: torch.Tensor,
    size: int,
    scale: torch.Tensor,
    zero: torch.Tensor,
    q_min: float,
    q_max: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``target ~ (codes - z) * s`` by least squares per row, from the sums over ``values`` =
    codes - z_old: the line ``target ~ slope * values + intercept`` gives z = z_old -
    intercept / slope, rounded to a code in range, and s is refitted for that integer z (the
    values shift by z_old - z). Rows whose values are all equal keep the previous s and z."""
    variance = energy - value_sum.square() / size
    slope = (target_dot - target_sum * value_sum / size) / variance.clamp_min(1e-30)
    usable = (variance > 1e-6) & (slope > 0)
    slope = torch.where(usable, slope, scale)
    intercept = (target_sum - slope * value_sum) / size
    new_zero = torch.round(zero - intercept / slope).clamp_(q_min, q_max)
    shift = zero - new_zero  # values' = values + shift
    shifted_dot = target_dot + shift * target_sum
    shifted_energy = energy + 2 * shift * value_sum + size * shift.square()
    new_scale = shifted_dot / shifted_energy.clamp_min(1.0)
    usable &= (shifted_energy > 0) & (new_scale > 0)
    return torch.where(usable, new_scale, scale), torch.where(usable, new_zero, zero)
