"""The fused GPU kernel of qconv's HQQ solver (the algorithm, and where it differs from hqq's:
formats/hqq_solver.py). One program takes a block of groups, keeps them in registers through
all iterations, stops when every zero of the block has reached its fixed point, and writes
codes (already in hqq's bit packing, for groups along axis 1), scale and zero once.

hqq packs ``per`` codes into one storage element from rows ``j, j + step, ..., j + (per-1) *
step`` of the codes (``step`` = rows / per, rows padded with zeros to a multiple of 10 for
3 bits). A program therefore takes packed rows ``j`` of a block and solves the ``per`` groups
rows that go into them, so the codes never reach memory unpacked.

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

from qconv.formats.hqq_layout import BITS_PER_CODE, CODES_PER_ELEMENT


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
    packed_ptr,
    scale_ptr,
    zero_ptr,
    bad_ptr,
    n_rows,
    step,
    max_code,
    inv_beta,
    lp_minus_one,
    GROUP: tl.constexpr,
    GROUP_P2: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    ITERS: tl.constexpr,
    ROUND_ZERO: tl.constexpr,
    PER: tl.constexpr,
    CODE_BITS: tl.constexpr,
):
    packed_rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    packed_ok = packed_rows < step
    cols = tl.arange(0, GROUP_P2)
    col_ok = cols < GROUP
    packed = tl.zeros((BLOCK_ROWS, GROUP_P2), tl.int32)
    ones = tl.full((BLOCK_ROWS,), 1.0, tl.float32)
    for slot in tl.static_range(PER):
        rows = slot * step + packed_rows
        row_ok = packed_ok & (rows < n_rows)  # rows past n_rows: hqq's zero padding (3 bits)
        mask = row_ok[:, None] & col_ok[None, :]
        offsets = rows[:, None].to(tl.int64) * GROUP + cols[None, :]
        w = tl.load(w_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        finite = tl.abs(w) < float("inf")  # false for inf and NaN
        bad = tl.sum(tl.where(mask & ~finite, 1, 0))
        tl.atomic_add(bad_ptr, bad, mask=bad > 0)

        if GROUP == GROUP_P2:
            low = tl.min(w, axis=1)
            high = tl.max(w, axis=1)
        else:
            low = tl.min(tl.where(col_ok[None, :], w, float("inf")), axis=1)
            high = tl.max(tl.where(col_ok[None, :], w, float("-inf")), axis=1)
        denom = high - low
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
        iteration = 0
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
            # hqq's shrink: sign(d) * max(|d| - |d|^(p-1) / beta, 0); |d|^(p-1) = inf at 0 keeps 0
            a = tl.abs(d)
            shrunk = tl.maximum(a - inv_beta * tl.exp2(tl.log2(a) * lp_minus_one), 0.0)
            w_e = tl.where(d < 0, -shrunk, shrunk)
            target = w_q + w_e * s
            if GROUP != GROUP_P2:
                target = tl.where(col_ok[None, :], target, 0.0)
            new_zero = tl.sum(target, axis=1) / GROUP - mean_w_scaled
            moved = tl.max(tl.where(row_ok & (new_zero != zero), 1, 0), axis=0)
            zero = new_zero
            iteration += 1
            go = (moved > 0) & (iteration <= ITERS)

        codes = tl.minimum(tl.maximum(_round(w * s + best_zero[:, None]), 0.0), max_code)
        codes = tl.where(mask, codes, 0.0).to(tl.int32)
        packed = packed | (codes << (CODE_BITS * (PER - 1 - slot)))
        tl.store(scale_ptr + rows, inv_scale, mask=row_ok)
        tl.store(zero_ptr + rows, best_zero, mask=row_ok)

    out_offsets = packed_rows[:, None].to(tl.int64) * GROUP + cols[None, :]
    out_mask = packed_ok[:, None] & col_ok[None, :]
    tl.store(packed_ptr + out_offsets, packed.to(packed_ptr.dtype.element_ty), mask=out_mask)


# hqq's packings (formats/hqq_layout.py): codes per storage element, bits a code; None: unpacked
PACKINGS = {None: (1, 8), **{p: (CODES_PER_ELEMENT[p], BITS_PER_CODE[p]) for p in CODES_PER_ELEMENT}}


def solve_rows(
    w: torch.Tensor,
    max_code: int,
    beta: float,
    lp_norm: float,
    iters: int,
    round_zero: bool,
    packing: str | None = None,
    scale_dtype: torch.dtype = torch.float32,
    block_rows: int | None = None,
    num_warps: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of ``w`` (any float dtype, contiguous, on CUDA) are groups. Returns the codes (packed
    along rows as hqq packs them when ``packing`` is given, else uint8 ``[rows, group]``), the
    inverted scale and the zero (``[rows, 1]``, in ``scale_dtype``). Raises ValueError for
    non-finite weights."""
    n_rows, group = w.shape
    per, code_bits = PACKINGS[packing]
    step = -(-n_rows // per)
    if per > 1 and packing != "3bit_32" and n_rows % per:
        raise ValueError(f"{n_rows} rows cannot be packed {per} an element")
    storage = torch.int32 if packing == "3bit_32" else torch.uint8
    packed = torch.empty((step, group), dtype=storage, device=w.device)
    scale = torch.empty((n_rows, 1), dtype=scale_dtype, device=w.device)
    zero = torch.empty_like(scale)
    bad = torch.zeros(1, dtype=torch.int32, device=w.device)
    group_p2 = triton.next_power_of_2(group)
    if block_rows is None:
        # small blocks end sooner (a block runs until its slowest group converges): one warp on
        # one packed row of groups of 64 measured fastest on the H100 (131-134 GB/s for 2/4/8
        # bits and 93 GB/s for 3 bits, against 97/16/43/115 GB/s with 8 rows)
        block_rows = max(1, 64 // group_p2)
    grid = (triton.cdiv(step, block_rows),)
    hqq_rows_kernel[grid](
        w,
        packed,
        scale,
        zero,
        bad,
        n_rows,
        step,
        float(max_code),
        1.0 / beta,
        lp_norm - 1.0,
        GROUP=group,
        GROUP_P2=group_p2,
        BLOCK_ROWS=block_rows,
        ITERS=iters,
        ROUND_ZERO=round_zero,
        PER=per,
        CODE_BITS=code_bits,
        num_warps=num_warps,
    )
    if int(bad.item()):
        raise ValueError("the weight has NaN or infinite values")
    return packed, scale, zero
