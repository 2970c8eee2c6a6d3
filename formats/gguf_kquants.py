"""GGUF's k-quant blocks (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) computed in torch, with two solvers.

Each quantizer takes a float32 weight ``[rows, n]`` (``n`` a multiple of 256) and returns the
bytes of ggml's ``block_qN_K`` structs, ``uint8 [rows, n // 256 * type_size]``, on the weight's
device. A 256-value *super-block* holds sub-blocks (16 of 16 values for Q2_K/Q3_K/Q6_K, 8 of 32
for Q4_K/Q5_K), each with a small integer scale (and, for Q2_K/Q4_K/Q5_K, an integer min) that
the fp16 super-block scale ``d`` (and ``dmin``) multiplies:

    Q2_K, Q4_K, Q5_K:  x ~ d * sc_j * q - dmin * m_j      q in [0, 2^bits - 1]
    Q3_K, Q6_K:        x ~ d * sc_j * q                   q in [-2^(bits-1), 2^(bits-1) - 1]

Solvers:

- ``"llama"`` repeats what ``ggml_quantize_chunk(type, ..., imatrix=NULL)`` computes in
  llama.cpp's ``ggml/src/ggml-quants.c`` (``quantize_row_qN_K_ref`` with ``make_qkx2_quants``,
  ``make_q3_quants`` and ``make_qx_quants``), vectorized over blocks. Every float32 operation is
  done in C's order, sums included (a loop over the 16 or 32 values of a sub-block, each step
  over all blocks at once), ``nearest_int`` is round-half-even (``torch.round``), fp16 is
  round-to-nearest-even like ``ggml_compute_fp32_to_fp16``, and integer casts wrap as C's do.
  Measured (tests/test_gguf_kquants.py; run as a script it times a 4096 x 4096 tensor): 100%
  identical 256-blocks against ggml_quantize for all five types, on random-normal, Student-t and
  edge-case rows (zeros, an outlier, all-negative, constant, tiny values).
- ``"qconv"`` writes the same block format, searched for a lower unweighted squared error. From
  two starts (llama's solution; sub-blocks fitted with weights 1 by make_qkx2_quants' search,
  sub-scales quantized against the largest) it alternates, QCONV_ITERATIONS times: (1) nearest
  codes for the current scales; (2) per sub-block, the least-squares (scale, min) given the codes,
  rounded to the best integer pair (floor/ceil) by the exact error at fixed codes, then an exact
  search of the integer sub-scales and sub-mins within QCONV_RADIUS of it, each with its own
  nearest codes; (3) per super-block, the least-squares (d, dmin) given the codes and integer
  sub-scales, rounded to fp16. The best state seen is kept, and per 256-block the final answer is
  whichever of llama's and qconv's stored solutions has the lower error, so qconv is never worse
  than llama on any block. Measured on 1024 x 2048 tensors (squared error qconv / llama, whole
  tensor; median over blocks):

                 Q2_K           Q3_K           Q4_K           Q5_K           Q6_K
      normal     0.768 (0.773)  0.904 (0.908)  0.952 (0.955)  0.901 (0.905)  0.941 (0.946)
      t, df=4    0.704 (0.725)  0.910 (0.912)  0.943 (0.948)  0.895 (0.900)  0.943 (0.947)

  It costs 2-5x llama's time on a GPU (4096 x 4096 on an H100: llama 0.05-0.17 s, qconv
  0.15-0.61 s per type) and about 3.5-6.5x on one CPU thread, where llama's own is 4-7x the time
  of ggml's C (bench/results/gguf_quantizer_cpu.json).

Rows are processed in chunks so that memory stays bounded (a few hundred MB) for any tensor; on the
CPU, smaller chunks spread over threads with one torch thread each (gguf_quants.run_chunks).
"""

from __future__ import annotations

from collections.abc import Callable

import gguf
import numpy as np
import torch

from qconv.errors import SourceError, UsageError
from qconv.formats.gguf_quants import CPU_CHUNK_VALUES, run_chunks

QK_K = 256  # values per super-block (ggml-common.h)
SOLVERS = ("llama", "qconv")
# ggml-quants.c: GROUP_MAX_EPS, below which a group's max |x| counts as all zero
GROUP_MAX_EPS = 1e-15
# values per chunk of rows: the solvers hold a few dozen float32 temporaries of a chunk's size,
# so 2^20 values stay under about 200 MB whatever the tensor (a GPU takes 4x more per chunk)
CHUNK_ELEMENTS = 1 << 20
CUDA_CHUNK_FACTOR = 4
QCONV_ITERATIONS = 4
QCONV_RADIUS = 1  # sub-scale / sub-min neighbourhood searched exactly


def type_size(type_name: str) -> int:
    """Bytes of one 256-value block of ``type_name``, as gguf-py states them."""
    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]][1]


# ---------------------------------------------------------------- float32 arithmetic as C does it


def _seqsum(t: torch.Tensor) -> torch.Tensor:
    """Sum over dim 0 first to last, as ggml's ``for (i...) sum += t[i]`` (float32 addition is not
    associative, and torch's own sum adds in another order). The solvers below keep a block's
    values along dim 0 ([n, blocks] or [n, sums, blocks]) so that each step adds contiguous rows;
    several sums stacked along dim 1 take one loop (fewer, larger ops). In place after the first
    addition: the same float32 additions without a new tensor per step."""
    if t.shape[0] == 1:
        return t[0].clone()
    acc = t[0] + t[1]
    for i in range(2, t.shape[0]):
        acc.add_(t[i])
    return acc


def _const(like: torch.Tensor, value: float) -> torch.Tensor:
    # a divisor as a full tensor: torch may turn "tensor / python scalar" into a multiplication by
    # the reciprocal (CUDA does), which is not C's division
    return torch.full_like(like, float(np.float32(value)))


def _f16(t: torch.Tensor) -> torch.Tensor:
    """fp16 rounding (round to nearest even, as ggml_compute_fp32_to_fp16), back as float32."""
    return t.to(torch.float16).to(torch.float32)


def _wrap_u8(t: torch.Tensor) -> torch.Tensor:
    """C's conversion of an int to uint8_t (modulo 256), on an int64 tensor."""
    return t & 255


def _wrap_i8(t: torch.Tensor) -> torch.Tensor:
    return ((t + 128) & 255) - 128


def _as_int(t: torch.Tensor) -> torch.Tensor:
    # nearest_int's result as an integer tensor; non-finite values (masked out later) become 0
    return torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0).clamp(-(2**30), 2**30).to(torch.int64)


# ---------------------------------------------------------------- ggml-quants.c's sub-block solvers
# Speed: a choice among candidates keeps the candidate's scale (a [blocks] tensor), not its codes
# (a full [n, blocks] torch.where per candidate, with a mask that changes along the contiguous
# dimension: branchy and slow on the CPU); the chosen codes are computed once at the end by the
# very same float32 operations, so they are the same numbers.


def _make_qkx2_quants(
    x: torch.Tensor, w: torch.Tensor | None, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml-quants.c make_qkx2_quants over rows of ``x`` [B, n] with weights ``w`` (None: all 1,
    whose products are skipped: 1*v is v exactly): (scale [B], the_min [B] (>= 0, subtracted),
    codes [B, n] as float)."""
    unit = w is None
    x = x.T.contiguous()  # [n, B]
    w = torch.ones_like(x) if unit else w.T.contiguous()
    n = x.shape[0]
    diff = torch.empty_like(x)
    sums = torch.empty((n, 3, x.shape[1]), dtype=x.dtype, device=x.device)

    def codes_for(iscale: torch.Tensor, mn: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        # nearest_int(iscale*(x[i] - min)), clamped to [0, nmax]
        return torch.sub(x, mn, out=out).mul_(iscale).round_().clamp_(0, nmax)

    def error(scale: torch.Tensor, codes: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
        # sum of w * (scale*l + min - x)^2 (or |.|), in C's order
        torch.mul(codes, scale, out=diff).add_(mn).sub_(x)
        per_value = diff.abs_() if use_mad else diff.mul_(diff)
        return _seqsum(per_value if unit else per_value.mul_(w))

    mn = x.amin(0).clamp(max=0.0)  # if (min > 0) min = 0
    mx = x.amax(0)
    sum_w = _seqsum(w)
    sum_x = _seqsum(x if unit else w * x)
    flat = mx == mn  # max == min (after min was clamped to 0): all codes 0
    span = mx - mn
    iscale = _const(span, nmax) / span
    scale = _const(iscale, 1.0) / iscale
    aux = codes_for(iscale, mn, torch.empty_like(x))
    best = error(scale, aux, mn)
    code_iscale, code_min = iscale, mn  # what the chosen codes are computed from

    # the steps run in order: a better candidate replaces min, and the next step's iscale and
    # x - min use the new one (as C reassigns min inside its loop)
    for s in range(nstep + 1):
        factor = float((np.float32(rmin) + np.float32(rdelta) * np.float32(s)) + np.float32(nmax))
        span = mx - mn
        iscale = _const(span, factor) / span
        codes_for(iscale, mn, aux)
        if unit:
            sums[:, 0].copy_(aux)
        else:
            torch.mul(w, aux, out=sums[:, 0])
        torch.mul(sums[:, 0], aux, out=sums[:, 1])
        torch.mul(sums[:, 0], x, out=sums[:, 2])
        sum_l, sum_l2, sum_xl = _seqsum(sums)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(positive, sum_xl / sum_l2, this_scale)
        cur = error(this_scale, aux, this_min)
        take = (det > 0) & (cur < best)
        best = torch.where(take, cur, best)
        scale = torch.where(take, this_scale, scale)
        code_iscale = torch.where(take, iscale, code_iscale)
        code_min = torch.where(take, mn, code_min)
        mn = torch.where(take, this_min, mn)
    codes = codes_for(code_iscale, code_min, aux)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    codes = torch.where(flat, torch.zeros_like(codes), codes)
    return scale, -mn, codes.T


def _positive_max(t: torch.Tensor) -> torch.Tensor:
    """Largest value per row, or +0 when none is above 0 (C's ``max = 0; if (v > max) max = v``;
    clamp would keep a -0.0, which fp16 writes as 0x8000)."""
    m = t.amax(-1)
    return torch.where(m > 0, m, torch.zeros_like(m))


def _signed_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x at the first largest |x|, that |x|) per row, as ggml's ``if (ax > amax)`` loop."""
    index = x.abs().argmax(-1, keepdim=True)
    value = x.gather(-1, index)[..., 0]
    return value, value.abs()


def _make_qx_quants(x: torch.Tensor, w: torch.Tensor | None, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml-quants.c make_qx_quants (rmse_type 1 with w = x*x, or given weights; None: all 1,
    products skipped) over rows of ``x`` [B, n]: (scale [B], codes [B, n] in [0, 2*nmax - 1] as
    float; 0 for an all-zero row)."""
    mx, amax = _signed_max(x)
    unit = w is None
    x = x.T.contiguous()  # [n, B]
    w = None if unit else w.T.contiguous()
    steps = [0] + [s for s in range(-9, 10) if s != 0]
    # iscale = -(nmax + 0.1f*is) / max, the first one -nmax / max
    grid = [float(np.float32(nmax) + np.float32(0.1) * np.float32(s)) if s else float(nmax) for s in steps]
    wx = x if unit else w * x
    ls = torch.empty_like(x)
    sums = torch.empty((x.shape[0], 2, x.shape[1]), dtype=x.dtype, device=x.device)
    scale = best = code_iscale = None
    for s, g in enumerate(grid):
        iscale = _const(mx, -g) / mx
        torch.mul(x, iscale, out=ls).round_().clamp_(-nmax, nmax - 1)
        torch.mul(wx, ls, out=sums[:, 0])
        if unit:
            torch.mul(ls, ls, out=sums[:, 1])
        else:
            torch.mul(w, ls, out=sums[:, 1]).mul_(ls)
        sumlx, suml2 = _seqsum(sums)
        if s == 0:
            scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(sumlx))
            best = scale * sumlx
            code_iscale = iscale
            continue
        take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        new_scale = sumlx / suml2
        scale = torch.where(take, new_scale, scale)
        best = torch.where(take, new_scale * sumlx, best)
        code_iscale = torch.where(take, iscale, code_iscale)
    codes = torch.mul(x, code_iscale, out=ls).round_().clamp_(-nmax, nmax - 1)
    zero = amax < GROUP_MAX_EPS
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    codes = torch.where(zero, torch.zeros_like(codes), codes + nmax)
    return scale, codes.T


def _make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml-quants.c make_q3_quants with do_rmse: start from -nmax/max, then up to 5 passes of
    one-value-at-a-time moves that raise sumlx^2/suml2 (weights x*x). Sequential within a block,
    vectorized over blocks. A block whose pass changed nothing would repeat itself exactly (C
    breaks out of its loop there), so each pass after the first runs only on the blocks the pass
    before changed, and none once no block changes."""
    mx, amax = _signed_max(x)
    x = x.T.contiguous()  # [n, B]
    iscale = _const(mx, -nmax) / mx
    codes = torch.round(iscale * x).clamp(-nmax, nmax - 1)
    w = x * x
    wx = w * x
    sumlx = _seqsum(wx * codes)
    suml2 = _seqsum((w * codes) * codes)
    active = None  # all blocks
    for _ in range(5):
        if active is None:
            xa, wa, wxa, qa, slxa, sl2a = x, w, wx, codes, sumlx, suml2
        else:
            xa, wa, wxa = x[:, active], w[:, active], wx[:, active]
            qa, slxa, sl2a = codes[:, active], sumlx[active], suml2[active]
        changed = torch.zeros_like(slxa, dtype=torch.bool)
        for i in range(x.shape[0]):
            li = qa[i]
            slx = slxa - wxa[i] * li
            sl2 = sl2a - (wa[i] * li) * li
            new_l = torch.round((xa[i] * sl2) / slx).clamp(-nmax, nmax - 1)
            slx2 = slx + wxa[i] * new_l
            sl22 = sl2 + (wa[i] * new_l) * new_l
            take = (slx > 0) & (new_l != li) & (sl22 > 0) & ((slx2 * slx2) * sl2a > (slxa * slxa) * sl22)
            qa[i] = torch.where(take, new_l, li)
            slxa = torch.where(take, slx2, slxa)
            sl2a = torch.where(take, sl22, sl2a)
            changed |= take
        if active is None:
            sumlx, suml2 = slxa, sl2a
            active = changed.nonzero()[:, 0]
        else:
            codes[:, active] = qa
            sumlx[active], suml2[active] = slxa, sl2a
            active = active[changed]
        if active.numel() == 0:
            break
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    zero = amax < GROUP_MAX_EPS
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    codes = torch.where(zero, torch.zeros_like(codes), codes + nmax)
    return scale, codes.T


# ---------------------------------------------------------------- solutions and their bytes
# A solution is a dict of tensors over B super-blocks: "d", "dmin" (float32 holding fp16 values),
# "sc" and "m" (int64 sub-scales / sub-mins [B, S]; Q2_K keeps its scale bytes as "scales"),
# "q" (int64 codes [B, 256] as stored, unsigned).


def _half_bytes(v: torch.Tensor) -> torch.Tensor:
    return v.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2).to(torch.int64)


def _pack_k4_scales(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K's 12 bytes of 6-bit scales and mins (ggml-quants.c quantize_row_q4_K_ref,
    read back by get_scale_min_k4): bytes 0-3 and 4-7 hold sub-blocks 0-3's scale and min with the
    top 2 bits of sub-blocks 4-7's; bytes 8-11 the low nibbles of sub-blocks 4-7."""
    return torch.cat(
        [
            sc[:, :4] | ((sc[:, 4:] >> 4) << 6),
            m[:, :4] | ((m[:, 4:] >> 4) << 6),
            (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4),
        ],
        dim=1,
    )


def _pack_2bit(q: torch.Tensor) -> torch.Tensor:
    """Q2_K/Q3_K's qs: byte 32*h + l holds values 128*h + 32*s + l at bits 2s."""
    q = q.reshape(-1, 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def _bits_over(hi: torch.Tensor, groups: int) -> torch.Tensor:
    """One bit per value, value 32*k + l at bit k of byte l (Q3_K's hmask, Q5_K's qh)."""
    hi = hi.reshape(-1, groups, 32)
    out = torch.zeros_like(hi[:, 0])
    for k in range(groups):
        out = out | (hi[:, k] << k)
    return out


def _bytes_q2_k(sol: dict) -> torch.Tensor:
    # block_q2_K: scales[16] (scale | min << 4), qs[64], d, dmin
    return torch.cat(
        [sol["scales"], _pack_2bit(sol["q"]), _half_bytes(sol["d"]), _half_bytes(sol["dmin"])], 1
    )


def _bytes_q3_k(sol: dict) -> torch.Tensor:
    # block_q3_K: hmask[32], qs[64], scales[12], d. A stored sub-scale s (0..63) means s - 32;
    # bytes 0-7: low nibbles of sub-blocks j and j+8; bytes 8-11: top 2 bits, sub-block 4g + r at
    # bits 2g of byte 8 + r (quantize_row_q3_K_ref)
    q, sc = sol["q"], sol["sc"]
    hmask = _bits_over(q >> 2, 8)
    low = sc & 15
    top = sc >> 4
    high = top[:, 0:4] | (top[:, 4:8] << 2) | (top[:, 8:12] << 4) | (top[:, 12:16] << 6)
    scales = torch.cat([low[:, :8] | (low[:, 8:] << 4), high], 1)
    return torch.cat([hmask, _pack_2bit(q & 3), scales, _half_bytes(sol["d"])], 1)


def _bytes_q4_k(sol: dict) -> torch.Tensor:
    # block_q4_K: d, dmin, scales[12], qs[128]; byte 32*c + l holds values 64*c + l (low nibble)
    # and 64*c + 32 + l (high nibble)
    q = sol["q"].reshape(-1, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    scales = _pack_k4_scales(sol["sc"], sol["m"])
    return torch.cat([_half_bytes(sol["d"]), _half_bytes(sol["dmin"]), scales, qs], 1)


def _bytes_q5_k(sol: dict) -> torch.Tensor:
    # block_q5_K: d, dmin, scales[12], qh[32] (bit 4 of value 32*k + l at bit k of byte l), qs[128]
    q = sol["q"]
    low = (q & 15).reshape(-1, 4, 2, 32)
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    qh = _bits_over(q >> 4, 8)
    scales = _pack_k4_scales(sol["sc"], sol["m"])
    return torch.cat([_half_bytes(sol["d"]), _half_bytes(sol["dmin"]), scales, qh, qs], 1)


def _bytes_q6_k(sol: dict) -> torch.Tensor:
    # block_q6_K: ql[128], qh[64], scales[16] (int8), d. Per half h of 128 values:
    # ql[64h + l] = low nibbles of 128h + l and 128h + 64 + l; ql[64h + 32 + l] of 128h + 32 + l and
    # 128h + 96 + l; qh[32h + l] = top 2 bits of 128h + 32s + l at bits 2s
    q = sol["q"].reshape(-1, 2, 4, 32)
    low, top = q & 15, q >> 4
    ql = torch.stack([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], 2)
    qh = top[:, :, 0] | (top[:, :, 1] << 2) | (top[:, :, 2] << 4) | (top[:, :, 3] << 6)
    out = torch.cat([ql.reshape(-1, 128), qh.reshape(-1, 64), sol["sc"] & 255, _half_bytes(sol["d"])], 1)
    # an all-zero super-block is written as zero bytes (quantize_row_q6_K_ref's memset)
    return torch.where(sol["zero"][:, None], torch.zeros_like(out), out)


# ---------------------------------------------------------------- reconstruction and error


def _values(type_name: str, sol: dict) -> torch.Tensor:
    """The float32 values a solution stands for [B, 256] (ggml's dequantize_row_qN_K)."""
    q = sol["q"].to(torch.float32)
    spec = _SPECS[type_name]
    nsub = QK_K // spec["sub"]
    q = q.reshape(-1, nsub, spec["sub"])
    d, dmin = sol["d"][:, None], sol["dmin"][:, None]
    if type_name == "Q2_K":
        sc, m = (sol["scales"] & 15).to(torch.float32), (sol["scales"] >> 4).to(torch.float32)
    else:
        sc, m = sol["sc"].to(torch.float32) - spec["sc_offset"], sol["m"].to(torch.float32)
    a = (d * sc)[:, :, None]
    b = (dmin * m)[:, :, None]
    return (a * (q - spec["q_offset"]) - b).reshape(-1, QK_K)


def _block_error(type_name: str, x: torch.Tensor, sol: dict) -> torch.Tensor:
    diff = _values(type_name, sol) - x
    return (diff.double() ** 2).sum(-1)


# ---------------------------------------------------------------- llama: quantize_row_qN_K_ref


def _llama_k4(x: torch.Tensor, nmax: int, rmin: float, nstep: int) -> dict:
    """quantize_row_q4_K_ref / quantize_row_q5_K_ref on super-blocks x [B, 256]."""
    sub = x.reshape(-1, 32)
    sum_x2 = _seqsum((sub * sub).T)
    # sqrtf is correctly rounded; torch's float32 sqrt on the CPU (vectorized) can be 1 ulp off,
    # which changed 2 of 65536 blocks of a 4096 x 4096 tensor: take it in float64 and round once
    av_x = torch.sqrt((sum_x2 / _const(sum_x2, 32.0)).double()).to(torch.float32)
    weights = av_x[:, None] + sub.abs()
    scales, mins, codes = _make_qkx2_quants(sub, weights, nmax, rmin, 0.1, nstep, False)
    scales, mins, codes = scales.reshape(-1, 8), mins.reshape(-1, 8), codes.reshape(-1, 256)
    max_scale = _positive_max(scales)
    max_min = _positive_max(mins)
    zeros = torch.zeros_like(max_scale)
    inv_scale = torch.where(max_scale > 0, _const(max_scale, 63.0) / max_scale, zeros)
    inv_min = torch.where(max_min > 0, _const(max_min, 63.0) / max_min, zeros)
    sc = _wrap_u8(_as_int(torch.round(inv_scale[:, None] * scales))).clamp(max=63)
    m = _wrap_u8(_as_int(torch.round(inv_min[:, None] * mins))).clamp(max=63)
    d = _f16(max_scale / _const(max_scale, 63.0))
    dmin = _f16(max_min / _const(max_min, 63.0))
    q = _requantize(x, d, dmin, sc, m, codes, 32, 0, nmax, 0)
    return {"d": d, "dmin": dmin, "sc": sc, "m": m, "q": q}


def _requantize(
    x: torch.Tensor,
    d: torch.Tensor,
    dmin: torch.Tensor,
    sc: torch.Tensor,
    m: torch.Tensor,
    codes: torch.Tensor,
    sub: int,
    q_offset: int,
    q_max: int,
    sc_offset: int,
) -> torch.Tensor:
    """The final pass of every quantize_row_qN_K_ref: codes nearest to x given the stored scales,
    ``(x + dmin*m) / (d*sc)``; a sub-block whose d*sc is 0 keeps ``codes`` (C's ``continue``)."""
    xs = x.reshape(-1, sc.shape[1], sub)
    step = (d[:, None] * (sc - sc_offset).to(torch.float32))[:, :, None]
    shift = (dmin[:, None] * m.to(torch.float32))[:, :, None]
    new = torch.round((xs + shift) / step).clamp(-q_offset, q_max - q_offset) + q_offset
    keep = (step == 0).expand_as(xs)
    return _as_int(torch.where(keep, codes.reshape(xs.shape), new)).reshape(-1, QK_K)


def _llama_q2_k(x: torch.Tensor) -> dict:
    sub = x.reshape(-1, 16)
    scales, mins, codes = _make_qkx2_quants(sub, sub.abs(), 3, -0.5, 0.1, 15, True)
    scales, mins, codes = scales.reshape(-1, 16), mins.reshape(-1, 16), codes.reshape(-1, 256)
    max_scale = _positive_max(scales)
    max_min = _positive_max(mins)
    zeros = torch.zeros_like(max_scale)
    has_scale, has_min = max_scale > 0, max_min > 0
    iscale = _const(max_scale, 15.0) / max_scale
    ls = torch.where(has_scale[:, None], _as_int(torch.round(iscale[:, None] * scales)), 0)
    imin = _const(max_min, 15.0) / max_min
    lm = torch.where(has_min[:, None], _as_int(torch.round(imin[:, None] * mins)), 0)
    byte = _wrap_u8(_wrap_u8(ls) | (lm << 4))  # scales[j] = l; scales[j] |= (l << 4)
    d = torch.where(has_scale, _f16(max_scale / _const(max_scale, 15.0)), zeros)
    dmin = torch.where(has_min, _f16(max_min / _const(max_min, 15.0)), zeros)
    q = _requantize(x, d, dmin, byte & 15, byte >> 4, codes, 16, 0, 3, 0)
    return {"d": d, "dmin": dmin, "scales": byte, "q": q}


def _llama_q3_k(x: torch.Tensor) -> dict:
    sub = x.reshape(-1, 16)
    scales, codes = _make_q3_quants(sub, 4)
    scales, codes = scales.reshape(-1, 16), codes.reshape(-1, 256)
    max_scale, _ = _signed_max(scales)
    has = max_scale != 0
    iscale = _const(max_scale, -32.0) / max_scale
    ls = _wrap_i8(_as_int(torch.round(iscale[:, None] * scales))).clamp(-32, 31) + 32
    sc = torch.where(has[:, None], ls, 0)  # memset(scales, 0): stored 0 means -32, with d = 0
    d = torch.where(has, _f16(_const(iscale, 1.0) / iscale), torch.zeros_like(max_scale))
    q = _requantize(x, d, torch.zeros_like(d), sc, torch.zeros_like(sc), codes, 16, 4, 7, 32)
    return {"d": d, "dmin": torch.zeros_like(d), "sc": sc, "m": torch.zeros_like(sc), "q": q}


def _llama_q6_k(x: torch.Tensor) -> dict:
    sub = x.reshape(-1, 16)
    scales, codes = _make_qx_quants(sub, sub * sub, 32)
    scales, codes = scales.reshape(-1, 16), codes.reshape(-1, 256)
    max_scale, max_abs = _signed_max(scales)
    zero = max_abs < GROUP_MAX_EPS
    iscale = _const(max_scale, -128.0) / max_scale
    d = torch.where(zero, torch.zeros_like(max_scale), _f16(_const(iscale, 1.0) / iscale))
    sc = _wrap_i8(_as_int(torch.round(iscale[:, None] * scales)).clamp(max=127))
    sc = torch.where(zero[:, None], 0, sc)
    q = _requantize(x, d, torch.zeros_like(d), sc, torch.zeros_like(sc), codes, 16, 32, 63, 0)
    q = torch.where(zero[:, None], 32, q)  # the memset block reads back as 0 * (0 - 32)... = 0
    return {"d": d, "dmin": torch.zeros_like(d), "sc": sc, "m": torch.zeros_like(sc), "q": q, "zero": zero}


_LLAMA = {
    "Q2_K": _llama_q2_k,
    "Q3_K": _llama_q3_k,
    "Q4_K": lambda x: _llama_k4(x, 15, -1.0, 20),
    "Q5_K": lambda x: _llama_k4(x, 31, -0.5, 15),
    "Q6_K": _llama_q6_k,
}

# sub: values per sub-block; q_offset: stored code minus the signed code; q_max: largest stored
# code; sc_lo/sc_hi: signed sub-scale range; sc_offset: stored sub-scale minus the signed one;
# m_max: largest sub-min (0: no mins)
_SPECS = {
    "Q2_K": {"sub": 16, "q_offset": 0, "q_max": 3, "sc_lo": 0, "sc_hi": 15, "sc_offset": 0, "m_max": 15},
    "Q3_K": {"sub": 16, "q_offset": 4, "q_max": 7, "sc_lo": -32, "sc_hi": 31, "sc_offset": 32, "m_max": 0},
    "Q4_K": {"sub": 32, "q_offset": 0, "q_max": 15, "sc_lo": 0, "sc_hi": 63, "sc_offset": 0, "m_max": 63},
    "Q5_K": {"sub": 32, "q_offset": 0, "q_max": 31, "sc_lo": 0, "sc_hi": 63, "sc_offset": 0, "m_max": 63},
    "Q6_K": {"sub": 16, "q_offset": 32, "q_max": 63, "sc_lo": -128, "sc_hi": 127, "sc_offset": 0, "m_max": 0},
}

_BYTES = {
    "Q2_K": _bytes_q2_k,
    "Q3_K": _bytes_q3_k,
    "Q4_K": _bytes_q4_k,
    "Q5_K": _bytes_q5_k,
    "Q6_K": _bytes_q6_k,
}


# ---------------------------------------------------------------- qconv: lower unweighted error


def _stored_to_signed(type_name: str, sol: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(signed sub-scales [B, S], sub-mins [B, S], signed codes [B, S, sub]) of a solution."""
    spec = _SPECS[type_name]
    if type_name == "Q2_K":
        sc, m = sol["scales"] & 15, sol["scales"] >> 4
    else:
        sc, m = sol["sc"] - spec["sc_offset"], sol["m"]
    q = (sol["q"] - spec["q_offset"]).reshape(sc.shape[0], sc.shape[1], spec["sub"])
    return sc, m, q


def _signed_to_stored(type_name: str, d, dmin, sc, m, q) -> dict:
    spec = _SPECS[type_name]
    sol = {"d": d, "dmin": dmin, "q": q.reshape(-1, QK_K) + spec["q_offset"]}
    if type_name == "Q2_K":
        sol["scales"] = sc | (m << 4)
    else:
        sol["sc"], sol["m"] = sc + spec["sc_offset"], m
    if type_name == "Q6_K":
        sol["zero"] = torch.zeros_like(d, dtype=torch.bool)
    return sol


def _nearest_codes(xs, a, b, q, lo, hi):
    """Codes nearest to xs [B, S, n] for steps a and offsets b [B, S] (x ~ a*q - b); where a is 0
    every code gives the same value, so the current ones stay."""
    step = a[:, :, None]
    new = torch.round((xs + b[:, :, None]) / step).clamp(lo, hi)
    return torch.where(step == 0, q, new)


def _refine(type_name: str, x: torch.Tensor, d, dmin, sc, m, iterations: int):
    """Alternating descent from one start (see the module docstring); returns the best state seen
    per super-block and its squared error."""
    spec = _SPECS[type_name]
    lo, hi = -spec["q_offset"], spec["q_max"] - spec["q_offset"]
    sc_lo, sc_hi, m_max = spec["sc_lo"], spec["sc_hi"], spec["m_max"]
    nsub, sub = sc.shape[1], spec["sub"]
    xs = x.reshape(-1, nsub, sub)
    sc, m = sc.to(torch.float32), m.to(torch.float32)
    q = torch.zeros_like(xs)
    sxx = (xs * xs).sum(-1)
    sx = xs.sum(-1)

    def steps():
        return d[:, None] * sc, dmin[:, None] * m

    def error(a, b, q):
        # ((a*q - b - xs) in float32, squared and summed in float64), computed in place
        diff = torch.mul(q, a[:, :, None]).sub_(b[:, :, None]).sub_(xs).double()
        return diff.mul_(diff).sum((1, 2))

    best = None

    def track(q):
        nonlocal best
        a, b = steps()
        err = error(a, b, q)
        state = (err, d, dmin, sc, m, q)
        if best is None:
            best = state
            return
        take = err < best[0]
        best = tuple(
            torch.where(take.view(-1, *[1] * (new.dim() - 1)), new, old)
            for new, old in zip(state, best, strict=True)
        )

    for it in range(iterations + 1):
        a, b = steps()
        q = _nearest_codes(xs, a, b, q, lo, hi)
        track(q)
        if it == iterations:
            break
        # (2) sub-block refit: least-squares (a, b) given the codes, then the best integer
        # sub-scale / sub-min among floor, ceil and the current one
        sq, sqq, sqx = q.sum(-1), (q * q).sum(-1), (q * xs).sum(-1)
        if m_max:
            den = sub * sqq - sq * sq
            a_ls = torch.where(den > 0, (sub * sqx - sq * sx) / den, a)
            b_ls = torch.where(den > 0, (a_ls * sq - sx) / sub, b)
        else:
            a_ls = torch.where(sqq > 0, sqx / sqq, a)
            b_ls = torch.zeros_like(a_ls)
        safe_d = torch.where(d == 0, torch.ones_like(d), d)[:, None]
        safe_dmin = torch.where(dmin == 0, torch.ones_like(dmin), dmin)[:, None]
        r_sc = (a_ls / safe_d).clamp(sc_lo, sc_hi)
        sc_c = torch.stack([sc, r_sc.floor(), r_sc.ceil()], -1)  # [B, S, 3]
        if m_max:
            r_m = (b_ls / safe_dmin).clamp(0, m_max)
            m_c = torch.stack([m, r_m.floor(), r_m.ceil()], -1)
        else:
            m_c = m[:, :, None]
        ac = (d[:, None, None] * sc_c)[:, :, :, None]  # [B, S, 3, 1]
        bc = (dmin[:, None, None] * m_c)[:, :, None, :]  # [B, S, 1, 3]
        n = float(sub)
        e = (
            sxx[..., None, None]
            + ac * ac * sqq[..., None, None]
            + n * bc * bc
            - 2 * ac * sqx[..., None, None]
            + 2 * bc * sx[..., None, None]
            - 2 * ac * bc * sq[..., None, None]
        )
        pick = e.flatten(2).argmin(-1)
        ncols = m_c.shape[-1]
        new_sc = sc_c.gather(-1, (pick // ncols)[..., None])[..., 0]
        new_m = m_c.gather(-1, (pick % ncols)[..., None])[..., 0]
        keep = (d == 0)[:, None]
        new_sc = torch.where(keep, sc, new_sc)
        if m_max:
            new_m = torch.where((dmin == 0)[:, None], m, new_m)
        # (2b) exact search around that choice: every sub-scale / sub-min within RADIUS, each with
        # its own nearest codes; a sub-block keeps its current pair unless one is strictly better
        sc, m = _sub_search(xs, d, dmin, sc, m, new_sc, new_m if m_max else m, spec, q)
        a, b = steps()
        q = _nearest_codes(xs, a, b, q, lo, hi)
        track(q)
        # (3) super-block refit: least-squares (d, dmin) given codes and integer sub-scales
        u = sc[:, :, None] * q
        uu = (u * u).sum((1, 2))
        ux = (u * xs).sum((1, 2))
        if m_max:
            us = u.sum(-1)
            uv = (us * m).sum(-1)
            vv = n * (m * m).sum(-1)
            vx = (sx * m).sum(-1)
            det = uv * uv - uu * vv
            ok = det.abs() > 1e-12 * (uu * vv).abs().clamp(min=1e-30)
            new_d = torch.where(ok, (uv * vx - ux * vv) / det, d)
            new_dmin = torch.where(ok, (uu * vx - uv * ux) / det, dmin)
        else:
            ok = uu > 0
            new_d = torch.where(ok, ux / uu, d)
            new_dmin = dmin
        d = torch.where(torch.isfinite(new_d), _f16(new_d), d)
        d = torch.where(torch.isfinite(d), d, best[1])
        dmin = torch.where(torch.isfinite(new_dmin) & torch.isfinite(_f16(new_dmin)), _f16(new_dmin), dmin)
    err, d, dmin, sc, m, q = best
    return err, d, dmin, sc.to(torch.int64), m.to(torch.int64), q.to(torch.int64)


def _sub_search(xs, d, dmin, sc, m, sc_base, m_base, spec, q):
    """Every sub-scale / sub-min within QCONV_RADIUS of (sc_base, m_base), each with its own
    nearest codes; a sub-block keeps its current pair (whose nearest codes are ``q``) unless one is
    strictly better, the candidates taken in order (i over sub-scales, then j over sub-mins)."""
    lo, hi = -spec["q_offset"], spec["q_max"] - spec["q_offset"]
    radius = QCONV_RADIUS
    m_offsets = range(-radius, radius + 1) if spec["m_max"] else [0]
    buf = torch.empty_like(xs)

    def sub_error(a: torch.Tensor, b: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        # sum over the sub-block of (a*codes - b - xs)^2, float32, in place in ``codes``
        codes.mul_(a[:, :, None]).sub_(b[:, :, None]).sub_(xs)
        return codes.mul_(codes).sum(-1)

    best = sub_error(d[:, None] * sc, dmin[:, None] * m, buf.copy_(q))
    sc_ks = [(sc_base + i).clamp(spec["sc_lo"], spec["sc_hi"]) for i in range(-radius, radius + 1)]
    m_ks = [(m_base + j).clamp(0, spec["m_max"]) for j in m_offsets]
    errors = {}
    for j, m_k in enumerate(m_ks):
        b = dmin[:, None] * m_k
        shifted = xs + b[:, :, None]
        for i, sc_k in enumerate(sc_ks):
            a = d[:, None] * sc_k
            # nearest codes, as _nearest_codes; where a is 0 every code gives the same value (-b),
            # so any finite code gives that sub-block's error (0/0's NaN made 0)
            codes = torch.div(shifted, a[:, :, None], out=buf).round_().clamp_(lo, hi).nan_to_num_(0.0)
            errors[i, j] = sub_error(a, b, codes)
    for i, sc_k in enumerate(sc_ks):
        for j, m_k in enumerate(m_ks):
            err = errors[i, j]
            take = err < best
            best = torch.where(take, err, best)
            sc = torch.where(take, sc_k, sc)
            m = torch.where(take, m_k, m)
    return sc, m


def _start_unweighted(type_name: str, x: torch.Tensor):
    """A second start: each sub-block fitted for plain squared error (weights 1), then the
    sub-scales quantized against the largest, as llama does."""
    spec = _SPECS[type_name]
    sub = x.reshape(-1, spec["sub"])
    nsub = QK_K // spec["sub"]
    if spec["m_max"]:
        scales, mins, _ = _make_qkx2_quants(sub, None, spec["q_max"], -1.0, 0.1, 20, False)
        scales, mins = scales.reshape(-1, nsub), mins.reshape(-1, nsub)
        max_scale = _positive_max(scales)
        max_min = _positive_max(mins)
        d = _f16(max_scale / spec["sc_hi"])
        dmin = _f16(max_min / spec["m_max"])
        safe = torch.where(d == 0, torch.ones_like(d), d)[:, None]
        safe_m = torch.where(dmin == 0, torch.ones_like(dmin), dmin)[:, None]
        sc = torch.round(scales / safe).clamp(0, spec["sc_hi"])
        m = torch.round(mins / safe_m).clamp(0, spec["m_max"])
    else:
        half = spec["q_offset"]
        scales, _ = _make_qx_quants(sub, None, half)
        scales = scales.reshape(-1, nsub)
        max_scale, _ = _signed_max(scales)
        d = _f16(max_scale / spec["sc_lo"])
        safe = torch.where(d == 0, torch.ones_like(d), d)[:, None]
        sc = torch.round(scales / safe).clamp(spec["sc_lo"], spec["sc_hi"])
        m = torch.zeros_like(sc)
    return d, dmin if spec["m_max"] else torch.zeros_like(d), sc.to(torch.int64), m.to(torch.int64)


def _pick(take: torch.Tensor, a: dict, b: dict) -> dict:
    return {k: torch.where(take.view(-1, *[1] * (a[k].dim() - 1)), a[k], b[k]) for k in a}


def _qconv(type_name: str, x: torch.Tensor) -> dict:
    llama = _LLAMA[type_name](x)
    llama_err = _block_error(type_name, x, llama)
    sc, m, _ = _stored_to_signed(type_name, llama)
    best = llama
    best_err = llama_err
    starts = [(llama["d"], llama["dmin"], sc, m), _start_unweighted(type_name, x)]
    for d, dmin, sc, m in starts:
        _, d, dmin, sc, m, q = _refine(type_name, x, d, dmin, sc, m, QCONV_ITERATIONS)
        cand = _signed_to_stored(type_name, d, dmin, sc, m, q)
        err = _block_error(type_name, x, cand)  # measured on the stored numbers, as a reader sees them
        take = err < best_err
        best = _pick(take, cand, best)
        best_err = torch.where(take, err, best_err)
    return best


# ---------------------------------------------------------------- the public table


def _quantizer(type_name: str) -> Callable[[torch.Tensor, str], torch.Tensor]:
    def quantize(weight: torch.Tensor, solver: str = "llama") -> torch.Tensor:
        if solver not in SOLVERS:
            raise UsageError(f"unknown GGUF k-quant solver {solver!r}; valid: {', '.join(SOLVERS)}")
        if weight.dim() != 2 or weight.shape[1] % QK_K:
            raise UsageError(
                f"{type_name} needs a 2-D weight whose rows are a multiple of {QK_K} values, "
                f"got shape {tuple(weight.shape)}"
            )
        rows, n = weight.shape
        size = type_size(type_name)
        out = torch.empty((rows, n // QK_K * size), dtype=torch.uint8, device=weight.device)
        if weight.is_cuda:
            per_chunk = CHUNK_ELEMENTS * CUDA_CHUNK_FACTOR
        elif weight.device.type == "cpu":
            per_chunk = min(CHUNK_ELEMENTS, CPU_CHUNK_VALUES)
        else:
            per_chunk = CHUNK_ELEMENTS
        step = max(1, per_chunk // n)
        solve = _LLAMA[type_name] if solver == "llama" else lambda x: _qconv(type_name, x)

        def solve_chunk(chunk: slice) -> None:
            x = weight[chunk].to(torch.float32).reshape(-1, QK_K)
            if not torch.isfinite(x).all():
                raise SourceError("the weight has NaN or infinite values")
            packed = _BYTES[type_name](solve(x))
            out[chunk] = packed.to(torch.uint8).reshape(-1, n // QK_K * size)

        chunks = [slice(start, start + step) for start in range(0, rows, step)]
        run_chunks(solve_chunk, chunks, weight.device)
        return out

    quantize.__name__ = f"quantize_{type_name.lower()}"
    quantize.__doc__ = f"ggml's block_{type_name.lower()} bytes of a float32 weight [rows, n]."
    return quantize


QUANTIZERS: dict[str, Callable[[torch.Tensor, str], torch.Tensor]] = {
    name: _quantizer(name) for name in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
}
