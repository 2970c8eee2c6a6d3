"""bitsandbytes format: keys, bytes and the pure-torch dequantizer, against bitsandbytes itself."""

from __future__ import annotations

import json

import bitsandbytes.functional as F
import pytest
import torch

from qconv.errors import SourceError, UsageError
from qconv.formats import get_format
from qconv.formats.format_bnb import dequantize_4bit, unpack_4bit_codes

BNB = get_format("bnb")
CPU = torch.device("cpu")
# NF4 code table from the QLoRA paper (bitsandbytes.functional.get_4bit_type("nf4")).
NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]


def recipe(**options):
    return {**BNB.make_recipe(options), "dtype": "float32"}


def test_nf4_bytes_pinned_high_nibble_first():
    # 64 weights whose codes are known: w = NF4[code] * 2, the block's absmax is 2 (code 15).
    codes = [(7 * i + 3) % 16 for i in range(64)]
    codes[0] = 15
    weight = (torch.tensor([NF4[c] for c in codes]) * 2.0).reshape(4, 16)
    packed = BNB.quantize(weight, recipe(bits=4, double_quant=False), CPU)
    expected = [(codes[2 * k] << 4) | codes[2 * k + 1] for k in range(32)]
    assert packed["weight"].shape == (32, 1) and packed["weight"].dtype == torch.uint8
    assert packed["weight"].reshape(-1).tolist() == expected
    assert packed["weight.absmax"].tolist() == [2.0]
    assert unpack_4bit_codes(packed["weight"], 64).tolist() == codes


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize(
    "shape,blocksize", [((96, 64), 64), ((48, 40), 64), ((512, 130), 128), ((300, 256), 32)]
)
def test_4bit_matches_bitsandbytes(quant_type, double_quant, shape, blocksize):
    torch.manual_seed(0)
    weight = torch.randn(shape, dtype=torch.bfloat16)
    r = recipe(bits=4, quant_type=quant_type, double_quant=double_quant, blocksize=blocksize)
    packed = BNB.quantize(weight, r, CPU)
    ref_packed, ref_state = F.quantize_4bit(
        weight, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type
    )
    # The exact keys transformers writes, in bnb's own bytes.
    expected = {"weight": ref_packed, **{f"weight.{k}": v for k, v in ref_state.as_dict(packed=True).items()}}
    assert sorted(packed) == sorted(expected) == sorted(BNB.output_suffixes(r))
    for suffix, spec in BNB.output_specs(shape, r).items():  # the sizes the writer plans with
        if spec is not None:
            assert (packed[suffix].dtype, tuple(packed[suffix].shape)) == spec, suffix
    for key, value in expected.items():
        assert torch.equal(packed[key], value), key
    # The pure-torch dequantizer equals bnb's own (which works in the weight's dtype).
    ours = dequantize_4bit(packed)
    theirs = F.dequantize_4bit(ref_packed, ref_state).float()
    assert ours.shape == shape
    torch.testing.assert_close(ours.to(torch.bfloat16).float(), theirs, rtol=0, atol=0)


def test_quant_state_json_is_what_bnb_reads():
    weight = torch.randn(64, 64)
    packed = BNB.quantize(weight, recipe(bits=4), CPU)
    state = json.loads(bytes(packed["weight.quant_state.bitsandbytes__nf4"].tolist()))
    assert state["quant_type"] == "nf4" and state["blocksize"] == 64 and state["shape"] == [64, 64]
    assert state["nested_blocksize"] == 256
    restored = F.QuantState.from_dict(
        {k.removeprefix("weight."): v for k, v in packed.items() if k != "weight"}, CPU
    )
    torch.testing.assert_close(F.dequantize_4bit(packed["weight"], restored), dequantize_4bit(packed))


def test_int8_matches_bitsandbytes_and_row_formula():
    torch.manual_seed(1)
    weight = torch.randn(40, 72, dtype=torch.bfloat16)
    packed = BNB.quantize(weight, recipe(bits=8), CPU)
    int8, scb, _ = F.int8_vectorwise_quant(weight.half())
    assert torch.equal(packed["weight"], int8) and torch.equal(packed["SCB"], scb)
    assert packed["weight_format"].item() == 0
    specs = BNB.output_specs((40, 72), recipe(bits=8))
    assert {k: (v.dtype, tuple(v.shape)) for k, v in packed.items()} == specs
    expected = torch.round(weight.half().float() * 127 / weight.half().float().abs().amax(1, keepdim=True))
    assert torch.equal(packed["weight"].float(), expected)
    deq = BNB.dequantize(packed, recipe(bits=8))
    torch.testing.assert_close(deq, int8.float() * scb[:, None] / 127)


def test_int8_refuses_weights_beyond_fp16():
    with pytest.raises(UsageError, match="overflows float16"):
        BNB.quantize(torch.full((4, 4), 1e6), recipe(bits=8), CPU)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_refuses_nan_and_inf(bits, bad):
    """bitsandbytes itself quantizes them silently (a NaN block's absmax is NaN)."""
    weight = torch.randn(64, 64)
    weight[3, 5] = bad
    with pytest.raises(SourceError, match="^the weight has NaN or infinite values$"):
        BNB.quantize(weight, recipe(bits=bits), CPU)


BLOCKSIZES = "32, 64, 128, 256, 512, 1024, 2048, 4096"


@pytest.mark.parametrize(
    "options,message,cli_message",
    [
        (
            {"bits": 3},
            "method bnb: bits 3 is not supported; choose from 4, 8",
            "--method bnb: --bits 3 is not supported; choose from 4, 8",
        ),
        (
            {"bits": 4, "blocksize": 48},
            f"method bnb bits 4: blocksize 48 is not supported; choose from {BLOCKSIZES}",
            f"--method bnb --bits 4: --blocksize 48 is not supported; choose from {BLOCKSIZES}",
        ),
        (
            {"bits": 8, "quant_type": "nf4"},
            "quant_type does not apply to method bnb",
            "--quant-type does not apply to --method bnb",
        ),
        (
            {"bits": 8, "double_quant": False},
            "double_quant does not apply to method bnb",
            "--double-quant does not apply to --method bnb",
        ),
        (
            {"group_size": 64, "arch": "sm80"},
            "arch, group_size does not apply to method bnb",
            "--arch, --group-size does not apply to --method bnb",
        ),
        (
            {"quant_type": "nf5"},
            "method bnb bits 4: quant_type nf5 is not supported; choose from nf4, fp4",
            "--method bnb --bits 4: --quant-type nf5 is not supported; choose from nf4, fp4",
        ),
    ],
)
def test_recipe_errors(options, message, cli_message):
    """The library names options as Python arguments; the CLI (cli_message) as flags."""
    with pytest.raises(UsageError) as info:
        BNB.make_recipe(options)
    assert str(info.value) == message
    assert info.value.cli_message() == cli_message


def test_recipe_defaults_and_labels():
    assert BNB.make_recipe({}) == {
        "method": "bnb",
        "bits": 4,
        "quant_type": "nf4",
        "double_quant": True,
        "blocksize": 64,
    }
    assert BNB.label(BNB.make_recipe({"bits": 4, "quant_type": "fp4", "double_quant": False})) == "bnb fp4"
    assert BNB.label(BNB.make_recipe({"bits": 8})) == "bnb int8"


def test_unknown_method_lists_valid_ones():
    with pytest.raises(UsageError, match=r"unknown method 'gptq'; valid methods: .*bnb"):
        get_format("gptq")


@pytest.mark.parametrize("tokens", [1, 7])
def test_int8_inputs_are_what_bitsandbytes_multiplies(tokens):
    """qconv's reference quantizes a bnb int8 layer's input as LLM.int8 does at run time
    (formats/format_bnb.py int8_inputs): bitsandbytes' own Linear8bitLt with the stored bytes
    gives the same output as the dequantized weight times int8_inputs(x), outlier columns
    (|x| >= 6) and a zero row included, up to float32 rounding (bnb sums integer products and
    rescales once; the reference multiplies dequantized floats)."""
    import bitsandbytes as bnb

    from qconv.formats.format_bnb import int8_inputs

    torch.manual_seed(0)
    weight, bias = torch.randn(48, 64) * 0.05, torch.randn(48) * 0.1
    x = torch.randn(2, tokens, 64)
    x[:, :, 5] *= 20  # an outlier column
    x[0, 0, 9] = -7.5  # an outlier element in an otherwise ordinary column
    if tokens > 1:
        x[1, 2] = 0  # a zero row
    layer = bnb.nn.Linear8bitLt(64, 48, bias=True, has_fp16_weights=False, threshold=6.0)
    layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    layer.bias = torch.nn.Parameter(bias)
    layer = layer.to("cpu").eval()  # quantizes the weight as bnb stores it; eval: the inference path
    stored = {"weight": layer.weight.data, "SCB": layer.weight.SCB}
    with torch.no_grad():
        expected = layer(x)
    reference = int8_inputs(x) @ BNB.dequantize(stored, BNB.make_recipe({"bits": 8})).T + bias
    torch.testing.assert_close(expected, reference, rtol=1e-4, atol=1e-4)
    # without the outlier handling the difference is far larger than that: the test can fail
    plain = int8_inputs(x, threshold=0.0) @ BNB.dequantize(stored, BNB.make_recipe({"bits": 8})).T + bias
    assert (plain - expected).abs().max() > 1e-3
