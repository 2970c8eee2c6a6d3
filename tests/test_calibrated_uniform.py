"""Calibrated uniform quantization (issue 17): GPTQ for hqq and compressed-tensors.

The solver (formats/gptq.py) on fixed problems; calibrated conversions of a tiny random Llama
through the CLI, loaded by the real loaders (hqq's HQQLinear and qconv.load_model; stock
transformers + compressed-tensors); kill -9 and --resume; the bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import convert_killed_after_first_block
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
from safetensors.torch import load_file

from qconv.errors import UsageError
from qconv.formats import get_format, gptq
from qconv.formats.gptq import Grid, dequantize, output_error, quantize_gptq
from qconv.formats.hqq_layout import parse_layer
from qconv.formats.uniform import UniformSpec, solve_rtn

HQQ = get_format("hqq")
CT = get_format("compressed-tensors")
WIKITEXT_SHA256 = "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8"


def _problem(out=96, inputs=256, seed=0):
    """A weight with a few outliers and inputs with correlated, unevenly scaled features."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, inputs, generator=generator) * 0.02
    weight.view(-1)[::97] *= 8
    mix = torch.randn(inputs, inputs, generator=generator) * 0.1 + torch.eye(inputs)
    x = torch.randn(2048, inputs, generator=generator) @ mix
    x[:, :8] *= 10  # a few loud input features, as LLM activations have
    return weight, x.t() @ x / x.shape[0]


# -- the solver ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_the_data_free_solvers_on_the_output_error(bits):
    weight, xtx = _problem()
    grid = Grid(0, 2**bits - 1, False, "float", torch.float16)
    result = quantize_gptq(weight, xtx, 64, grid)
    calibrated = output_error(weight, dequantize(result, 64), xtx)
    recipe = {**HQQ.make_recipe({"bits": bits}), "dtype": "float32"}
    hqq = output_error(weight, HQQ.dequantize(HQQ.quantize(weight, recipe, torch.device("cpu")), recipe), xtx)
    rtn = output_error(weight, solve_rtn(weight, UniformSpec(bits, 64)).dequantize(), xtx)
    assert calibrated < 0.6 * min(hqq, rtn), (calibrated, hqq, rtn)


def test_gptq_numbers_are_what_the_grid_stores():
    weight, xtx = _problem(out=32, inputs=128)
    grid = Grid(-8, 7, True, "int", torch.bfloat16, 7.5, holds_zero=True)
    result = quantize_gptq(weight, xtx, 64, grid)
    assert result.codes.min() >= -8 and result.codes.max() <= 7
    assert torch.equal(result.scale, result.scale.to(torch.bfloat16).float())
    assert torch.equal(result.zero, torch.zeros_like(result.zero))
    asym = Grid(-8, 7, False, "int", torch.bfloat16, holds_zero=True)
    result = quantize_gptq(weight, xtx, 64, asym)
    assert torch.equal(result.zero, result.zero.round()) and result.zero.abs().max() <= 8


def test_gptq_is_deterministic_and_refuses_groups_across_rows():
    weight, xtx = _problem(out=16, inputs=128)
    grid = Grid(0, 7, False, "float", torch.float16)
    first, second = quantize_gptq(weight, xtx, 32, grid), quantize_gptq(weight, xtx, 32, grid)
    assert torch.equal(first.codes, second.codes) and torch.equal(first.scale, second.scale)
    with pytest.raises(ValueError, match="128 inputs do not split into groups of 48"):
        quantize_gptq(weight, xtx, 48, grid)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize(
    "grid",
    [
        Grid(0, 15, False, "float", torch.float16),
        Grid(-8, 7, True, "int", torch.bfloat16, 7.5, holds_zero=True),
    ],
)
def test_the_graphed_block_walk_gives_the_eager_walks_numbers(grid, monkeypatch):
    weight, xtx = _problem(out=320, inputs=576)  # 4 whole blocks of 128 and a partial one
    weight, xtx = weight.cuda(), xtx.cuda()
    graphed = quantize_gptq(weight, xtx, 64, grid)
    monkeypatch.setattr(gptq, "CUDA_GRAPHS", False)
    eager = quantize_gptq(weight, xtx, 64, grid)
    for name in ("codes", "scale", "zero"):
        assert torch.equal(getattr(graphed, name), getattr(eager, name)), name


# -- conversions --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llama_text(tmp_path_factory):
    """A tiny random Llama with a tokenizer (calibration tokenizes text), three blocks."""
    from conftest import add_tiny_tokenizer, make_tiny_llama

    return add_tiny_tokenizer(make_tiny_llama(tmp_path_factory.mktemp("src") / "tiny-text", layers=3))


CALIBRATED = ["--device", "cpu", "--calibration", "wikitext2", "--calib-tokens", "1024"]
HQQ_ARGS = ["--method", "hqq", "--bits", "3", "--group-size", "64"]


def _check_layers(source, out, fmt, count: int) -> None:
    """Every block Linear was calibrated; and on the first block (whose inputs quantization does
    not change) each stored layer's output error under the calibration inputs' token-weighted H
    (formats/token_weights.py), recomputed here, is the manifest's and below the format's data-free quantizer's on the same weight."""
    from torch import nn

    from qconv.calibration import BlockRunner, load_calibration
    from qconv.formats.token_weights import collect_statistics
    from qconv.sources import open_source

    manifest = json.loads((out / "qconv.json").read_text())
    recipe = manifest["recipe"]
    calibrated = {name: e for name, e in manifest["layers"].items() if "rel_output_error" in e}
    assert len(calibrated) == count
    stored = load_file(str(out / "model.safetensors"))
    prefix = "model.layers.0."
    with open_source(str(source)) as src:
        calib = load_calibration(src, "wikitext2", 1024, 256)
        runner = BlockRunner(src, torch.device("cpu"))
        hidden, kwargs = runner.first_inputs(calib.ids)
        block = runner.load_block(0)
        names = [prefix + n for n, m in block.named_modules() if isinstance(m, nn.Linear)]
        statistics = collect_statistics(block, prefix, names, hidden, kwargs[0], torch.empty_like(hidden))
        assert statistics.attention_seen  # the attention's Linears took the token weights
        for name in names:
            weight, xtx = block.get_submodule(name[len(prefix) :]).weight.detach(), statistics.pop(name)
            tensors = {k[len(name) + 1 :]: v for k, v in stored.items() if k.startswith(name + ".")}
            error = output_error(weight, fmt.dequantize(tensors, recipe), xtx)
            assert error == pytest.approx(calibrated[name]["rel_output_error"], rel=1e-4), name
            data_free = fmt.quantize(weight.to(torch.bfloat16), recipe, torch.device("cpu"))
            assert error < 0.8 * output_error(weight, fmt.dequantize(data_free, recipe), xtx), name


def test_calibrated_hqq_loads_in_hqq_and_qconv_and_records_its_calibration(cli, tiny_llama_text, tmp_path):
    out = tmp_path / "out"
    _, doc = cli.json("convert", tiny_llama_text, "-o", out, *HQQ_ARGS, *CALIBRATED)
    assert doc["verify"]["passed"], doc["verify"]
    assert doc["verify"]["logits"]["loader_rel_diff"] < 1e-3  # qconv.load_model vs the reference
    manifest = json.loads((out / "qconv.json").read_text())
    calibration = manifest["calibration"]
    assert calibration["text"] == "wikitext2-validation" and calibration["sha256"] == WIKITEXT_SHA256
    assert (calibration["solver"], calibration["sequences"], calibration["tokens"]) == ("gptq", 4, 1024)
    assert set(calibration["blocks"]) == {f"model.layers.{i}" for i in range(3)}
    assert {block["token_weights"] for block in calibration["blocks"].values()} == {"attention"}
    recipe = manifest["recipe"]
    assert recipe["label"] == "hqq 3-bit g64 gptq" and recipe["solver"] == "gptq"
    assert recipe["gptq"]["token_weights"].startswith("1 + attention received")
    assert recipe["calibration"] == {"text": "wikitext2-validation", "tokens": 1024, "seqlen": 256}
    _check_layers(tiny_llama_text, out, HQQ, 21)
    assert not (tmp_path / ".out.qconv-checkpoint").exists()

    # hqq's own HQQLinear reads every calibrated layer to the same weights as qconv's reference
    tensors = load_file(str(out / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj"
    layer_tensors = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}
    layer = HQQLinear(
        None,
        BaseQuantizeConfig(nbits=3, group_size=64, axis=1),
        compute_dtype=torch.float32,
        device="cpu",
        initialize=False,
    )
    layer.load_state_dict({k: v.clone() for k, v in layer_tensors.items()})
    ours = parse_layer(layer_tensors).dequantize()
    assert torch.equal(layer.dequantize().reshape(ours.shape), ours)

    shown = cli("show", out).stdout
    assert "gptq" in shown and WIKITEXT_SHA256 in shown


@pytest.mark.parametrize("scheme", ["W4A16", "W4A16_ASYM"])
def test_calibrated_compressed_tensors_loads_in_stock_transformers(cli, tiny_llama_text, tmp_path, scheme):
    out = tmp_path / "out"
    args = ["--method", "compressed-tensors", "--scheme", scheme, "--group-size", "64"]
    _, doc = cli.json("convert", tiny_llama_text, "-o", out, *args, *CALIBRATED)
    assert doc["verify"]["passed"], doc["verify"]
    recipe = json.loads((out / "qconv.json").read_text())["recipe"]
    assert doc["verify"]["logits"]["loader_rel_diff"] < CT.loader_tolerance(recipe)
    assert recipe["label"] == f"compressed-tensors {scheme} g64 gptq"
    _check_layers(tiny_llama_text, out, CT, 21)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["config_groups"]["group_0"]["weights"]["group_size"] == 64


def test_killed_calibration_resumes_to_the_same_bytes(cli, tiny_llama_text, tmp_path):
    """kill -9 after the first block's checkpoint, --resume: the same artifact bytes as an
    uninterrupted run (CPU)."""
    whole = tmp_path / "whole"
    args = [*HQQ_ARGS, *CALIBRATED, "--no-verify", "--no-record"]
    assert cli("convert", tiny_llama_text, "-o", whole, *args).exit_code == 0

    out = tmp_path / "resumed"
    checkpoint = tmp_path / ".resumed.qconv-checkpoint"
    assert 1 <= convert_killed_after_first_block(tiny_llama_text, out, args) < 3

    other = [a if a != "3" else "4" for a in args]  # another recipe: refused
    mismatch = cli("convert", tiny_llama_text, "-o", out, *other, "--resume", ok=None)
    assert mismatch.exit_code == 2
    assert "the checkpoint was made from another source, recipe or calibration text" in mismatch.output

    resumed = cli("convert", tiny_llama_text, "-o", out, *args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    shards = sorted(p.name for p in whole.glob("*.safetensors"))
    assert shards == sorted(p.name for p in out.glob("*.safetensors"))
    for name in shards:
        assert (whole / name).read_bytes() == (out / name).read_bytes(), name
    assert not checkpoint.exists()


# -- bad input ----------------------------------------------------------------------------------
def test_a_source_without_tokenizer_cannot_be_calibrated(cli, tiny_llama, tmp_path):
    result = cli("convert", tiny_llama, "-o", tmp_path / "out", *HQQ_ARGS, *CALIBRATED, ok=None)
    assert result.exit_code == 2
    error = result.stderr.strip()
    assert error.startswith(f"Error: {tiny_llama}: no usable tokenizer for the calibration text (")
    assert error.endswith("); --calibration none quantizes from the weights alone"), error
    assert len(error.splitlines()) == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.qconv-checkpoint").exists()


@pytest.mark.parametrize(
    "content,message",
    [
        (
            b"A short text .",
            "Error: --calibration {path}: {count} tokens, fewer than one sequence of 256",
        ),
        (
            b"\xff\xfe not UTF-8",
            "Error: --calibration {path}: cannot read the text ('utf-8' codec can't decode byte 0xff in "
            "position 0: invalid start byte)",
        ),
    ],
    ids=["short", "not-utf8"],
)
@pytest.mark.parametrize("method", [HQQ_ARGS, ["--method", "compressed-tensors", "--group-size", "64"]])
def test_bad_calibration_text(cli, tiny_llama_text, tmp_path, content, message, method):
    from transformers import AutoTokenizer

    path = tmp_path / "calib.txt"
    path.write_bytes(content)
    args = [*method, "--device", "cpu", "--calibration", path, "--calib-tokens", "1024"]
    result = cli("convert", tiny_llama_text, "-o", tmp_path / "out", *args, ok=None)
    assert result.exit_code == 2
    count = len(
        AutoTokenizer.from_pretrained(str(tiny_llama_text))(content.decode(errors="replace"))["input_ids"]
    )
    assert result.stderr.strip() == message.format(path=path, count=count)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.qconv-checkpoint").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--method", "hqq", "--calib-tokens", "1024"],
            "Error: --calib-tokens needs calibration data: add --calibration FILE or wikitext2",
        ),
        (
            ["--method", "hqq", "--calibration", "wikitext2", "--axis", "0"],
            "Error: --method hqq: --axis 0 cannot be calibrated (GPTQ needs groups along the inputs, axis 1)",
        ),
        (
            ["--method", "hqq", "--calibration", "wikitext2", "--solver", "hqq"],
            "Error: --method hqq: --solver hqq is data-free; with --calibration the solver is GPTQ",
        ),
        (
            ["--method", "compressed-tensors", "--calibration", "wikitext2", "--solver", "hqq"],
            "Error: --method compressed-tensors: --solver hqq is data-free; with --calibration the solver is GPTQ",
        ),
        (
            ["--method", "compressed-tensors", "--scheme", "FP8_DYNAMIC", "--calibration", "wikitext2"],
            "Error: --method compressed-tensors: --calibration does not apply to FP8_DYNAMIC: its weights are "
            "cast to FP8, no grid to fit",
        ),
        (
            ["--method", "hqq", "--calibration", "wikitext2", "--calib-tokens", "1"],
            "Error: --calib-tokens 1: give at least one sequence's worth",
        ),
    ],
)
def test_calibration_option_errors(cli, tiny_llama_text, tmp_path, args, message):
    result = cli("convert", tiny_llama_text, "-o", tmp_path / "out", *args, ok=None)
    assert result.exit_code == 2
    assert result.stderr.strip() == message
    assert not (tmp_path / "out").exists()


def test_data_free_recipes_are_unchanged():
    assert "calibration" not in HQQ.make_recipe({}) and "calibration" not in CT.make_recipe({})
    assert HQQ.make_recipe({"calibration": "none"}) == HQQ.make_recipe({})
    with pytest.raises(UsageError, match="calib_tokens needs calibration data"):
        CT.make_recipe({"calibration": "none", "calib_tokens": 2048})
    aqlm = get_format("aqlm").make_recipe({"calibration": "wikitext2"})
    assert aqlm["calibration"]["text"] == "wikitext2-validation"


def test_hqq_groups_spanning_rows_fall_back_to_the_data_free_solver(cli, tiny_llama_text, tmp_path):
    """Groups of 256 over 128 inputs span two output rows: GPTQ's column walk cannot follow
    them, so those layers are quantized from their weights alone; down_proj (256 inputs) is
    calibrated."""
    out = tmp_path / "out"
    args = ["--method", "hqq", "--bits", "4", "--group-size", "256", *CALIBRATED]
    _, doc = cli.json("convert", tiny_llama_text, "-o", out, *args)
    assert doc["verify"]["passed"], doc["verify"]
    layers = json.loads((out / "qconv.json").read_text())["layers"]
    calibrated = sorted(name for name, entry in layers.items() if "rel_output_error" in entry)
    assert calibrated == [f"model.layers.{i}.mlp.down_proj" for i in range(3)]
    assert len(layers) == 21
