"""Uniform group quantization as a value: what the numbers mean, apart from how a format lays them out.

A weight is cut into groups of ``group_size`` values; each group has a scale (and, unless
symmetric, a zero point), and each value an integer code:

    w ~ (code - zero) * scale        (asymmetric: codes in [0, 2^bits - 1])
    w ~ code * scale                 (symmetric: signed codes in [-(2^(bits-1) - 1), 2^(bits-1) - 1])

:class:`UniformSpec` describes the scheme, :class:`UniformWeights` holds the numbers, and a solver
turns a weight into them: :func:`solve_rtn` here (round to nearest); HQQ's optimiser is another.
A *layout* (HQQ's ``W_q``/``scale``/``zero``, GGUF's blocks, compressed-tensors' ``weight_packed``)
is then only a way of storing a :class:`UniformWeights`: packing codes, casting scales, naming
tensors. Keeping the two apart lets each layout be tested on fixed numbers and each solver on any
layout.

Groups, as HQQ defines them (so its layers map onto this without a transpose): the ``[out, in]``
weight, row-major, is viewed as a grid

- ``axis=1``: ``[numel / group_size, group_size]``, a group per grid row. When ``group_size``
  divides ``in`` this is "each output row cut into groups along the input features", the grouping
  of GGUF, GPTQ and compressed-tensors; ``group_size = in`` is one scale per output channel;
- ``axis=0``: ``[group_size, numel / group_size]``, a group per grid column (HQQ's ``axis=0``).

Scales and zeros have the grid's shape with the group dimension set to 1 (``[groups, 1]`` or
``[1, groups]``), so ``(codes - zeros) * scales`` broadcasts over the grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qconv.errors import SourceError, UsageError

ZERO_KINDS = ("int", "float")


@dataclass(frozen=True)
class UniformSpec:
    """A uniform group quantization scheme.

    ``bits``: 1 to 8 (codes fit a byte). ``group_size``: values sharing one scale (and zero).
    ``axis``: how groups run over the weight (module docstring). ``symmetric``: no zero point,
    signed codes centred on 0. ``zero``: the zero point is an integer code (``"int"``: GPTQ,
    compressed-tensors; the value 0 is then exact) or a float (``"float"``: HQQ, GGUF's
    ``d * q + m`` blocks). ``scale_dtype``: the dtype scales (and float zeros) are stored in;
    solvers round them to it before choosing codes, so the stored numbers are the ones measured.
    """

    bits: int
    group_size: int
    axis: int = 1
    symmetric: bool = False
    zero: str = "float"
    scale_dtype: torch.dtype = torch.float16

    def __post_init__(self) -> None:
        low = 2 if self.symmetric else 1  # a 1-bit symmetric code could only be 0
        if not low <= self.bits <= 8:
            raise UsageError(f"uniform quantization: bits {self.bits} is not between {low} and 8")
        if self.group_size < 1:
            raise UsageError(f"uniform quantization: group_size {self.group_size} is not positive")
        if self.axis not in (0, 1):
            raise UsageError(f"uniform quantization: axis {self.axis} is not 0 or 1")
        if self.zero not in ZERO_KINDS:
            raise UsageError(
                f"uniform quantization: zero {self.zero!r} is not one of {', '.join(ZERO_KINDS)}"
            )
        if not self.scale_dtype.is_floating_point:
            raise UsageError(f"uniform quantization: scale dtype {self.scale_dtype} is not a float dtype")

    @property
    def code_min(self) -> int:
        return -(2 ** (self.bits - 1) - 1) if self.symmetric else 0

    @property
    def code_max(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def code_dtype(self) -> torch.dtype:
        """int8 for signed codes, uint8 for unsigned ones (unpacked: one code a byte)."""
        return torch.int8 if self.symmetric else torch.uint8

    def grid(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight viewed as the grid its groups are rows (axis 1) or columns (axis 0) of."""
        numel = weight.numel()
        if numel % self.group_size:
            raise UsageError(
                f"uniform quantization: a {'x'.join(map(str, weight.shape))} weight does not split into "
                f"groups of {self.group_size}"
            )
        shape = (-1, self.group_size) if self.axis == 1 else (self.group_size, -1)
        return weight.reshape(shape)


@dataclass(frozen=True)
class UniformWeights:
    """The numbers of one uniformly quantized weight (all on one device).

    ``codes``: the grid (``spec.grid``), unpacked, ``spec.code_dtype``; ``scales``: the grid's
    shape with the group dimension 1, ``spec.scale_dtype``; ``zeros``: the same shape as
    ``scales`` (float zeros in ``spec.scale_dtype``, integer ones in ``uint8``), None when
    symmetric; ``shape``: the weight's shape.
    """

    spec: UniformSpec
    shape: tuple[int, ...]
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(codes - zeros) * scales`` (symmetric: ``codes * scales``), computed in float32,
        as a tensor of the weight's shape."""
        values = self.codes.to(torch.float32)
        if self.zeros is not None:
            values = values - self.zeros.to(torch.float32)
        return (values * self.scales.to(torch.float32)).reshape(self.shape).to(dtype)


def solve_rtn(weight: torch.Tensor, spec: UniformSpec) -> UniformWeights:
    """Round to nearest: each group's range mapped onto the codes, every value rounded to the
    nearest code. Asymmetric: the group's min and max become codes 0 and ``2^bits - 1`` (with an
    integer zero the range is first widened to hold 0, so that 0 stays exact and the zero point
    is a code). Symmetric: the group's largest magnitude becomes ``2^(bits-1) - 1``. A group
    whose values are all equal gets scale 1. Raises SourceError for NaN or infinite values."""
    if not torch.isfinite(weight).all():
        raise SourceError("the weight has NaN or infinite values")
    grid = spec.grid(weight.to(torch.float32))
    group_dim = 1 if spec.axis == 1 else 0
    if spec.symmetric:
        absmax = grid.abs().amax(dim=group_dim, keepdim=True)
        scales = _stored_scales(torch.where(absmax > 0, absmax / spec.code_max, 1.0), spec)
        codes = torch.round(grid / scales.to(torch.float32)).clamp(spec.code_min, spec.code_max)
        return UniformWeights(spec, tuple(weight.shape), codes.to(spec.code_dtype), scales, None)
    low = grid.amin(dim=group_dim, keepdim=True)
    high = grid.amax(dim=group_dim, keepdim=True)
    if spec.zero == "int":
        low, high = low.clamp(max=0), high.clamp(min=0)
    spread = high - low
    scales = _stored_scales(torch.where(spread > 0, spread / spec.code_max, 1.0), spec)
    scale32 = scales.to(torch.float32)
    if spec.zero == "int":
        zeros = torch.round(-low / scale32).clamp(0, spec.code_max).to(torch.uint8)
    else:
        zeros = _stored(0.0 - low / scale32, spec)  # 0.0 - x: no negative zero in the stored bytes
    codes = torch.round(grid / scale32 + zeros.to(torch.float32)).clamp(0, spec.code_max)
    return UniformWeights(spec, tuple(weight.shape), codes.to(spec.code_dtype), scales, zeros)


def _stored(values: torch.Tensor, spec: UniformSpec) -> torch.Tensor:
    """``values`` as stored (rounded to ``spec.scale_dtype``), clamped to its finite range (a
    float zero of a group far from 0 with a tiny spread may not fit float16: use float32)."""
    finfo = torch.finfo(spec.scale_dtype)
    return values.clamp(-finfo.max, finfo.max).to(spec.scale_dtype)


def _stored_scales(values: torch.Tensor, spec: UniformSpec) -> torch.Tensor:
    """Positive scales as stored; one too small for the dtype becomes its smallest normal
    number rather than 0, which would divide by zero."""
    stored = _stored(values, spec)
    return torch.where(stored > 0, stored, torch.finfo(spec.scale_dtype).tiny).to(spec.scale_dtype)


def bits_per_weight(spec: UniformSpec) -> float:
    """Storage cost of the numbers: the code plus the group's scale (and zero) spread over it."""
    scale_bits = torch.finfo(spec.scale_dtype).bits
    zero_bits = 0 if spec.symmetric else (8 if spec.zero == "int" else scale_bits)
    return spec.bits + (scale_bits + zero_bits) / spec.group_size
