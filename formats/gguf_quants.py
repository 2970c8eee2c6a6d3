"""GGUF tensor bytes for the float types and ggml's legacy block types, in torch (CPU or CUDA).

``QUANTIZERS[type_name](weight, solver)`` turns a float32 ``[rows, n]`` weight into the bytes of a
GGUF tensor of that type: uint8 ``[rows, n // block * type_size]`` on the weight's device, each
row a run of ggml blocks (``block_q4_0`` ... in ggml-common.h; sizes from ``gguf.GGML_QUANT_SIZES``).

Two solvers choose the numbers of a block; the block layout is the same:

- ``"llama"``: what llama.cpp writes without an imatrix, byte for byte: ggml-quants.c's
  ``quantize_row_q4_0_ref`` / ``q4_1`` / ``q5_0`` / ``q5_1`` / ``q8_0`` and, for IQ4_NL,
  ``quantize_iq4_nl`` -> ``quantize_row_iq4_nl_impl`` (ntry 7, weights ``x*x``). The C runs in
  float32 with no fused multiply-add (libggml-base is built for baseline x86-64), so every step
  here is one float32 torch op in the C's order: sums over a block run element by element, a
  division by a constant divides by a tensor (CUDA turns ``tensor / python_float`` into a
  multiplication by the reciprocal, which can differ in the last bit), ``roundf`` rounds half away
  from zero and ``(int8_t)`` truncates. tests/test_gguf_quants.py pins this against ggml's own
  ``ggml_quantize_chunk``.
- ``"qconv"``: per block, a search over candidate scales (and for Q4_1/Q5_1 a least-squares refit
  of scale and min given the codes), with the stored fp16 numbers rounded before the codes are
  chosen; llama's block is a candidate too, and a block keeps llama's bytes unless the searched
  one has a strictly lower squared error (measured in float64 on the values
  ``gguf.quants.dequantize`` gives back). So no block is ever worse than llama's.

Both work on a few million values at a time (``_CHUNK_VALUES``; on the CPU fewer, spread over
threads: :func:`run_chunks`), so a 128k x 4096 embedding needs a few hundred MB beyond its input
and output. NaN and inf are not checked here (the caller
refuses them as a broken source); the float types pass them through as ggml does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import gguf
import torch

from qconv.errors import UsageError

SOLVERS = ("llama", "qconv")

#: values per chunk of rows; the qconv search holds about ten float32 tensors of this size
_CHUNK_VALUES = 1 << 21
#: values per chunk on the CPU, where chunks run in parallel (run_chunks): several per tensor to
#: share out, and no slower per value than larger ones (measured: 2^17 to 2^20 alike)
CPU_CHUNK_VALUES = 1 << 18

#: ggml-common.h kvalues_iq4nl: the 16 levels of IQ4_NL, times the block's scale
_IQ4NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)

#: ggml-quants.c GROUP_MAX_EPS: a block whose largest |x| is below this gets scale 0
_GROUP_MAX_EPS = 1e-15

#: a searched block replaces llama's only when its error is below llama's by more than this
#: fraction, so that a test summing the same float64 squares in another order sees it no worse
_STRICTLY_BETTER = 1e-12


@dataclass(frozen=True)
class _Legacy:
    """One block type. Codes are the integers a block stores, as levels: Q4_0 -8..7 (stored +8),
    Q5_0 -16..15 (+16), Q8_0 -127..127 (int8), Q4_1 0..15, Q5_1 0..31; IQ4_NL an index 0..15
    into ``_IQ4NL_VALUES``. A value is ``d * level`` (``+ m`` for the types with a min)."""

    name: str
    bits: int
    low: int  # smallest level the searched solver may use
    high: int  # largest level
    offset: int  # added to a level to store it
    has_min: bool = False
    nonlinear: bool = False

    @property
    def block(self) -> int:
        return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[self.name]][0]

    @property
    def type_size(self) -> int:
        return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[self.name]][1]


_LEGACY = {
    spec.name: spec
    for spec in (
        _Legacy("Q4_0", 4, -8, 7, 8),
        _Legacy("Q4_1", 4, 0, 15, 0, has_min=True),
        _Legacy("Q5_0", 5, -16, 15, 16),
        _Legacy("Q5_1", 5, 0, 31, 0, has_min=True),
        # llama never writes -128; the search keeps to the same symmetric range
        _Legacy("Q8_0", 8, -127, 127, 0),
        _Legacy("IQ4_NL", 4, 0, 15, 0, nonlinear=True),
    )
}

_FLOATS = ("F32", "F16", "BF16")


# ---------------------------------------------------------------------------------------------
# float32 steps as C does them


def _const(x: torch.Tensor, value: float) -> torch.Tensor:
    """``value`` as a float32 tensor on ``x``'s device, to divide by (see the module docstring)."""
    return torch.tensor(value, dtype=torch.float32, device=x.device)


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """GGML_FP32_TO_FP16: round to nearest even, overflow to inf (torch's cast does the same);
    a NaN becomes ``sign | 0x7E00`` as ggml_compute_fp32_to_fp16 makes it, whatever the device."""
    # no `if nan.any()`: on CUDA that would wait for the GPU at every call
    quiet = torch.where(torch.signbit(x), -32768 | 0x7E00, 0x7E00).to(torch.int16)
    return torch.where(torch.isnan(x), quiet, x.to(torch.float16).view(torch.int16)).view(torch.float16)


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C's roundf: halves away from zero (torch.round rounds them to even). ``x - trunc(x)`` is
    exact in float32, unlike ``floor(|x| + 0.5)``, which rounds 0.49999997 up."""
    whole = torch.trunc(x)
    up = (x - whole).abs() >= 0.5
    return whole + torch.where(up, torch.sign(x), torch.zeros_like(x))


def _first_at(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 1, index[:, None])[:, 0]


@functools.cache
def _iq4nl_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Lookup tables for :func:`_best_index`: the index and the level of the nearest IQ4_NL
    level for ``floor(2 t)``, -256..256 (offset by 256)."""
    values = torch.tensor(_IQ4NL_VALUES, dtype=torch.float32)
    midpoints = (values[1:] + values[:-1]) / 2
    twice = torch.arange(-256, 257, dtype=torch.float32)
    index = (twice[:, None] >= 2 * midpoints[None]).sum(dim=1)
    return index.to(device), values[index].to(device)


def _best_index(tables: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, level: bool = False):
    """ggml-quants.c best_index_int8 over kvalues_iq4nl: the nearest level's index (or, with
    ``level``, the level itself), a tie going to the upper one. The C's float32 test
    ``x - lower < upper - x`` is true exactly below the midpoint for these integer levels (every
    float32 near each midpoint checked: test_best_index_is_ggmls). The midpoints are multiples of
    1/2, so ``x >= midpoint`` is ``floor(2 x) >= 2 midpoint`` (doubling is exact) and the answer
    a table lookup on ``floor(2 x)``, which is faster than a binary search (bucketize)."""
    key = (x * 2).floor_().clamp_(-256, 256).to(torch.int64) + 256
    return torch.take(tables[1] if level else tables[0], key)


# ---------------------------------------------------------------------------------------------
# llama.cpp's choice, block by block (x: float32 [blocks, block]); returns (d, m or None, levels)


def _llama_symmetric(x: torch.Tensor, spec: _Legacy) -> tuple[torch.Tensor, None, torch.Tensor]:
    """quantize_row_q4_0_ref / q5_0_ref: the value of largest |x| (the first one) maps to the
    lowest level, ``d = max / -8``; codes ``MIN(15, (int8_t)(x*id + 8.5f))``."""
    magnitude = x.abs()
    amax = magnitude.amax(dim=1)
    signed = _first_at(x, magnitude.argmax(dim=1))
    # C starts from max = 0.0f and only moves on amax < |v|: an all-zero block keeps +0.0
    signed = torch.where(amax > 0, signed, torch.zeros_like(signed))
    d = signed / _const(x, float(spec.low))
    inverse = torch.where(d != 0, _const(x, 1.0) / d, torch.zeros_like(d))
    shifted = x * inverse[:, None] + _const(x, spec.offset + 0.5)
    codes = shifted.to(torch.int32).clamp(max=2 * spec.offset - 1)
    return _fp16(d), None, codes - spec.offset


def _llama_affine(x: torch.Tensor, spec: _Legacy) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """quantize_row_q4_1_ref / q5_1_ref: ``d = (max - min) / 15``, ``m = min``; codes
    ``(int8_t)((x - min)*id + 0.5f)``, Q4_1 clamped to 15 (Q5_1 cannot pass 31). The first
    minimum is taken, as the C's strict ``v < min`` does: its zero's sign is stored in ``m``."""
    low = _first_at(x, x.argmin(dim=1))
    high = _first_at(x, x.argmax(dim=1))
    d = (high - low) / _const(x, float(spec.high))
    inverse = torch.where(d != 0, _const(x, 1.0) / d, torch.zeros_like(d))
    shifted = (x - low[:, None]) * inverse[:, None] + _const(x, 0.5)
    codes = shifted.to(torch.int32).clamp(max=spec.high)
    return _fp16(d), _fp16(low), codes


def _llama_q8_0(x: torch.Tensor, spec: _Legacy) -> tuple[torch.Tensor, None, torch.Tensor]:
    """quantize_row_q8_0_ref: ``d = amax / 127``, codes ``roundf(x*id)``."""
    d = x.abs().amax(dim=1) / _const(x, 127.0)
    inverse = torch.where(d != 0, _const(x, 1.0) / d, torch.zeros_like(d))
    return _fp16(d), None, _roundf(x * inverse[:, None]).to(torch.int32)


def _llama_iq4_nl(x: torch.Tensor, spec: _Legacy) -> tuple[torch.Tensor, None, torch.Tensor]:
    """quantize_iq4_nl without an imatrix: quantize_row_iq4_nl_impl(QK4_NL, 32, ..., ntry=7).
    Weights ``x*x``; a first scale ``-max/values[0]`` refit by weighted least squares, then 15
    tries ``id = (itry + values[0]) / max``, itry -7..7, each kept when ``sumqx^2 > best*sumq2``;
    the codes are taken again with the float32 scale (not its fp16 rounding) at the end. The 16
    sets of codes and sums are computed together (fewer, larger tensor ops), on
    ``_IQ4NL_BLOCKS`` blocks at a time to bound the memory they take."""
    parts = [_llama_iq4_nl_blocks(part) for part in x.split(_IQ4NL_BLOCKS)]
    return torch.cat([p[0] for p in parts]), None, torch.cat([p[2] for p in parts])


#: blocks per batch of _llama_iq4_nl: 16 tries x 32 values x this, about 16 MB per float tensor
_IQ4NL_BLOCKS = 1 << 13


def _llama_iq4_nl_blocks(x: torch.Tensor) -> tuple[torch.Tensor, None, torch.Tensor]:
    tables = _iq4nl_tables(x.device)
    first_level = _const(x, float(_IQ4NL_VALUES[0]))
    magnitude = x.abs()
    amax = magnitude.amax(dim=1)
    signed = _first_at(x, magnitude.argmax(dim=1))
    empty = amax < _const(x, _GROUP_MAX_EPS)
    signed = torch.where(empty, torch.ones_like(signed), signed)  # empty blocks: scale 0 below

    first = (-signed) / first_level
    tries = torch.arange(-7, 8, dtype=torch.float32, device=x.device) + first_level
    inverses = torch.cat([(_const(x, 1.0) / first)[None], tries[:, None] / signed[None]])
    # [tries, 32, blocks]: value j of every block is one contiguous row, so the C's sums over
    # j run as 32 additions of whole rows
    xt = x.t().contiguous()
    level = _best_index(tables, inverses[:, None, :] * xt, level=True)
    wq = (xt * xt) * level
    qx, q2 = wq * xt, wq * level
    sumqx = torch.zeros_like(inverses)
    sumq2 = torch.zeros_like(inverses)
    for j in range(x.shape[1]):
        sumqx += qx[:, j]
        sumq2 += q2[:, j]

    d = torch.where(sumq2[0] > 0, sumqx[0] / sumq2[0], torch.zeros_like(first))
    best = d * sumqx[0]
    for t in range(1, len(tries) + 1):
        better = (sumq2[t] > 0) & (sumqx[t] * sumqx[t] > best * sumq2[t])
        refit = sumqx[t] / sumq2[t]
        d = torch.where(better, refit, d)
        best = torch.where(better, refit * sumqx[t], best)
    d = torch.where(empty, torch.zeros_like(d), d)
    inverse = torch.where(d != 0, _const(x, 1.0) / d, torch.zeros_like(d))
    return _fp16(d), None, _best_index(tables, inverse[:, None] * x)


def _llama(x: torch.Tensor, spec: _Legacy):
    if spec.nonlinear:
        return _llama_iq4_nl(x, spec)
    if spec.has_min:
        return _llama_affine(x, spec)
    if spec.name == "Q8_0":
        return _llama_q8_0(x, spec)
    return _llama_symmetric(x, spec)


# ---------------------------------------------------------------------------------------------
# qconv's search


def _levels(spec: _Legacy, codes: torch.Tensor) -> torch.Tensor:
    if spec.nonlinear:
        return torch.tensor(_IQ4NL_VALUES, dtype=torch.float32, device=codes.device)[codes]
    return codes.to(torch.float32)


def _values(spec: _Legacy, d16: torch.Tensor, m16: torch.Tensor | None, codes: torch.Tensor):
    """The float32 values gguf.quants.dequantize gives back: ``d * level`` (``+ m``)."""
    out = d16.to(torch.float32)[:, None] * _levels(spec, codes)
    return out if m16 is None else out + m16.to(torch.float32)[:, None]


def _nearest(spec: _Legacy, t: torch.Tensor) -> torch.Tensor:
    """The code of the level nearest ``t`` (in units of the scale)."""
    if spec.nonlinear:
        return _best_index(_iq4nl_tables(t.device), t)
    return torch.round(t).clamp(spec.low, spec.high).to(torch.int32)


def _nearest_level(spec: _Legacy, t: torch.Tensor) -> torch.Tensor:
    """The level nearest ``t`` (in units of the scale), as float32."""
    if spec.nonlinear:
        return _best_index(_iq4nl_tables(t.device), t, level=True)
    return torch.round(t).clamp_(spec.low, spec.high)


def _codes_for(spec: _Legacy, x: torch.Tensor, d16: torch.Tensor, m16: torch.Tensor | None):
    """Nearest codes for the stored (fp16) scale and min: the best codes these numbers allow."""
    d = d16.to(torch.float32)
    inverse = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    shifted = x if m16 is None else x - m16.to(torch.float32)[:, None]
    return _nearest(spec, shifted * inverse[:, None])


def _error(x: torch.Tensor, values: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return (x.to(dtype) - values.to(dtype)).square().sum(dim=1)


def _scale_candidates(spec: _Legacy) -> list[float]:
    """Where the value of largest |x| lands, in levels, for the symmetric types: around llama's
    lowest level and around the highest one (the other sign)."""
    if spec.nonlinear:
        steps = [i / 40 for i in range(-6, 5)]
        return [spec_level * (1 + s) for spec_level in (-127.0, 113.0) for s in steps]
    if spec.name == "Q8_0":
        return [127.0 - s for s in (0.0, 0.25, 0.5, 1.0, 1.5, 2.5)]
    steps = (-0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
    return [spec.low + s for s in steps] + [spec.high - s for s in steps]


def _symmetric_error(x: torch.Tensor, spec: _Legacy, d16: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The squared error of the fp16 scale ``d16`` with its nearest levels, and those levels."""
    scale = d16.to(torch.float32)
    inverse = torch.where(scale != 0, 1.0 / scale, torch.zeros_like(scale))
    level = _nearest_level(spec, x * inverse[:, None])
    return (x - scale[:, None] * level).square_().sum(dim=1), level


def _refit(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """The least-squares scale for these levels, ``sum(q x) / sum(q q)``, in fp16."""
    sumq2 = (level * level).sum(dim=1)
    return _fp16(torch.where(sumq2 > 0, (level * x).sum(dim=1) / sumq2, torch.zeros_like(sumq2)))


def _fp16_step(d16: torch.Tensor, steps: int) -> torch.Tensor:
    """The fp16 value ``steps`` representable values away from ``d16`` (same sign)."""
    bits = d16.view(torch.int16).to(torch.int32)
    moved = (bits & 0x7FFF) + steps
    moved = torch.where((moved >= 0) & (moved < 0x7C00), moved, bits & 0x7FFF) | (bits & 0x8000)
    return torch.where(moved >= 0x8000, moved - 0x10000, moved).to(torch.int16).view(torch.float16)


def _search_symmetric(x: torch.Tensor, spec: _Legacy) -> torch.Tensor:
    """The best fp16 scale: for each candidate, its nearest levels, a least-squares refit of the
    scale given them, rounded to fp16, nearest levels again, error; then, from the best, two more
    refits, each also trying the fp16 neighbours of the refit scale (rounding to fp16 moves the
    scale by up to 1/2048, which at 4 bits is worth a look)."""
    magnitude = x.abs()
    signed = _first_at(x, magnitude.argmax(dim=1))
    signed = torch.where(signed != 0, signed, torch.ones_like(signed))
    best_err = torch.full_like(signed, float("inf"))
    best_d = torch.zeros_like(signed, dtype=torch.float16)

    def keep(d16: torch.Tensor) -> None:
        nonlocal best_err, best_d
        err = _symmetric_error(x, spec, d16)[0]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_d = torch.where(better, d16, best_d)

    for landing in _scale_candidates(spec):
        keep(_refit(x, _nearest_level(spec, x * (landing / signed)[:, None])))
    for _ in range(2):
        refit = _refit(x, _symmetric_error(x, spec, best_d)[1])
        for steps in (0, -1, 1):
            keep(_fp16_step(refit, steps))
    return best_d


def _search_affine(x: torch.Tensor, spec: _Legacy) -> tuple[torch.Tensor, torch.Tensor]:
    """The best fp16 (d, m) for ``d * q + m``: the range [min, max] shrunk at either end by a few
    steps' fractions, then two rounds of refitting (d, m) by least squares given the codes (as
    HQQ and ggml's k-quants do), each round rounding to fp16 and taking the nearest codes."""
    low = x.amin(dim=1)
    high = x.amax(dim=1)
    span = high - low
    n = x.shape[1]
    best_err = torch.full_like(low, float("inf"))
    best_d = torch.zeros_like(low, dtype=torch.float16)
    best_m = torch.zeros_like(low, dtype=torch.float16)
    shrink = (0.0, 0.25 / spec.high, 0.5 / spec.high, 1.0 / spec.high)
    for below in shrink:
        for above in shrink:
            m = low + below * span
            d = (high - above * span - m) / spec.high
            d16, m16 = _fp16(d), _fp16(m)
            for _ in range(2):
                codes = _codes_for(spec, x, d16, m16)
                q = codes.to(torch.float32)
                sq, sx = q.sum(dim=1), x.sum(dim=1)
                sqq, sqx = (q * q).sum(dim=1), (q * x).sum(dim=1)
                det = n * sqq - sq * sq
                fit = det > 0
                d = torch.where(fit, (n * sqx - sq * sx) / torch.where(fit, det, 1.0), d)
                m = (sx - d * sq) / n
                d16, m16 = _fp16(d), _fp16(m)
            err = _error(x, _values(spec, d16, m16, _codes_for(spec, x, d16, m16)))
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_d = torch.where(better, d16, best_d)
            best_m = torch.where(better, m16, best_m)
    return best_d, best_m


def _qconv(x: torch.Tensor, spec: _Legacy):
    """The searched block where it is strictly better than llama's (float64 errors), else llama's."""
    d_llama, m_llama, codes_llama = _llama(x, spec)
    if spec.has_min:
        d16, m16 = _search_affine(x, spec)
    else:
        d16, m16 = _search_symmetric(x, spec), None
    codes = _codes_for(spec, x, d16, m16)
    err = _error(x, _values(spec, d16, m16, codes), torch.float64)
    err_llama = _error(x, _values(spec, d_llama, m_llama, codes_llama), torch.float64)
    keep = ~(err < err_llama * (1 - _STRICTLY_BETTER))
    d16 = torch.where(keep, d_llama, d16)
    m16 = None if m16 is None else torch.where(keep, m_llama, m16)
    return d16, m16, torch.where(keep[:, None], codes_llama, codes)


# ---------------------------------------------------------------------------------------------
# bytes


def _half_bytes(h: torch.Tensor) -> torch.Tensor:
    return h.reshape(-1, 1).contiguous().view(torch.uint8)


def _pack(spec: _Legacy, d16: torch.Tensor, m16: torch.Tensor | None, codes: torch.Tensor) -> torch.Tensor:
    """One ggml block per row of ``codes``: d (fp16), m (fp16, _1 types), qh (uint32 of each
    value's fifth bit, value j at bit j, Q5 types), qs (value j in the low nibble of byte j and
    value j+16 in its high nibble; Q8_0: one int8 per value)."""
    parts = [_half_bytes(d16)]
    if m16 is not None:
        parts.append(_half_bytes(m16))
    stored = (codes + spec.offset) & 0xFF
    if spec.bits == 8:
        parts.append(stored.to(torch.uint8))
    else:
        half = stored.shape[1] // 2
        if spec.bits == 5:
            fifth = ((stored >> 4) & 1).reshape(-1, 4, 8)
            weights = torch.tensor([1 << i for i in range(8)], dtype=torch.int32, device=codes.device)
            parts.append((fifth * weights).sum(dim=2).to(torch.uint8))
        low = stored & 0xF
        parts.append((low[:, :half] | (low[:, half:] << 4)).to(torch.uint8))
    return torch.cat(parts, dim=1)


def _float_bytes(x: torch.Tensor, type_name: str) -> torch.Tensor:
    if type_name == "F32":
        return x.contiguous().view(torch.uint8)
    if type_name == "F16":
        return _fp16(x).contiguous().view(torch.uint8)
    # ggml-impl.h ggml_compute_fp32_to_bf16: a NaN keeps its top half, made quiet (| 64); else
    # round to nearest even on the top 16 bits (the carry can run into the exponent: inf)
    bits = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    top = torch.where(nan, (bits >> 16) | 64, rounded) & 0xFFFF
    top = torch.where(top >= 0x8000, top - 0x10000, top)  # as int16, without relying on a wrapping cast
    return top.to(torch.int16).view(torch.uint8)


# ---------------------------------------------------------------------------------------------
# the table


def _check(weight: torch.Tensor, type_name: str, solver: str, block: int) -> None:
    if solver not in SOLVERS:
        raise UsageError(
            "{option} {value!r} is not one of " + ", ".join(SOLVERS), option="solver", value=solver
        )
    if weight.dtype != torch.float32 or weight.dim() != 2:
        raise UsageError(
            f"{type_name}: expects a float32 [rows, n] weight, got {weight.dtype} {tuple(weight.shape)}"
        )
    if weight.shape[1] % block:
        raise UsageError(f"{type_name}: rows of {weight.shape[1]} values do not split into blocks of {block}")


def _chunks(rows: int, n: int, device: torch.device):
    values = _CHUNK_VALUES if device.type != "cpu" else min(_CHUNK_VALUES, CPU_CHUNK_VALUES)
    step = max(1, values // max(n, 1))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def run_chunks(solve: Callable[[slice], None], chunks: Iterable[slice], device: torch.device) -> None:
    """``solve(chunk)`` for every chunk of rows (each writes its own rows of the output). On a GPU
    in order. On the CPU, whole chunks go to torch.get_num_threads() Python threads while torch
    runs every op on one thread, restored after. Why: a quantizer is thousands of small
    elementwise ops per chunk; split over OpenMP threads, each op ends in a barrier, and on a
    loaded machine (more runnable threads than cores) a barrier waits for a descheduled thread
    (measured on 2 shared cores at load 8: 10-40x the wall time of one thread). A thread per chunk
    waits for nobody, and torch releases the GIL inside its ops. The bytes are the same: chunks
    are independent and every op is the same op on one thread."""
    chunks = list(chunks)
    if device.type != "cpu":
        for chunk in chunks:
            solve(chunk)
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if threads == 1 or len(chunks) <= 1:
            for chunk in chunks:
                solve(chunk)
            return
        with ThreadPoolExecutor(min(threads, len(chunks))) as pool:
            for _ in pool.map(solve, chunks):  # re-raises a chunk's exception
                pass
    finally:
        torch.set_num_threads(threads)


def _float_quantizer(type_name: str) -> Callable[[torch.Tensor, str], torch.Tensor]:
    def quantize(weight: torch.Tensor, solver: str = "llama") -> torch.Tensor:
        _check(weight, type_name, solver, 1)
        size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]][1]
        out = torch.empty((weight.shape[0], weight.shape[1] * size), dtype=torch.uint8, device=weight.device)
        for rows in _chunks(*weight.shape, weight.device):
            out[rows] = _float_bytes(weight[rows], type_name)
        return out

    quantize.__name__ = f"quantize_{type_name.lower()}"
    quantize.__doc__ = f"{type_name} bytes of a float32 [rows, n] weight (the solver is ignored)."
    return quantize


def _block_quantizer(spec: _Legacy) -> Callable[[torch.Tensor, str], torch.Tensor]:
    def quantize(weight: torch.Tensor, solver: str = "llama") -> torch.Tensor:
        _check(weight, spec.name, solver, spec.block)
        rows, n = weight.shape
        per_row = n // spec.block
        out = torch.empty((rows, per_row * spec.type_size), dtype=torch.uint8, device=weight.device)
        solve = _llama if solver == "llama" else _qconv

        def solve_chunk(chunk: slice) -> None:
            x = weight[chunk].reshape(-1, spec.block)
            out[chunk] = _pack(spec, *solve(x, spec)).reshape(-1, per_row * spec.type_size)

        run_chunks(solve_chunk, _chunks(rows, n, weight.device), weight.device)
        return out

    quantize.__name__ = f"quantize_{spec.name.lower()}"
    quantize.__doc__ = f"{spec.name} bytes of a float32 [rows, n] weight, blocks chosen by ``solver``."
    return quantize


#: type name -> ``quantize(weight float32 [rows, n], solver) -> uint8 [rows, bytes per row]``
QUANTIZERS: dict[str, Callable[[torch.Tensor, str], torch.Tensor]] = {
    **{name: _float_quantizer(name) for name in _FLOATS},
    **{name: _block_quantizer(spec) for name, spec in _LEGACY.items()},
}
