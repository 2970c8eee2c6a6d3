"""compressed-tensors: the schemes, llm-compressor's round-to-nearest numbers and the stored bytes.

Everything here follows compressed-tensors 0.19/0.20 (the library vLLM, SGLang and transformers
read these folders with) and llm-compressor 0.14 (what writes them):

- the schemes: ``compressed_tensors/quantization/quant_scheme.py`` ``PRESET_SCHEMES``;
- the numbers: llm-compressor's weight observer (``memoryless_minmax``: the min and max of each
  group), ``compressed_tensors.quantization.utils.calculate_qparams`` and
  ``lifecycle/forward_helpers.py`` ``_quantize``;
- the bytes: ``compressors/pack_quantized`` (``pack_to_int32``) and ``compressors/naive_quantized``
  (int-quantized, float-quantized).

Where this differs from ``formats/uniform.py``'s round to nearest (why it is not used here):
llm-compressor's integer range is the full two's-complement one, [-8, 7] for 4 bits, and a
symmetric scale is ``absmax / 7.5`` (half the range 15), not ``absmax / 7``; its zero point is a
signed int8 in the same range; and every step runs in the weight's own dtype (a bfloat16 model
gets bfloat16 scales, and ``w / scale`` is rounded to bfloat16 before it is rounded to an
integer). Reproducing those steps op for op, in the same dtype, gives byte-identical tensors
(tests/test_format_compressed_tensors.py compares them with llm-compressor's own output).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: the float8 dtype of float-quantized weights, and the largest magnitude it holds
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0


@dataclass(frozen=True)
class Scheme:
    """One of llm-compressor's preset schemes, the part qconv writes.

    ``weight_type``: "int" or "float"; ``strategy``: "group" (``group_size`` inputs a scale) or
    "channel" (one scale an output row); ``activations``: the dynamic per-token input
    quantization the serving engine applies (its bits and type), or None for weight-only.
    ``format``: the compressor llm-compressor picks for it (compressed_tensors'
    ``infer_module_format``: int weights with quantized activations are int-quantized, other int
    weights pack-quantized, float weights with quantized activations float-quantized).
    """

    name: str
    bits: int
    weight_type: str
    strategy: str
    symmetric: bool
    group_size: int | None
    activations: tuple[int, str] | None
    format: str


SCHEMES = {
    s.name: s
    for s in (
        Scheme("W4A16", 4, "int", "group", True, 128, None, "pack-quantized"),
        Scheme("W4A16_ASYM", 4, "int", "group", False, 128, None, "pack-quantized"),
        Scheme("W8A16", 8, "int", "group", True, 128, None, "pack-quantized"),
        Scheme("W8A8", 8, "int", "channel", True, None, (8, "int"), "int-quantized"),
        Scheme("FP8_DYNAMIC", 8, "float", "channel", True, None, (8, "float"), "float-quantized"),
    )
}


def code_range(scheme: Scheme) -> tuple[float, float]:
    """compressed_tensors' ``calculate_range``: the full signed range of an int, FP8's +-448."""
    if scheme.weight_type == "float":
        return -FP8_MAX, FP8_MAX
    return -(2.0 ** (scheme.bits - 1)), 2.0 ** (scheme.bits - 1) - 1


@dataclass(frozen=True)
class Quantized:
    """One weight in llm-compressor's numbers, before packing: ``codes`` ``[out, in]`` (int8, or
    float8 for FP8), ``scale`` ``[out, groups]`` in the weight's dtype, ``zero_point`` int8 of the
    same shape (None when symmetric: llm-compressor does not store it)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None


def quantize_rtn(weight: torch.Tensor, scheme: Scheme, group_size: int | None) -> Quantized:
    """llm-compressor's round to nearest of an ``[out, in]`` weight, in the weight's dtype, step
    for step (the caller has refused NaN and infinite values; ``group_size`` divides ``in``)."""
    out_features, in_features = weight.shape
    size = in_features if scheme.strategy == "channel" else group_size
    grid = weight.unflatten(-1, (in_features // size, size))  # [out, groups, size]
    q_min, q_max = code_range(scheme)
    q_min_t, q_max_t = torch.tensor(q_min, device=weight.device), torch.tensor(q_max, device=weight.device)
    # calculate_qparams: 0 must be representable, so the range always holds it
    min_vals = torch.min(grid.amin(dim=-1), torch.zeros((), dtype=weight.dtype, device=weight.device))
    max_vals = torch.max(grid.amax(dim=-1), torch.zeros((), dtype=weight.dtype, device=weight.device))
    bit_range = (q_max_t - q_min_t).to(weight.dtype)
    if scheme.symmetric:
        absmax = torch.max(min_vals.abs(), max_vals.abs())
        scale = absmax / (bit_range / 2)
        zero = None
    else:
        scale = (max_vals - min_vals) / bit_range
        zero = torch.clamp(q_min_t - min_vals / scale, q_min_t, q_max_t)
    # a zero scale (an all-zero group) becomes the dtype's eps, as calculate_qparams does; it is
    # replaced after the zero point was computed from it (0 / 0: NaN, stored as 0 below)
    eps = torch.tensor(torch.finfo(scale.dtype).eps, dtype=scale.dtype, device=scale.device)
    scale = torch.where(scale == 0, eps, scale)
    if zero is not None:
        zero = torch.nan_to_num(zero, nan=0.0)
        zero = torch.round(torch.clamp(zero, -128, 127)).to(torch.int8)
    scaled = grid / scale.unsqueeze(-1)
    if zero is not None:
        scaled += zero.unsqueeze(-1).to(weight.dtype)
    scaled = torch.clamp(scaled, q_min_t, q_max_t)
    if scheme.weight_type == "float":
        codes = scaled.to(FP8_DTYPE)
    else:
        codes = torch.round(scaled).to(torch.int8)
    return Quantized(codes.flatten(-2), scale, zero)


def dequantize(quantized: Quantized, in_features: int) -> torch.Tensor:
    """``(codes - zero_point) * scale`` in float32, ``[out, in]``. Exact: a code times a scale of
    at most 16 significant bits fits float32 (compressed-tensors computes in the scale's dtype,
    so its result is this one rounded to that dtype)."""
    groups = quantized.scale.shape[-1]
    values = quantized.codes.to(torch.float32).unflatten(-1, (groups, in_features // groups))
    if quantized.zero_point is not None:
        values = values - quantized.zero_point.to(torch.float32).unsqueeze(-1)
    return (values * quantized.scale.to(torch.float32).unsqueeze(-1)).flatten(-2)


def quantize_activations(x: torch.Tensor, activations: tuple[int, str]) -> torch.Tensor:
    """compressed-tensors' dynamic per-token input quantization, as its forward runs it before a
    W8A8 or FP8_DYNAMIC layer's matmul (``forward_quantize`` with ``compute_dynamic_scales_and_zp``
    and ``_quantize_dequantize``): per token, ``scale = absmax / 127.5`` (int8) or ``/ 448`` (FP8)
    in ``x``'s dtype, ``x / scale`` clipped and rounded (int8) or cast to E4M3, times the scale.
    Its TOKEN strategy keeps dimensions 0 and 1 and reduces the rest: a 3-D ``[batch, seq,
    hidden]`` input gets a scale per token, a 2-D one a single scale (reproduced)."""
    bits, kind = activations
    scheme = Scheme("activations", bits, kind, "token", True, None, None, "")
    q_min, q_max = code_range(scheme)
    q_min_t, q_max_t = torch.tensor(q_min, device=x.device), torch.tensor(q_max, device=x.device)
    if x.dim() > 2:
        dims = tuple(range(2, x.dim()))
        low, high = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
    else:
        low, high = torch.aminmax(x)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    absmax = torch.max(torch.min(low, zero).abs(), torch.max(high, zero).abs())
    scale = absmax / ((q_max_t - q_min_t).to(x.dtype) / 2)
    eps = torch.tensor(torch.finfo(scale.dtype).eps, dtype=scale.dtype, device=scale.device)
    scale = torch.where(scale == 0, eps, scale)
    scaled = torch.clamp(x / scale, q_min_t, q_max_t)
    codes = scaled.to(FP8_DTYPE).to(x.dtype) if kind == "float" else torch.round(scaled)
    return codes * scale


# -- pack-quantized: codes packed into int32 --------------------------------------------------
def packed_columns(columns: int, bits: int) -> int:
    return math.ceil(columns * bits / 32)


def pack_int32(values: torch.Tensor, bits: int, packed_dim: int = 1) -> torch.Tensor:
    """compressed_tensors' ``pack_to_int32``: each int8 code plus ``2^(bits-1)`` (unsigned), then
    the codes of a row (``packed_dim`` 1) or column (0) laid out bit after bit, element ``i`` at
    bits ``[i * bits, (i + 1) * bits)`` of the little-endian word stream: for 4 bits, element
    ``8k + j`` in bits ``4j .. 4j + 3`` of word ``k`` (the first element in the low nibble); for 8
    bits, one byte each. Rows are zero-padded to a whole number of words. ``bits`` 4 or 8 (what
    the schemes here use: no code straddles a word)."""
    if bits not in (4, 8):
        raise ValueError(f"pack_int32 packs 4 or 8 bits, not {bits}")
    if values.dtype != torch.int8 or values.dim() != 2:
        raise ValueError(f"expected a 2-D int8 tensor, got {values.dtype} {list(values.shape)}")
    unsigned = values.to(torch.int32) + (1 << (bits - 1))
    if packed_dim == 0:
        unsigned = unsigned.t()
    rows, cols = unsigned.shape
    per_word = 32 // bits
    padded = math.ceil(cols / per_word) * per_word
    unsigned = torch.nn.functional.pad(unsigned, (0, padded - cols)).reshape(rows, -1, per_word)
    shifts = torch.arange(per_word, device=values.device, dtype=torch.int32) * bits
    # the top code's shift may reach bit 31: int32 arithmetic wraps, as the two's-complement word
    packed = (unsigned << shifts).sum(dim=-1, dtype=torch.int32)
    return (packed.t() if packed_dim == 0 else packed).contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, count: int, packed_dim: int = 1) -> torch.Tensor:
    """The inverse of :func:`pack_int32`: ``count`` codes along ``packed_dim``, int8."""
    if bits not in (4, 8):
        raise ValueError(f"unpack_int32 unpacks 4 or 8 bits, not {bits}")
    words = packed.t() if packed_dim == 0 else packed
    per_word = 32 // bits
    shifts = torch.arange(per_word, device=packed.device, dtype=torch.int32) * bits
    codes = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    codes = codes.reshape(words.shape[0], -1)[:, :count] - (1 << (bits - 1))
    codes = codes.to(torch.int8)
    return (codes.t() if packed_dim == 0 else codes).contiguous()
