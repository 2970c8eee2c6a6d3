"""EETQ's int8 quantization and the weight layout its GEMM reads, in pure torch, with the inverse.

Everything here follows the upstream C++ (NetEase-FuXi/EETQ, ``csrc/cutlass_kernels/
cutlass_preprocessors.cc``: ``symmetric_quantize`` and ``preprocess_weights_for_mixed_gemm``;
``csrc/cutlass_extensions/include/cutlass_extensions/gemm/kernel/mixed_gemm_B_layout.h``:
which steps each GPU generation takes). Upstream works on the weight transposed to
``[in, out]`` (``torch.t(weight)`` in ``python/eetq/modules/qlinear.py`` and in transformers'
``integrations/eetq.py``), so the matrices below are ``[K, N] = [in, out]``; a column is an
output channel. The byte pins are in tests/test_format_eetq.py.
"""

from __future__ import annotations

import torch

#: layouts qconv writes: the GPU generations upstream's preprocessor distinguishes for int8.
#: getLayoutDetailsForTransform: SM70-74 -> Sm70; SM75-79 -> Sm75; SM80-89 -> Sm80. For uint8
#: weights LayoutDetailsB<uint8_t, Arch> is one specialisation for every Arch with
#: kMinComputeCapability >= 75, so Sm75 and Sm80 lay the bytes out identically ("sm80" here).
#: SM90 and later hit FT_CHECK "Unsupported Arch": upstream has no layout for them.
ARCHS = ("sm70", "sm80")

# symmetric_quantize: quant_range_scale = 1.f / float(1 << (bits_in_type - 1)) = 1/128 for int8,
# and the quantized value is clamped to [-128, 127].
INT8_RANGE = 128.0
QMIN, QMAX = -128, 127

# permute_B_rows_for_mixed_gemm, int8 (ELTS_PER_REG = 4, B_ROWS_PER_MMA = 16): written row r of
# every group of 16 reads row 8*((r % 4) // 2) + r % 2 + 2*(r // 4).
ROW_PERMUTATION = tuple(8 * ((r % 4) // 2) + r % 2 + 2 * (r // 4) for r in range(16))
assert ROW_PERMUTATION == (0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15)
ROW_GROUP = 16
# LayoutDetailsB<uint8_t, Sm75+>: ThreadblockK = 64, ColumnsInterleaved = (128 * 8 / 8) / 64 = 2,
# i.e. ColumnMajorTileInterleave<64, 2>.
ROWS_PER_TILE = 64
COLUMNS_INTERLEAVED = 2
# add_bias_and_interleave_int8s_inplace: each 4-byte register [e0 e1 e2 e3] becomes [e0 e2 e1 e3].
REGISTER_ORDER = (0, 2, 1, 3)
#: the kernel's tile: in and out features must be multiples of this (subbyte_transpose's comment:
#: "Our kernels only handle dims which are multiples of 64 for weight-only quantization").
SHAPE_MULTIPLE = 64


def c_round(x: torch.Tensor) -> torch.Tensor:
    """C's ``round``: halves away from zero (``torch.round`` rounds them to even). Exact: the
    fractional part ``x - trunc(x)`` of a float is representable."""
    rounded = torch.round(x)
    truncated = torch.trunc(x)
    tie = (x - truncated).abs() == 0.5
    return torch.where(tie, truncated + torch.sign(x), rounded)


def quantize(weight_fp16: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[out, in]`` float16 weight -> (int8 ``[out, in]``, float16 scales ``[out]``), exactly as
    upstream's ``symmetric_quantize<half, half>``:

    - per output channel ``m = max |w|`` in float, ``scale = m * (1/128)`` (float);
    - ``q = clamp(round(w / scale), -128, 127)``, dividing by the FLOAT scale, C's rounding;
    - the stored scale is that float rounded to half (round to nearest even).

    An all-zero channel has scale 0, so upstream divides 0 by 0: ``round(NaN)`` is NaN and
    ``std::min(127.f, NaN)`` returns its first argument, so every such weight is stored as 127
    (dequantized: 127 * 0 = 0). Reproduced, to stay byte-exact.
    """
    w = weight_fp16.to(torch.float32)
    col_max = w.abs().amax(dim=1)
    scale = col_max * (1.0 / INT8_RANGE)
    q = c_round(w / scale[:, None])
    q = torch.where(torch.isnan(q), torch.full_like(q, QMAX), q.clamp(QMIN, QMAX))
    return q.to(torch.int8), scale.to(torch.float16)


def dequantize(q_out_in: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``[out, in]`` int8 and ``[out]`` scales -> float32 ``[out, in]`` (what the kernel computes
    with: the half scale times the integer)."""
    return q_out_in.to(torch.float32) * scales.to(torch.float32)[:, None]


# -- the layout ---------------------------------------------------------------------------------
def _check_shape(rows: int, cols: int) -> None:
    if rows % SHAPE_MULTIPLE or cols % SHAPE_MULTIPLE:
        raise ValueError(f"EETQ's layout needs [in, out] multiples of {SHAPE_MULTIPLE}, got [{rows}, {cols}]")


def _bias_and_register_order(data: torch.Tensor) -> torch.Tensor:
    """Step 4 (every arch): +128 on each byte (int8 -> biased uint8, i.e. flip the top bit), then
    bytes 1 and 2 of every 4-byte group swapped, over the flat buffer. Its own inverse apart
    from the bias, which ``_unbias`` removes."""
    flat = data.contiguous().view(torch.uint8).reshape(-1, 4) ^ 0x80
    return flat[:, list(REGISTER_ORDER)].reshape(data.shape)


def _undo_register_order_and_bias(data: torch.Tensor) -> torch.Tensor:
    flat = data.contiguous().view(torch.uint8).reshape(-1, 4)[:, list(REGISTER_ORDER)] ^ 0x80
    return flat.reshape(data.shape).view(torch.int8)


def preprocess(q_in_out: torch.Tensor, arch: str) -> torch.Tensor:
    """Row-major int8 ``[in, out]`` -> the bytes upstream's GEMM reads for ``arch``, returned as an
    int8 tensor of the same ``[in, out]`` shape (as upstream returns it: only the bytes move).

    sm80 (SM75-SM89: ColumnMajorTileInterleave<64, 2>, interleaved-B operator):
      1. permute_B_rows_for_mixed_gemm: rows permuted within groups of 16 (ROW_PERMUTATION);
      2. subbyte_transpose: to column-major, i.e. ``[out, in]`` row-major;
      3. interleave_column_major_tensor: columns in pairs; each pair is one row of 2*in bytes made
         of 64-row tiles taken alternately from the two columns;
      4. add_bias_and_interleave_int8s_inplace: +128 and bytes 1 and 2 of each 4 swapped.
    sm70 (RowMajor, plain OpMultiplyAdd): step 4 only.
    """
    if q_in_out.dtype != torch.int8 or q_in_out.dim() != 2:
        raise ValueError(f"expected a 2-D int8 matrix, got {q_in_out.dtype} {list(q_in_out.shape)}")
    rows, cols = q_in_out.shape
    _check_shape(rows, cols)
    if arch == "sm70":
        return _bias_and_register_order(q_in_out).view(torch.int8)
    if arch != "sm80":
        raise ValueError(f"unknown EETQ layout {arch!r}; known: {', '.join(ARCHS)}")
    permutation = torch.tensor(ROW_PERMUTATION, device=q_in_out.device)
    permuted = q_in_out.reshape(rows // ROW_GROUP, ROW_GROUP, cols)[:, permutation].reshape(rows, cols)
    column_major = permuted.t()  # [out, in]: column n of [in, out] is row n here
    interleaved = (
        column_major.reshape(
            cols // COLUMNS_INTERLEAVED, COLUMNS_INTERLEAVED, rows // ROWS_PER_TILE, ROWS_PER_TILE
        )
        .permute(0, 2, 1, 3)  # [column pair, tile, column within pair, row within tile]
        .contiguous()
    )
    return _bias_and_register_order(interleaved).view(torch.int8).reshape(rows, cols)


def unpreprocess(stored: torch.Tensor, arch: str) -> torch.Tensor:
    """The exact inverse of :func:`preprocess`: stored ``[in, out]`` bytes -> row-major int8
    ``[in, out]``."""
    if stored.dtype != torch.int8 or stored.dim() != 2:
        raise ValueError(f"expected a 2-D int8 matrix, got {stored.dtype} {list(stored.shape)}")
    rows, cols = stored.shape
    _check_shape(rows, cols)
    plain = _undo_register_order_and_bias(stored)
    if arch == "sm70":
        return plain
    if arch != "sm80":
        raise ValueError(f"unknown EETQ layout {arch!r}; known: {', '.join(ARCHS)}")
    column_major = (
        plain.reshape(cols // COLUMNS_INTERLEAVED, rows // ROWS_PER_TILE, COLUMNS_INTERLEAVED, ROWS_PER_TILE)
        .permute(0, 2, 1, 3)
        .reshape(cols, rows)
    )
    permuted = column_major.t()
    inverse = torch.argsort(torch.tensor(ROW_PERMUTATION, device=stored.device))
    return permuted.reshape(rows // ROW_GROUP, ROW_GROUP, cols)[:, inverse].reshape(rows, cols).contiguous()
