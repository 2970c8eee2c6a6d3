"""AQLM format: wrapped codes, the pure-torch dequantizer against aqlm's own, the code search,
and artifacts that stock transformers + aqlm load."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from aqlm.utils import _dequantize_weight, unpack_int_data
from safetensors.torch import load_file

from qconv.errors import UsageError
from qconv.formats import get_format
from qconv.formats.aqlm_layout import dequantize_layer, unwrap_codes, wrap_codes
from qconv.formats.aqlm_solver import nearest_codewords
from qconv.formats.format_aqlm import SCHEMES

AQLM = get_format("aqlm")


def recipe(**options):
    return {**AQLM.make_recipe(options), "dtype": "float32"}


def quantize_weight(weight, r):
    """The data-free quantizer (``--calibration none``)."""
    return AQLM.quantize(weight, r, torch.device("cpu"))


def test_codes_are_stored_wrapped():
    # FORMATS.md: index 40000 of a 16-bit codebook is stored as 40000 - 65536
    wrapped = wrap_codes(torch.tensor([0, 1, 32767, 32768, 40000, 65535]), 16)
    assert wrapped.dtype == torch.int16
    assert wrapped.tolist() == [0, 1, 32767, -32768, -25536, -1]
    assert unwrap_codes(wrapped, 16).tolist() == [0, 1, 32767, 32768, 40000, 65535]
    eight = wrap_codes(torch.tensor([0, 127, 128, 255]), 8)
    assert eight.dtype == torch.int8 and eight.tolist() == [0, 127, -128, -1]


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_dequantizer_equals_aqlm(scheme):
    books, nbits = SCHEMES[scheme]
    torch.manual_seed(0)
    codes = wrap_codes(torch.randint(0, 2**nbits, (24, 16, books)), nbits)
    codebooks = torch.randn(books, 2**nbits, 1, 8).half()
    scales = torch.rand(24, 1, 1, 1).half() + 0.5
    ours = dequantize_layer(codes, codebooks, scales)
    theirs = _dequantize_weight(unpack_int_data(codes, nbits), codebooks.float(), scales.float())
    assert ours.shape == (24, 128)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("count,size,dim", [(300, 256, 8), (50, 1000, 8), (129, 65536, 4)])
def test_nearest_codeword_search_equals_brute_force(count, size, dim, monkeypatch):
    from qconv.formats import aqlm_solver

    torch.manual_seed(count)
    vectors = torch.randn(count, dim)
    codebook = torch.randn(size, dim)
    codebook[7] = codebook[3]  # a duplicate codeword: the lower index wins, as argmin's does
    vectors[0] = codebook[3]
    monkeypatch.setattr(aqlm_solver, "SEARCH_CHUNK_ELEMENTS", size * 7)  # several chunks
    expected = torch.cdist(vectors.double(), codebook.double()).argmin(1)
    assert torch.equal(nearest_codewords(vectors, codebook), expected)
    assert nearest_codewords(vectors, codebook)[0] == 3


def test_quantizer_is_deterministic_and_refinement_helps():
    torch.manual_seed(0)
    weight = torch.randn(64, 256) * 0.02
    r = recipe(scheme="2x8", calibration="none")
    first, second = quantize_weight(weight, r), quantize_weight(weight, r)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert {k: (v.dtype, tuple(v.shape)) for k, v in first.items()} == AQLM.output_specs((64, 256), r)

    def error(packed):
        deq = AQLM.dequantize(packed, r)
        return (torch.linalg.vector_norm(deq - weight) / torch.linalg.vector_norm(weight)).item()

    unrefined = quantize_weight(weight, {**r, "refine_rounds": 0})
    assert error(first) < error(unrefined)
    # Gaussian weights at 2 bits a weight (the codebooks, fitted to only 2048 groups, not counted)
    assert 0.15 < error(first) < 0.3


def test_small_layer_with_more_codewords_than_groups_is_exact_to_fp16():
    torch.manual_seed(1)
    weight = torch.randn(32, 64)
    packed = quantize_weight(weight, recipe(scheme="1x16", calibration="none"))
    deq = AQLM.dequantize(packed, recipe(calibration="none"))
    assert (torch.linalg.vector_norm(deq - weight) / torch.linalg.vector_norm(weight)) < 1e-3


@pytest.mark.parametrize(
    "options,message,cli_message",
    [
        (
            {"in_group_size": 16},
            "method aqlm: in_group_size 16 is not supported; choose from 8",
            "--method aqlm: --in-group-size 16 is not supported; choose from 8",
        ),
        ({"bits": 2}, "bits does not apply to method aqlm", "--bits does not apply to --method aqlm"),
        (
            {"scheme": "3x8"},
            "method aqlm: scheme 3x8 is not supported; choose from 1x16, 2x8, 1x8",
            "--method aqlm: --scheme 3x8 is not supported; choose from 1x16, 2x8, 1x8",
        ),
        (
            {"calibration": "none", "max_epochs": 3},
            "calibration none: calib_tokens, finetune and max_epochs need calibration data",
            "--calibration none: --calib-tokens, --finetune and --max-epochs need calibration data",
        ),
        ({"max_epochs": -1}, "max_epochs -1: give 0 or more", "--max-epochs -1: give 0 or more"),
    ],
)
def test_recipe_errors(options, message, cli_message):
    with pytest.raises(UsageError) as error:
        AQLM.make_recipe(options)
    assert str(error.value) == message
    assert error.value.cli_message() == cli_message


# -- through the CLI and stock transformers -----------------------------------------------------
@pytest.mark.parametrize("scheme", ["1x16", "2x8", "1x8"])
def test_converts_and_loads_in_stock_transformers(cli, tiny_llama, tmp_path, scheme):
    out = tmp_path / scheme
    _, doc = cli.json(
        "convert",
        tiny_llama,
        "-o",
        out,
        "--method",
        "aqlm",
        "--scheme",
        scheme,
        "--device",
        "cpu",
        "--calibration",
        "none",
    )
    assert doc["verify"]["passed"], doc["verify"]
    assert doc["verify"]["logits"]["loader_rel_diff"] < 1e-5
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    books, nbits = SCHEMES[scheme]
    assert config == {
        "quant_method": "aqlm",
        "in_group_size": 8,
        "out_group_size": 1,
        "num_codebooks": books,
        "nbits_per_codebook": nbits,
        "linear_weights_not_to_quantize": ["model.embed_tokens.weight", "lm_head.weight", "lm_head"],
    }

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "QuantizedLinear"
    assert type(model.lm_head).__name__ == "Linear"
    source = load_file(str(tiny_llama / "model.safetensors"))
    assert torch.isfinite(model.lm_head.weight).all()
    assert torch.equal(model.lm_head.weight, source["lm_head.weight"].float())


def test_layers_whose_inputs_aqlm_kernels_get_wrong_stay_unquantized(cli, tmp_path):
    from conftest import make_tiny_llama

    source = make_tiny_llama(tmp_path / "src96", hidden=96)  # 96 inputs; down_proj has 192
    _, doc = cli.json(
        "convert",
        source,
        "-o",
        tmp_path / "out",
        "--method",
        "aqlm",
        "--device",
        "cpu",
        "--no-logits",
        "--calibration",
        "none",
    )
    manifest = json.loads((tmp_path / "out" / "qconv.json").read_text())
    assert sorted(manifest["layers"]) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert manifest["skipped"]["model.layers.0.self_attn.q_proj"] == (
        "96 input features: aqlm's CUDA kernels compute wrong results unless the input features are a "
        "multiple of 64"
    )
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert "model.layers.0.self_attn.q_proj.weight" in config["linear_weights_not_to_quantize"]
    assert "model.layers.0.self_attn.q_proj" in config["linear_weights_not_to_quantize"]


@pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("QCONV_TEST_TRITON_INTERPRET") != "1",
    reason="the fused search needs CUDA (or QCONV_TEST_TRITON_INTERPRET=1 with triton installed)",
)
def test_fused_search_picks_exactly_what_brute_force_picks():
    """Integer-valued vectors and codewords make every float32 distance exact, ties included
    (lowest index wins), so the fused kernel must agree with a float64 brute force exactly."""
    script = r"""
import torch
from qconv.formats.aqlm_triton import nearest_codewords_fused
device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
for n, k, d in [(300, 256, 8), (50, 1000, 8), (129, 4096, 4), (70, 65536, 8)]:
    x = torch.randint(-8, 9, (n, d)).float()
    c = torch.randint(-8, 9, (k, d)).float()
    c[7] = c[3]
    x[0] = c[3]
    brute = torch.cdist(x.double(), c.double()).argmin(1)
    got = nearest_codewords_fused(x.to(device), c.to(device)).cpu()
    assert torch.equal(got, brute), (n, k, d, (got != brute).sum())
    assert got[0] == 3
print("ok")
"""
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


@pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("QCONV_TEST_TRITON_INTERPRET") != "1",
    reason="the fused code search needs CUDA (or QCONV_TEST_TRITON_INTERPRET=1 with triton installed)",
)
def test_fused_greedy_pass_equals_the_beam_search_with_one_beam():
    """The fused pass (three kernels a step) against the torch beam search with beam 1, on
    integer-valued problems whose every float32 sum is exact: the same codes, and the running
    (W - W_hat) H equal to the one recomputed from them."""
    script = r"""
import torch
from qconv.formats.aqlm_solver import LayerCodes, beam_search, decode
from qconv.formats.aqlm_triton import greedy_pass
device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
for out, inputs, books, size, width in [(70, 32, 1, 256, 8), (33, 24, 2, 64, 8), (20, 16, 1, 300, 4)]:
    weight = torch.randint(-6, 7, (out, inputs)).float()
    x = torch.randint(-2, 3, (64, inputs)).float()
    xtx = x.t() @ x
    codebooks = torch.randint(-3, 4, (books, size, width)).float()
    codes = torch.randint(0, size, (out, inputs // width, books))
    scales = torch.ones(out)
    expected = beam_search(weight, xtx, LayerCodes(codes, codebooks, scales), 1).codes  # torch path
    got = codes.clone().to(device)
    residual_h = ((weight - decode(codes, codebooks, scales)) @ xtx).to(device)
    greedy_pass(residual_h, got, codebooks.to(device), scales.to(device), xtx.to(device))
    assert torch.equal(got.cpu(), expected), (out, inputs, books)
    assert torch.equal(residual_h.cpu(), (weight - decode(got.cpu(), codebooks, scales)) @ xtx)
print("ok")
"""
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


@pytest.mark.parametrize(("count", "size", "width"), [(1, 3, 2), (5, 16, 1), (1024, 7, 8), (3000, 256, 8)])
def test_codeword_sums_equal_a_direct_sum(count, size, width):
    """Sorted prefix sums (tiled: one row, a whole tile, a ragged last tile) give each codeword
    the sum of its entries; unused codewords get zero."""
    from qconv.formats.aqlm_solver import SortedCodes

    generator = torch.Generator().manual_seed(count)
    codes = torch.randint(0, size, (count,), generator=generator)
    values = torch.randn(count, width, generator=generator)
    grouped = SortedCodes(count, size, width, torch.device("cpu"))
    grouped.update(codes)
    expected = torch.zeros(size, width, dtype=torch.float64).index_add_(0, codes, values.double())
    torch.testing.assert_close(grouped.sums(values), expected.float(), rtol=1e-6, atol=1e-6)


def test_adam_gradient_is_autograds():
    """The written-out gradient (sorted prefix sums for the codebooks) equals autograd's."""
    from qconv.formats.aqlm_solver import AdamSteps, decode, output_loss

    weight, xtx = _random_problem(out=40, inputs=32)
    generator = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 64, (40, 4, 2), generator=generator)
    codes[:20, :, 0] = 5  # a codeword used by many groups, and many codewords by none
    codebooks = torch.nn.Parameter(torch.randn(2, 64, 8, generator=generator))
    scales = torch.nn.Parameter(torch.rand(40, generator=generator) + 0.5)
    output_loss(decode(codes, codebooks, scales) - weight, xtx).mean().backward()
    mine_books = torch.nn.Parameter(codebooks.detach().clone())
    mine_scales = torch.nn.Parameter(scales.detach().clone())
    steps = AdamSteps(weight, xtx, codes, mine_books, mine_scales, lr=0.0)  # lr 0: the step moves nothing
    steps.run(1)
    torch.testing.assert_close(mine_books.grad, codebooks.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mine_scales.grad, scales.grad, rtol=1e-4, atol=1e-5)
    assert torch.equal(mine_books, codebooks)


# -- the solver ---------------------------------------------------------------------------------
def _random_problem(out=48, inputs=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, inputs, generator=generator)
    x = torch.randn(512, inputs, generator=generator) @ torch.randn(inputs, inputs, generator=generator)
    return weight, x.t() @ x / 512


def test_weighted_search_equals_brute_force():
    """The code search's form: argmin_k norms[k] - 2 x.c_k with norms = c^T H c."""
    from qconv.formats.aqlm_solver import nearest_codewords

    _, xtx = _random_problem(inputs=8)
    generator = torch.Generator().manual_seed(1)
    vectors, codebook = torch.randn(100, 8, generator=generator), torch.randn(300, 8, generator=generator)
    norms = ((codebook @ xtx) * codebook).sum(1)
    expected = (norms[None, :] - 2 * vectors.double() @ codebook.double().t()).argmin(1)
    assert torch.equal(nearest_codewords(vectors, codebook, norms), expected)


@pytest.mark.parametrize("scheme", ["1x8", "2x8"])
def test_beam_search_never_increases_the_output_error(scheme):
    from qconv.formats.aqlm_solver import beam_search, initialise, output_loss

    weight, xtx = _random_problem(out=128, inputs=128)  # 2,048 groups: more than 2x8 can fit exactly
    r = recipe(scheme=scheme)
    state = initialise(weight, r, torch.Generator().manual_seed(0))
    before = output_loss(state.weight() - weight, xtx)
    after_state = beam_search(weight, xtx, state, r["beam_size"])
    after = output_loss(after_state.weight() - weight, xtx)
    assert (after <= before * (1 + 1e-5) + 1e-6).all()  # row by row: its old codes stay candidates
    assert after.sum() < 0.97 * before.sum()


def test_layer_optimisation_lowers_the_output_error_and_is_deterministic():
    from qconv.formats.aqlm_solver import quantize_layer

    weight, xtx = _random_problem(out=128, inputs=128)
    r = {**recipe(scheme="2x8"), "max_epochs": 3, "adam_steps": 20}
    first = quantize_layer(weight, xtx, r, torch.Generator().manual_seed(0))
    second = quantize_layer(weight, xtx, r, torch.Generator().manual_seed(0))
    assert torch.equal(first.state.codes, second.state.codes)
    assert torch.equal(first.state.codebooks, second.state.codebooks)
    assert first.epochs >= 1 and first.loss < 0.8 * first.initial_loss


# -- calibrated conversions on the CPU ------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llama_text(tmp_path_factory):
    """A tiny random Llama with a tokenizer (calibration tokenizes text), four blocks."""
    from conftest import add_tiny_tokenizer, make_tiny_llama

    return add_tiny_tokenizer(make_tiny_llama(tmp_path_factory.mktemp("src") / "tiny-text", layers=4))


CALIBRATED = ["--method", "aqlm", "--device", "cpu", "--calib-tokens", "4096", "--max-epochs", "0"]


def test_calibrated_1x16_loads_in_stock_transformers_and_records_its_calibration(
    cli, tiny_llama_text, tmp_path
):
    out = tmp_path / "out"
    _, doc = cli.json("convert", tiny_llama_text, "-o", out, *CALIBRATED)
    assert doc["verify"]["passed"], doc["verify"]
    assert doc["verify"]["logits"]["loader_rel_diff"] < 1e-5
    manifest = json.loads((out / "qconv.json").read_text())
    calibration = manifest["calibration"]
    assert calibration["text"] == "wikitext2-validation"
    assert calibration["sha256"] == "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8"
    # the tiny Llama takes 256 positions (max_position_embeddings): sequences of 256, not 2,048
    assert (calibration["sequences"], calibration["seqlen"], calibration["tokens"]) == (16, 256, 4096)
    assert set(calibration["blocks"]) == {f"model.layers.{i}" for i in range(4)}
    recipe_ = manifest["recipe"]
    assert recipe_["calibration"] == {"text": "wikitext2-validation", "tokens": 4096, "seqlen": 256}
    assert recipe_["finetune"] is True and recipe_["label"] == "aqlm 1x16+ft g8"
    assert not (tmp_path / ".out.qconv-checkpoint").exists()  # removed once the artifact is in place

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    source = load_file(str(tiny_llama_text / "model.safetensors"))
    assert torch.equal(model.lm_head.weight, source["lm_head.weight"].float())
    for block in calibration["blocks"].values():  # the kept fine-tuning epoch is never worse
        assert block["rel_error"] <= block["rel_error_before_finetune"]


def test_calibrated_2x8_fits_each_layer_to_its_inputs(cli, tiny_llama_text, tmp_path):
    out = tmp_path / "out"
    _, doc = cli.json(
        "convert",
        tiny_llama_text,
        "-o",
        out,
        "--method",
        "aqlm",
        "--scheme",
        "2x8",
        "--device",
        "cpu",
        "--calib-tokens",
        "1024",
        "--max-epochs",
        "1",
        "--skip",
        "re:model\\.layers\\.[123]\\..*",
        "--no-finetune",
    )
    assert doc["verify"]["passed"], doc["verify"]
    layers = json.loads((out / "qconv.json").read_text())["layers"]
    for name, layer in layers.items():
        assert layer["rel_output_error"] < layer["rel_output_error_init"], name


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--calibration", "nowhere.txt"], "Error: --calibration nowhere.txt: cannot read the text"),
        (["--calibration", "none", "--finetune"], "Error: --calibration none: --calib-tokens, --finetune"),
        (["--calib-tokens", "1"], "Error: --calib-tokens 1: give at least one sequence's worth"),
        (["--max-epochs", "-1"], "Error: --max-epochs -1: give 0 or more"),
    ],
)
def test_calibration_errors(cli, tiny_llama_text, tmp_path, extra, message):
    result = cli(
        "convert",
        tiny_llama_text,
        "-o",
        tmp_path / "out",
        "--method",
        "aqlm",
        "--device",
        "cpu",
        *extra,
        ok=None,
    )
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].startswith(message), result.output
    assert not (tmp_path / "out").exists()


def test_a_source_without_tokenizer_cannot_be_calibrated(cli, tiny_llama, tmp_path):
    result = cli(
        "convert", tiny_llama, "-o", tmp_path / "out", "--method", "aqlm", "--device", "cpu", ok=None
    )
    assert result.exit_code == 2
    error = result.stderr.strip()
    assert error.startswith(f"Error: {tiny_llama}: no usable tokenizer for the calibration text (")
    assert error.endswith("); --calibration none quantizes from the weights alone"), error
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.qconv-checkpoint").exists()


def test_killed_conversion_resumes_to_the_same_bytes(cli, tiny_llama_text, tmp_path):
    """kill -9 after the first block's checkpoint, --resume: the same artifact bytes as an
    uninterrupted run (CPU, same seed)."""
    from conftest import convert_killed_after_first_block

    whole = tmp_path / "whole"
    assert (
        cli("convert", tiny_llama_text, "-o", whole, *CALIBRATED, "--no-verify", "--no-record").exit_code == 0
    )

    out = tmp_path / "resumed"
    checkpoint = tmp_path / ".resumed.qconv-checkpoint"
    blocks = convert_killed_after_first_block(
        tiny_llama_text, out, [*CALIBRATED, "--no-verify", "--no-record"]
    )
    assert 1 <= blocks < 4

    refused = cli("convert", tiny_llama_text, "-o", out, *CALIBRATED, "--no-verify", "--no-record", ok=None)
    assert refused.exit_code == 2
    assert "an interrupted conversion left its checkpoint here; add --resume" in refused.output

    mismatch = cli(
        "convert", tiny_llama_text, "-o", out, *CALIBRATED[:-1], "1", "--resume", "--no-record", ok=None
    )
    assert mismatch.exit_code == 2
    assert "the checkpoint was made from another source, recipe or calibration text" in mismatch.output

    resumed = cli(
        "convert", tiny_llama_text, "-o", out, *CALIBRATED, "--resume", "--no-verify", "--no-record"
    )
    assert resumed.exit_code == 0, resumed.output
    shards = sorted(p.name for p in whole.glob("*.safetensors"))
    assert shards == sorted(p.name for p in out.glob("*.safetensors"))
    for name in shards:
        assert (whole / name).read_bytes() == (out / name).read_bytes(), name
    assert not checkpoint.exists()


def test_an_unreadable_checkpoint_is_refused_and_force_starts_over(cli, tiny_llama_text, tmp_path):
    out = tmp_path / "out"
    checkpoint = tmp_path / ".out.qconv-checkpoint"
    checkpoint.mkdir()
    (checkpoint / "state.json").write_text("{not json")
    result = cli("convert", tiny_llama_text, "-o", out, *CALIBRATED, "--resume", "--no-record", ok=None)
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == (
        f"Error: {checkpoint}: the checkpoint's state.json is unreadable; delete the folder"
    )
    assert not out.exists() and (checkpoint / "state.json").read_text() == "{not json"

    forced = cli("convert", tiny_llama_text, "-o", out, *CALIBRATED, "--force", "--no-verify", "--no-record")
    assert forced.exit_code == 0, forced.output
    assert (out / "qconv.json").is_file() and not checkpoint.exists()
