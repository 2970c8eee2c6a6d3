"""HQQ's half-quadratic solver for the zero point: hqq's own algorithm, and qconv's fast one.

Both start as hqq's ``Quantizer.quantize(..., optimize=True)`` does (hqq 0.2.8, core/quantize.py
and core/optimize.py ``optimize_weights_proximal_legacy``), on groups of ``group_size`` weights
taken along ``axis``:

    scale = (2^b - 1) / (max - min)   (1 where max - min <= 1e-4, at most 2e4)
    zero  = -min * scale              (rounded when round_zero: hqq's default for 4 bits)

and then repeat, at most ``iters`` times, the proximal step on the zero point::

    W_q  = clamp(round(W * scale + zero), 0, 2^b - 1)
    W_r  = (W_q - zero) / scale
    W_e  = shrink_lp(W - W_r, beta, p)      sign(x) * relu(|x| - |x|^(p-1) / beta), p = 0.7
    zero = mean_group(W_q - (W - W_e) * scale)

The stored scale is ``1 / scale`` and dequantization is ``(W_q - zero) * scale``.

``quantize_reference`` is hqq's algorithm op for op, in float32 (hqq's CPU precision), with
its quirks kept: ``beta`` never grows (kappa is read but unused by the default solver), the
stopping test is the mean |W - W_r| of the WHOLE tensor, and the loop stops at the first
iteration that does not improve it yet keeps the zero that iteration computed (one step past
the best). tests/test_format_hqq.py pins codes, scale and zero equal to the installed hqq.

``quantize_fast`` is what ``--solver qconv`` (the default) runs. Deliberate differences:
- every group keeps, among the zero points its iterations visit, the one with the lowest
  squared error sum((W - W_r)^2) (the relative Frobenius error qconv reports). hqq's update of
  a group never looks at other groups (beta is constant), so each group follows hqq's exact
  trajectory and the zero hqq would have kept is among the candidates: per group the squared
  error is never above hqq's (float32 arithmetic, pinned by a test);
- a group whose zero stopped moving has reached a fixed point (every later iterate is the same),
  so its iterations end there; hqq runs its whole tensor until the mean error stops falling;
- float32 everywhere (hqq computes in float16 on the GPU);
- on CUDA one Triton kernel does everything for a block of groups in registers (the weight is
  read once, codes, scale and zero written once; no host synchronisation). Elsewhere the same
  algorithm runs as batched torch operations over all groups (no Python loop per group).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qconv.formats.triton_support import triton_available

# hqq 0.2.8 core/optimize.py: optimize_weights_proximal_legacy's defaults.
LP_NORM = 0.7
BETA = 10.0
KAPPA = 1.01  # recorded for completeness: hqq's default solver never applies it
ITERS = 20
# hqq 0.2.8 core/quantize.py Quantizer.quantize: denominators this small get scale 1, and the
# scale is capped so that float16 holds it.
MIN_RANGE = 1e-4
MAX_SCALE = 2e4
# Rows of groups the torch path works on at once, to bound its temporaries (~16 MB a buffer).
TORCH_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class SolverParams:
    bits: int
    group_size: int
    axis: int = 1
    round_zero: bool = False
    lp_norm: float = LP_NORM
    beta: float = BETA
    iters: int = ITERS

    @property
    def max_code(self) -> int:
        return 2**self.bits - 1


@dataclass
class QuantizedGroups:
    """``codes`` uint8 laid out as hqq's ``W_q`` before packing (``[groups, group_size]`` for
    axis 1, ``[group_size, groups]`` for axis 0), and the stored (inverted) ``scale`` and
    ``zero``, ``[groups, 1]`` or ``[1, groups]``. The fused GPU path returns the codes already
    packed (``packed``) and ``codes`` None."""

    codes: torch.Tensor | None
    scale: torch.Tensor
    zero: torch.Tensor
    packed: torch.Tensor | None = None


def grouped(weight: torch.Tensor, params: SolverParams) -> torch.Tensor:
    """The weight as hqq groups it: ``[-1, group_size]`` (axis 1) or ``[group_size, -1]`` (axis 0)."""
    w = weight.float()
    if params.axis == 1:
        return w.reshape(-1, params.group_size)
    return w.reshape(params.group_size, -1)


def initial_scale_zero(w: torch.Tensor, params: SolverParams, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    low = w.min(axis=axis, keepdim=True)[0]
    high = w.max(axis=axis, keepdim=True)[0]
    denom = high - low
    scale = params.max_code / denom
    scale = torch.where(denom.abs() <= MIN_RANGE, torch.full_like(scale, 1.0), scale)
    scale = scale.clamp(max=MAX_SCALE)
    zero = -low * scale
    if params.round_zero:
        zero = torch.round(zero)
    return scale, zero


def _shrink_lp(x: torch.Tensor, beta: float, lp_norm: float) -> torch.Tensor:
    out = torch.abs(x)
    out.sub_((1.0 / beta) * out.pow(lp_norm - 1)).clamp_min_(0.0)
    out.mul_(torch.sign(x))
    return out


# -- hqq's algorithm, exactly ------------------------------------------------------------------
@torch.inference_mode()
def quantize_reference(weight: torch.Tensor, params: SolverParams) -> QuantizedGroups:
    """hqq's ``Quantizer.quantize(optimize=True)`` in float32, quirks included (module doc)."""
    w = grouped(weight, params)
    axis = params.axis
    scale, zero = initial_scale_zero(w, params, axis)
    best_error = torch.tensor(torch.inf, dtype=torch.float32, device=w.device)
    for _ in range(params.iters):
        w_q = torch.round(w * scale + zero).clamp_(0, params.max_code)
        w_r = (w_q - zero) / scale
        w_e = _shrink_lp(w - w_r, params.beta, params.lp_norm)
        zero = torch.mean(w_q - (w - w_e) * scale, axis=axis, keepdim=True)
        current_error = torch.abs(w - w_r).mean().float()
        if current_error < best_error:
            best_error = current_error
        else:
            break  # hqq keeps the zero just computed, one step past the best
    codes = torch.round(w * scale + zero).clamp_(0, params.max_code)
    return QuantizedGroups(codes.to(torch.uint8), 1.0 / scale, zero)


# -- qconv's solver -----------------------------------------------------------------------------
def solve_rows_torch(
    w: torch.Tensor, params: SolverParams
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of ``w`` are groups. Returns codes, inverted scale and the best zero per row."""
    scale, zero = initial_scale_zero(w, params, 1)
    best_error = torch.full_like(zero, torch.inf)
    best_zero = zero
    for step in range(params.iters + 1):
        w_q = torch.round(w * scale + zero).clamp_(0, params.max_code)
        w_r = (w_q - zero) / scale
        error = (w - w_r).square_().sum(dim=1, keepdim=True)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_zero = torch.where(better, zero, best_zero)
        if step == params.iters:
            break
        w_e = _shrink_lp(w - w_r, params.beta, params.lp_norm)
        moved = zero
        zero = torch.mean(w_q - (w - w_e) * scale, axis=1, keepdim=True)
        if torch.equal(zero, moved):
            break  # every group at a fixed point: later iterates are all the same
    codes = torch.round(w * scale + best_zero).clamp_(0, params.max_code)
    return codes.to(torch.uint8), 1.0 / scale, best_zero


def solve_rows_chunked(
    w: torch.Tensor, params: SolverParams
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows_per_chunk = max(1, TORCH_CHUNK_ELEMENTS // w.shape[1])
    codes = torch.empty(w.shape, dtype=torch.uint8, device=w.device)
    scale = torch.empty((w.shape[0], 1), dtype=torch.float32, device=w.device)
    zero = torch.empty_like(scale)
    for start in range(0, w.shape[0], rows_per_chunk):
        part = slice(start, start + rows_per_chunk)
        codes[part], scale[part], zero[part] = solve_rows_torch(w[part], params)
    return codes, scale, zero


@torch.inference_mode()
def quantize_fast(
    weight: torch.Tensor,
    params: SolverParams,
    packing: str | None = None,
    scale_dtype: torch.dtype = torch.float32,
) -> QuantizedGroups:
    """qconv's solver (module doc): per-group best iterate, float32, fused on CUDA. With
    ``packing`` the fused path also packs the codes (groups along axis 1); ``scale_dtype`` is
    the dtype of the returned scale and zero. Raises ValueError for non-finite weights."""
    if params.axis == 1:
        rows = weight.reshape(-1, params.group_size)
    else:  # hqq's groups are then the columns of [group_size, -1]; solve them as rows
        rows = weight.reshape(params.group_size, -1).t()
    if rows.is_cuda and triton_available():
        fused_packing = packing if params.axis == 1 else None
        codes, scale, zero = solve_rows_triton(rows.contiguous(), params, fused_packing, scale_dtype)
        if fused_packing is not None:
            return QuantizedGroups(None, scale, zero, packed=codes)
    else:
        if not torch.isfinite(rows).all():
            raise ValueError("the weight has NaN or infinite values")
        codes, scale, zero = solve_rows_chunked(rows.float().contiguous(), params)
        scale, zero = scale.to(scale_dtype), zero.to(scale_dtype)
    if params.axis == 0:
        return QuantizedGroups(codes.t().contiguous(), scale.t().contiguous(), zero.t().contiguous())
    return QuantizedGroups(codes, scale, zero)


# -- the Triton kernel (formats/hqq_triton.py, imported only for CUDA tensors) ----------------
def solve_rows_triton(
    w: torch.Tensor,
    params: SolverParams,
    packing: str | None = None,
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from qconv.formats.hqq_triton import solve_rows

    return solve_rows(
        w, params.max_code, params.beta, params.lp_norm, params.iters, params.round_zero, packing, scale_dtype
    )
