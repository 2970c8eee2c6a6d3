"""HQQ format: packing, the solvers against hqq itself, and hqq's HQQLinear reading our tensors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hqq.core.bitpack import BitPack
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear, Quantizer

from qconv.errors import ArtifactError, SourceError, UsageError
from qconv.formats import get_format
from qconv.formats.hqq_layout import BITS, PACKING, pack, parse_layer, unpack
from qconv.formats.hqq_solver import SolverParams, quantize_fast, quantize_reference

HQQ = get_format("hqq")
CPU = torch.device("cpu")


def recipe(**options):
    return {**HQQ.make_recipe(options), "dtype": "bfloat16"}


def weight(shape=(96, 256), seed=0, dtype=torch.bfloat16):
    torch.manual_seed(seed)
    w = torch.randn(shape) * 0.02
    w.view(-1)[::97] *= 8  # a few outliers, as real weights have
    return w.to(dtype)


# -- packing ------------------------------------------------------------------------------------
def test_4bit_bytes_pinned_first_half_rows_in_high_nibble():
    codes = torch.tensor([[1, 2], [3, 4], [15, 0], [7, 8]], dtype=torch.uint8)
    packed = pack(codes, "4bit_u8")
    assert packed.tolist() == [[0x1F, 0x20], [0x37, 0x48]]
    assert unpack(packed, "4bit_u8", 4).tolist() == codes.tolist()


def test_3bit_packs_ten_rows_an_int32_with_zero_padding():
    codes = torch.arange(11, dtype=torch.uint8).reshape(11, 1) % 8
    packed = pack(codes, "3bit_32")
    assert packed.dtype == torch.int32 and packed.shape == (2, 1)
    # rows padded to 20 and cut in 10 slices of 2: slice k goes to bits 27-3k, so packed row j
    # holds rows j, j+2, j+4 ...; rows 11..19 are padding zeros
    first = sum(c << (27 - 3 * k) for k, c in enumerate([0, 2, 4, 6, 0, 2, 0, 0, 0, 0]))
    second = sum(c << (27 - 3 * k) for k, c in enumerate([1, 3, 5, 7, 1, 0, 0, 0, 0, 0]))
    assert packed.reshape(-1).tolist() == [first, second]
    assert unpack(packed, "3bit_32", 11).tolist() == codes.tolist()


@pytest.mark.parametrize("packing", sorted(set(PACKING.values())))
def test_packing_equals_hqq_bitpack(packing):
    bits = {"8bit_u8": 8, "4bit_u8": 4, "3bit_32": 3, "2bit_u8": 2, "1bit_u8": 1}[packing]
    torch.manual_seed(1)
    codes = torch.randint(0, 2**bits, (40, 6), dtype=torch.uint8)
    ours = pack(codes, packing)
    theirs = getattr(BitPack, f"pack_{packing}")(codes)
    assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)
    assert torch.equal(unpack(ours, packing, 40).to(torch.uint8), codes)


# -- solvers ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("axis,group_size", [(1, 64), (0, 64), (1, 32), (1, 128)])
def test_reference_solver_equals_hqq_quantizer(bits, axis, group_size):
    w = weight(seed=bits)
    params = SolverParams(bits=bits, group_size=group_size, axis=axis, round_zero=bits == 4)
    ours = quantize_reference(w, params)
    W_q, meta = Quantizer.quantize(
        w, nbits=bits, group_size=group_size, axis=axis, round_zero=bits == 4, device="cpu", bitpack=False
    )
    assert torch.equal(ours.codes, W_q.to(torch.uint8))
    assert torch.equal(ours.scale, meta["scale"])
    assert torch.equal(ours.zero, meta["zero"])


def _group_sq_error(w, groups, params):
    deq = ((groups.codes.float() - groups.zero) * groups.scale).reshape(w.shape)
    diff = (deq - w.float()).square()
    per_group = (
        diff.reshape(-1, params.group_size) if params.axis == 1 else diff.reshape(params.group_size, -1).t()
    )
    return per_group.sum(1), torch.linalg.vector_norm(deq - w.float()) / torch.linalg.vector_norm(w.float())


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("axis", [1, 0])
def test_fast_solver_never_worse_than_hqq_in_any_group(bits, axis):
    w = weight(seed=10 + bits)
    params = SolverParams(bits=bits, group_size=64, axis=axis, round_zero=bits == 4)
    ref_groups, ref_rel = _group_sq_error(w, quantize_reference(w, params), params)
    fast_groups, fast_rel = _group_sq_error(w, quantize_fast(w, params), params)
    # each group follows hqq's trajectory and keeps its best iterate (hqq_solver.py); the
    # solver measured W - (W_q - z) / s, this (W_q - z) * (1 / s): allow float32 rounding
    assert (fast_groups <= ref_groups * (1 + 1e-5)).all()
    assert fast_rel <= ref_rel * (1 + 1e-6)


def test_fast_solver_on_a_chunk_boundary_equals_unchunked(monkeypatch):
    from qconv.formats import hqq_solver

    w = weight((64, 192))
    params = SolverParams(bits=3, group_size=64)
    whole = quantize_fast(w, params)
    monkeypatch.setattr(hqq_solver, "TORCH_CHUNK_ELEMENTS", 64 * 5)  # 5 groups a chunk, 192 groups
    chunked = quantize_fast(w, params)
    assert torch.equal(whole.codes, chunked.codes) and torch.equal(whole.zero, chunked.zero)


@pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("QCONV_TEST_TRITON_INTERPRET") != "1",
    reason="the Triton kernel needs CUDA (or QCONV_TEST_TRITON_INTERPRET=1 with triton installed)",
)
def test_triton_kernel_matches_the_torch_solver():
    script = r"""
import torch
from qconv.formats.hqq_layout import PACKING, pack
from qconv.formats.hqq_solver import SolverParams, solve_rows_chunked, solve_rows_triton
torch.manual_seed(0)
device = "cuda" if torch.cuda.is_available() else "cpu"
w = (torch.randn(96, 256) * 0.02).to(torch.bfloat16)
for bits, group in [(4, 64), (3, 64), (2, 128), (8, 48), (1, 64)]:
    p = SolverParams(bits=bits, group_size=group, round_zero=bits == 4)
    rows = w.reshape(-1, group)
    c1, s1, z1 = (t.cpu() for t in solve_rows_triton(rows.to(device).contiguous(), p))
    c2, s2, z2 = solve_rows_chunked(rows.float().contiguous(), p)
    assert torch.equal(s1, s2), bits
    assert (c1.int() - c2.int()).abs().max() <= 1 and (c1 != c2).float().mean() < 1e-3, bits
    assert (z1 - z2).abs().max() < 0.1, bits
    # fused packing: the same bytes as packing the codes afterwards
    packed, s3, z3 = (t.cpu() for t in solve_rows_triton(rows.to(device).contiguous(), p, PACKING[bits], torch.float16))
    assert torch.equal(packed, pack(c1, PACKING[bits])), bits
    assert s3.dtype == torch.float16 and torch.equal(s3, s1.half()) and torch.equal(z3, z1.half()), bits
bad = w.clone()
bad[5, 7] = float("inf")
try:
    solve_rows_triton(bad.reshape(-1, 64).to(device).contiguous(), SolverParams(bits=4, group_size=64))
except ValueError as exc:
    assert "NaN or infinite" in str(exc)
else:
    raise AssertionError("inf accepted")
print("ok")
"""
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


# -- the stored layer ---------------------------------------------------------------------------
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("axis", [1, 0])
def test_hqqlinear_loads_our_tensors_and_dequantizes_identically(bits, axis):
    w = weight((64, 256), seed=bits)
    r = recipe(bits=bits, axis=axis)
    tensors = HQQ.quantize(w, r, CPU)
    assert {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()} == HQQ.output_specs(tuple(w.shape), r)
    layer = HQQLinear(
        None,
        BaseQuantizeConfig(nbits=bits, group_size=64, axis=axis),
        compute_dtype=torch.float32,
        device="cpu",
        initialize=False,
    )
    layer.load_state_dict({k: v.clone() for k, v in tensors.items()})
    assert layer.meta["nbits"] == bits and layer.meta["packing"] == PACKING[bits]
    assert layer.meta["shape"] == torch.Size(w.shape)
    theirs = layer.dequantize()
    ours = HQQ.dequantize(tensors, r)
    assert torch.equal(ours, theirs.reshape(ours.shape))


def test_hqqlinear_state_dict_keys_are_ours():
    """The keys hqq writes for a layer (HQQLinear.state_dict, safetensors-encoded) are exactly
    the suffixes qconv writes, with the same dtypes."""
    w = weight((64, 256), dtype=torch.float32)
    linear = torch.nn.Linear(256, 64, bias=False)
    linear.weight.data = w.clone()
    hqq_layer = HQQLinear(
        linear, BaseQuantizeConfig(nbits=4, group_size=64), compute_dtype=torch.float16, device="cpu"
    )
    theirs = hqq_layer.state_dict()
    ours = HQQ.quantize(w, {**recipe(bits=4, solver="hqq"), "dtype": "float16"}, CPU)
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda t: t.pop("zero"), "missing HQQ field(s) zero"),
        (lambda t: t.update(W_q=t["W_q"][:-1]), "W_q is uint8 [31, 64], expected uint8 [32, 64]"),
        (lambda t: t.update(nbits=torch.tensor(7, dtype=torch.int32)), "unsupported nbits 7"),
        (lambda t: t.update(axis=torch.tensor(2, dtype=torch.int32)), "axis 2 is not 0 or 1"),
        (
            lambda t: t.update(group_size=torch.tensor(100, dtype=torch.int32)),
            "group_size 100 does not divide",
        ),
        (lambda t: t.update(scale=t["scale"][:3]), "scale is float16 [3, 1], expected 64 floats"),
        (lambda t: t.update(quant_zero=torch.tensor(1, dtype=torch.uint8)), "quant_zero is set"),
    ],
)
def test_malformed_layer_is_refused_with_the_reason(change, message):
    tensors = HQQ.quantize(weight((16, 256)), recipe(bits=4), CPU)
    change(tensors)
    with pytest.raises(ArtifactError) as error:
        parse_layer(tensors)
    assert message in str(error.value)


# -- recipe -------------------------------------------------------------------------------------
def test_recipe_defaults_follow_hqq():
    r = HQQ.make_recipe({})
    assert r == {
        "method": "hqq",
        "bits": 4,
        "group_size": 64,
        "axis": 1,
        "solver": "qconv",
        "round_zero": True,
        "optimize": True,
        "lp_norm": 0.7,
        "beta": 10.0,
        "kappa": 1.01,
        "iters": 20,
    }
    assert HQQ.make_recipe({"bits": 3})["round_zero"] is False
    assert HQQ.label(HQQ.make_recipe({"bits": 2, "axis": 0, "group_size": 32})) == "hqq 2-bit g32 axis0"


@pytest.mark.parametrize(
    "options,message",
    [
        ({"bits": 7}, "--method hqq: --bits 7 is not supported; choose from 1, 2, 3, 4, 5, 6, 8"),
        ({"group_size": 60}, "--method hqq: --group-size 60 must be a multiple of 8"),
        ({"quant_type": "nf4"}, "--quant-type does not apply to --method hqq"),
    ],
)
def test_recipe_errors(options, message):
    with pytest.raises(UsageError) as error:
        HQQ.make_recipe(options)
    assert error.value.cli_message() == message


def test_skip_reasons():
    r = HQQ.make_recipe({"bits": 2})
    assert HQQ.skip_reason("m", (64, 256), r) is None
    assert HQQ.skip_reason("m", (10, 10), r) == "10x10 weights do not split into groups of 64"
    assert HQQ.skip_reason("m", (2, 64), r) == "2 group rows cannot be packed 4 a byte for 2-bit"
    assert HQQ.skip_reason("m", (2, 64), HQQ.make_recipe({"bits": 3})) is None


def test_quantize_refuses_non_finite_weights():
    w = weight((16, 64))
    w[3, 5] = float("nan")
    with pytest.raises(SourceError, match="NaN or infinite"):
        HQQ.quantize(w, recipe(), CPU)
