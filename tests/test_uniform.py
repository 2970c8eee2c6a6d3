"""formats/uniform.py: the numbers of uniform group quantization and the round-to-nearest solver.

Small fixed tensors pin codes, scales and zeros exactly (a change of rounding or of the group
layout fails here first); random ones check the error bound, the error against bits and that
quantizing a quantized weight changes nothing.
"""

from __future__ import annotations

import pytest
import torch

from qconv.errors import SourceError, UsageError
from qconv.formats.uniform import UniformSpec, UniformWeights, bits_per_weight, solve_rtn

ROW = torch.tensor([[-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0]])


def test_asymmetric_float_zero_pinned():
    numbers = solve_rtn(ROW, UniformSpec(bits=2, group_size=4))
    assert numbers.codes.dtype == torch.uint8
    assert numbers.codes.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    # group 2: scale (3 - 1) / 3 rounded to float16, zero -1 / scale rounded to float16
    assert numbers.scales.dtype == numbers.zeros.dtype == torch.float16
    assert numbers.scales.view(torch.int16).tolist() == [[0x3800], [0x3955]]  # 0.5, 0.66650390625
    assert numbers.zeros.view(torch.int16).tolist() == [[0x4000], [0xBE00 - 0x10000]]  # 2.0, -1.5
    assert numbers.zeros.tolist() == [[2.0], [-1.5]]
    expected = torch.tensor([[-1.0, -0.5, 0.0, 0.5], [0, 1, 2, 3]]) - torch.tensor([[0.0], [-1.5]])
    expected[1] *= 0.66650390625
    assert torch.equal(numbers.dequantize(), expected.reshape(1, 8))


def test_asymmetric_integer_zero_keeps_zero_exact():
    """An integer zero point widens the range to hold 0 (group 2 is [1, 3]: its range becomes [0, 3])."""
    numbers = solve_rtn(ROW, UniformSpec(bits=2, group_size=4, zero="int"))
    assert numbers.codes.tolist() == [[0, 1, 2, 3], [1, 2, 2, 3]]  # 1.5 rounds half to even
    assert numbers.scales.tolist() == [[0.5], [1.0]]
    assert numbers.zeros.dtype == torch.uint8 and numbers.zeros.tolist() == [[2], [0]]
    assert numbers.dequantize().tolist() == [[-1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 2.0, 3.0]]


def test_symmetric_int8_pinned():
    """Symmetric 8-bit per channel: LLM.int8's and EETQ's scale, absmax / 127."""
    weight = torch.tensor([[-1.27, 0.5, 1.27, 0.0], [0.3, -0.6, 0.1, 0.0]])
    numbers = solve_rtn(weight, UniformSpec(bits=8, group_size=4, symmetric=True))
    assert numbers.zeros is None and numbers.codes.dtype == torch.int8
    assert numbers.codes.tolist() == [[-127, 50, 127, 0], [64, -127, 21, 0]]
    assert torch.equal(numbers.scales, (torch.tensor([[1.27], [0.6]]) / 127).half())
    assert torch.equal(numbers.dequantize(), numbers.codes.float() * numbers.scales.float())


def test_axis_0_groups_are_grid_columns():
    """HQQ's axis 0: the weight viewed as [group_size, -1], one group a column."""
    weight = torch.arange(8.0).reshape(2, 4)
    numbers = solve_rtn(weight, UniformSpec(bits=3, group_size=2, axis=0, scale_dtype=torch.float32))
    assert numbers.codes.shape == (2, 4) and numbers.scales.shape == numbers.zeros.shape == (1, 4)
    assert numbers.codes.tolist() == [[0, 0, 0, 0], [7, 7, 7, 7]]
    assert torch.allclose(numbers.scales, torch.full((1, 4), 4 / 7))
    assert torch.allclose(numbers.dequantize(), weight, atol=1e-6)
    assert not numbers.zeros[0, 0].signbit()  # the first group starts at 0: +0.0 stored, not -0.0


def test_constant_and_zero_groups():
    """A constant group: scale 1 and the value in the float zero, exactly; the other schemes
    keep 0 exact and the constant within half a step."""
    weight = torch.tensor([[0.0, 0.0, 0.0, 0.0, 2.5, 2.5, 2.5, 2.5]])
    numbers = solve_rtn(weight, UniformSpec(bits=4, group_size=4))
    assert numbers.scales.tolist() == [[1.0], [1.0]] and numbers.zeros.tolist() == [[0.0], [-2.5]]
    assert torch.equal(numbers.dequantize(), weight)
    for spec in (
        UniformSpec(bits=4, group_size=4, zero="int"),
        UniformSpec(bits=4, group_size=4, symmetric=True),
    ):
        numbers = solve_rtn(weight, spec)
        deq = numbers.dequantize()
        assert torch.equal(deq[0, :4], weight[0, :4]), spec
        assert (deq[0, 4:] - 2.5).abs().max() <= numbers.scales[1].float() / 2, spec


def test_tiny_scales_do_not_divide_by_zero():
    weight = torch.tensor([[1e-9, -1e-9, 0.0, 1e-9]])
    numbers = solve_rtn(weight, UniformSpec(bits=4, group_size=4, symmetric=True))
    assert (numbers.scales > 0).all()
    assert torch.allclose(numbers.dequantize(), weight, atol=1e-7)


@pytest.mark.parametrize("zero", ["float", "int"])
@pytest.mark.parametrize("axis", [0, 1])
def test_round_trip_error_within_half_a_step(zero, axis):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 96, generator=generator)
    spec = UniformSpec(bits=4, group_size=32, axis=axis, zero=zero, scale_dtype=torch.float32)
    numbers = solve_rtn(weight, spec)
    error = (spec.grid(numbers.dequantize()) - spec.grid(weight)).abs()
    # a float zero is exact, an integer one is rounded: up to another half step
    steps = 0.5 if zero == "float" else 1.0
    assert (error <= numbers.scales * steps * (1 + 1e-5)).all()
    assert numbers.codes.min() >= 0 and numbers.codes.max() <= 15


def test_error_falls_with_bits():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 128, generator=generator)
    errors = []
    for bits in range(2, 9):
        deq = solve_rtn(weight, UniformSpec(bits=bits, group_size=32)).dequantize()
        errors.append(((deq - weight).norm() / weight.norm()).item())
    assert errors == sorted(errors, reverse=True)
    # each bit about halves the error (uniform rounding: step / sqrt(12) per value)
    assert all(0.4 < later / earlier < 0.55 for earlier, later in zip(errors[:-1], errors[1:], strict=True))
    assert 0.07 < errors[2] < 0.09  # 4-bit, groups of 32


@pytest.mark.parametrize("symmetric", [False, True])
def test_quantizing_the_dequantized_weight_changes_nothing(symmetric):
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(16, 64, generator=generator)
    spec = UniformSpec(bits=3, group_size=16, symmetric=symmetric, scale_dtype=torch.float32)
    once = solve_rtn(weight, spec)
    twice = solve_rtn(once.dequantize(), spec)
    assert torch.equal(twice.codes, once.codes)
    assert torch.allclose(twice.dequantize(), once.dequantize(), atol=1e-6)


def test_weights_is_a_plain_value():
    numbers = solve_rtn(ROW, UniformSpec(bits=2, group_size=4))
    again = UniformWeights(numbers.spec, numbers.shape, numbers.codes, numbers.scales, numbers.zeros)
    assert torch.equal(again.dequantize(torch.bfloat16), numbers.dequantize().to(torch.bfloat16))
    assert numbers.shape == (1, 8)


def test_bits_per_weight():
    assert bits_per_weight(UniformSpec(bits=4, group_size=64)) == 4.5  # fp16 scale and zero
    assert bits_per_weight(UniformSpec(bits=4, group_size=32, zero="int")) == 4 + 24 / 32
    assert bits_per_weight(UniformSpec(bits=8, group_size=128, symmetric=True)) == 8.125


def test_refuses_nan_and_inf_as_a_broken_source():
    weight = torch.randn(4, 8)
    weight[1, 2] = float("inf")
    with pytest.raises(SourceError, match="^the weight has NaN or infinite values$"):
        solve_rtn(weight, UniformSpec(bits=4, group_size=8))


@pytest.mark.parametrize(
    "arguments,message",
    [
        ({"bits": 0, "group_size": 8}, "uniform quantization: bits 0 is not between 1 and 8"),
        (
            {"bits": 1, "group_size": 8, "symmetric": True},
            "uniform quantization: bits 1 is not between 2 and 8",
        ),
        ({"bits": 4, "group_size": 0}, "uniform quantization: group_size 0 is not positive"),
        ({"bits": 4, "group_size": 8, "axis": 2}, "uniform quantization: axis 2 is not 0 or 1"),
        (
            {"bits": 4, "group_size": 8, "zero": "half"},
            "uniform quantization: zero 'half' is not one of int, float",
        ),
    ],
)
def test_spec_errors(arguments, message):
    with pytest.raises(UsageError) as error:
        UniformSpec(**arguments)
    assert str(error.value) == message


def test_weight_that_does_not_split_into_groups():
    with pytest.raises(UsageError) as error:
        solve_rtn(torch.zeros(3, 5), UniformSpec(bits=4, group_size=4))
    assert str(error.value) == "uniform quantization: a 3x5 weight does not split into groups of 4"
