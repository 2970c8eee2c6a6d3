"""The fused GPU kernel of qconv's HQQ solver (the algorithm, and where it differs from hqq's:
formats/hqq_solver.py). One program takes a block of groups, keeps them in registers through
all iterations, stops when every zero of the block has reached its fixed point, and writes
codes, scale and zero once.

Per iteration it evaluates hqq's step with the algebra rearranged to save instructions (the
values are the same up to float32 rounding)::

    t   = W * scale + zero              W_q = clamp(round(t))
    d   = (t - W_q) / scale             (= W - W_r)
    zero' = mean(W_q - (W - W_e) * scale) = mean(W_q + W_e * scale) - mean(W) * scale
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _round_half_even_portable(x):
    """torch.round's rounding (halves to even) from floor, for Triton's CPU interpreter."""
    low = tl.floor(x)
    frac = x - low
    odd = low - 2.0 * tl.floor(low * 0.5)
    return tl.where(frac > 0.5, low + 1.0, tl.where(frac < 0.5, low, low + odd))


if os.environ.get("TRITON_INTERPRET") == "1":
    _round = _round_half_even_portable
else:  # one instruction on the GPU (cvt.rni), also halves to even
    from triton.language.extra import libdevice

    _round = libdevice.rint


@triton.jit
def hqq_rows_kernel(
    w_ptr,
    codes_ptr,
    scale_ptr,
    zero_ptr,
    n_rows,
    max_code,
    inv_beta,
    lp_minus_one,
    GROUP: tl.constexpr,
    GROUP_P2: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    ITERS: tl.constexpr,
    ROUND_ZERO: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, GROUP_P2)
    row_ok = rows < n_rows
    col_ok = cols < GROUP
    mask = row_ok[:, None] & col_ok[None, :]
    offsets = rows[:, None].to(tl.int64) * GROUP + cols[None, :]
    w = tl.load(w_ptr + offsets, mask=mask, other=0.0).to(tl.float32)

    if GROUP == GROUP_P2:
        low = tl.min(w, axis=1)
        high = tl.max(w, axis=1)
    else:
        low = tl.min(tl.where(col_ok[None, :], w, float("inf")), axis=1)
        high = tl.max(tl.where(col_ok[None, :], w, float("-inf")), axis=1)
    denom = high - low
    ones = tl.full((BLOCK_ROWS,), 1.0, tl.float32)
    # hqq writes max_code / denom; torch evaluates a number over a tensor as reciprocal * number
    scale = tl.math.div_rn(ones, denom) * max_code
    scale = tl.where(tl.abs(denom) <= 1e-4, 1.0, scale)
    scale = tl.minimum(scale, 2e4)
    inv_scale = tl.math.div_rn(ones, scale)
    zero = -low * scale
    if ROUND_ZERO:
        zero = _round(zero)
    mean_w_scaled = tl.sum(w, axis=1) / GROUP * scale
    s = scale[:, None]
    inv_s = inv_scale[:, None]

    best_error = tl.full((BLOCK_ROWS,), float("inf"), tl.float32)
    best_zero = zero
    step = 0
    go = True
    while go:
        t = w * s + zero[:, None]
        w_q = tl.minimum(tl.maximum(_round(t), 0.0), max_code)
        d = (t - w_q) * inv_s
        if GROUP != GROUP_P2:
            d = tl.where(col_ok[None, :], d, 0.0)
        error = tl.sum(d * d, axis=1)
        better = error < best_error
        best_error = tl.where(better, error, best_error)
        best_zero = tl.where(better, zero, best_zero)
        # hqq's shrink: sign(d) * max(|d| - |d|^(p-1) / beta, 0); |d|^(p-1) is inf at 0, so 0 stays 0
        a = tl.abs(d)
        shrunk = tl.maximum(a - inv_beta * tl.exp2(tl.log2(a) * lp_minus_one), 0.0)
        w_e = tl.where(d < 0, -shrunk, shrunk)
        target = w_q + w_e * s
        if GROUP != GROUP_P2:
            target = tl.where(col_ok[None, :], target, 0.0)
        new_zero = tl.sum(target, axis=1) / GROUP - mean_w_scaled
        moved = tl.max(tl.where(row_ok & (new_zero != zero), 1, 0), axis=0)
        zero = new_zero
        step += 1
        go = (moved > 0) & (step <= ITERS)

    codes = tl.minimum(tl.maximum(_round(w * s + best_zero[:, None]), 0.0), max_code)
    tl.store(codes_ptr + offsets, codes.to(tl.uint8), mask=mask)
    tl.store(scale_ptr + rows, inv_scale, mask=row_ok)
    tl.store(zero_ptr + rows, best_zero, mask=row_ok)


def solve_rows(
    w: torch.Tensor,
    max_code: int,
    beta: float,
    lp_norm: float,
    iters: int,
    round_zero: bool,
    block_rows: int | None = None,
    num_warps: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of ``w`` (any float dtype, contiguous, on CUDA) are groups: codes, inverted scale, zero."""
    n_rows, group = w.shape
    codes = torch.empty((n_rows, group), dtype=torch.uint8, device=w.device)
    scale = torch.empty((n_rows, 1), dtype=torch.float32, device=w.device)
    zero = torch.empty_like(scale)
    group_p2 = triton.next_power_of_2(group)
    if block_rows is None:
        # small blocks end sooner (a block runs until its slowest group converges): one warp
        # on 256 weights measured fastest on the H100 (149 GB/s vs 106 GB/s for 32 rows on
        # 4 warps, 4-bit g64, 8B-shaped matrices)
        block_rows = max(1, 256 // group_p2)
    grid = (triton.cdiv(n_rows, block_rows),)
    hqq_rows_kernel[grid](
        w,
        codes,
        scale,
        zero,
        n_rows,
        float(max_code),
        1.0 / beta,
        lp_norm - 1.0,
        GROUP=group,
        GROUP_P2=group_p2,
        BLOCK_ROWS=block_rows,
        ITERS=iters,
        ROUND_ZERO=round_zero,
        num_warps=num_warps,
    )
    return codes, scale, zero
