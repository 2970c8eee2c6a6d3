"""compressed-tensors: llm-compressor's round to nearest and compressed-tensors' bytes, pinned on
small fixed tensors; qconv's output compared byte for byte with what llm-compressor itself wrote
for the same model (tests/fixtures/ct_reference/, built by tests/fixtures/make_ct_reference.py
with the versions in its versions.json); the real loader (stock transformers with
compressed-tensors) against qconv's dequantized reference; the config keys vLLM reads; the CLI's
errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qconv.errors import UsageError
from qconv.formats import ct_layout, get_format
from qconv.formats.format_compressed_tensors import FORMAT_VERSION

CT = get_format("compressed-tensors")
CPU = torch.device("cpu")
REFERENCE = Path(__file__).parent / "fixtures" / "ct_reference"
PROMPT = torch.tensor([[1, 17, 42, 99, 7, 256, 3, 12, 64, 5]])
SCHEMES = ("W4A16", "W4A16_ASYM", "W8A16", "W8A8", "FP8_DYNAMIC")


def recipe(dtype: str = "bfloat16", **options):
    return {**CT.make_recipe(options), "dtype": dtype}


def signed(word: int) -> int:
    """An unsigned 32-bit pattern as the int32 torch stores."""
    return word - (1 << 32) if word >= 1 << 31 else word


# -- the numbers and the bytes, pinned ----------------------------------------------------------
def test_rtn_numbers_pinned():
    """llm-compressor's int4 range is [-8, 7] and its symmetric scale absmax / 7.5 (not / 7):
    absmax 7.5 gives scale 1; w / scale is clipped to [-8, 7] and then rounded, so 7.5 becomes 7
    while -7.5 reaches -8.
    torch.round halves to even (2.5 -> 2, -1.5 -> -2); an all-zero group gets bfloat16's eps."""
    weight = torch.tensor(
        [
            [7.5, -7.5, 3.25, 0.5, -1.5, 2.5, 0.0, 6.75],
            [0.0] * 8,
        ],
        dtype=torch.bfloat16,
    )
    q = ct_layout.quantize_rtn(weight, ct_layout.SCHEMES["W4A16"], 8)
    assert q.codes.tolist() == [[7, -8, 3, 0, -2, 2, 0, 7], [0] * 8]
    assert q.scale.dtype == torch.bfloat16 and q.scale.tolist() == [[1.0], [0.0078125]]
    assert q.zero_point is None


def test_rtn_asymmetric_numbers_pinned():
    """Asymmetric: the range [min(w, 0), max(w, 0)] over 15 steps, the zero point -8 - min / scale
    as a signed int8 (stored packed, int4)."""
    weight = torch.tensor(
        [[-1.0, 14.0, 0.0, 6.5, 2.0, 3.0, 4.0, 5.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 15.0]]
    )
    q = ct_layout.quantize_rtn(weight.to(torch.bfloat16), ct_layout.SCHEMES["W4A16_ASYM"], 8)
    # row 0: scale 15/15 = 1, zero -8 + 1 = -7; row 1: min clamps to 0, scale 1, zero -8
    assert q.scale.tolist() == [[1.0], [1.0]]
    assert q.zero_point.tolist() == [[-7], [-8]]
    # 6.5 - 7 = -0.5 rounds to -0 (half to even)
    assert q.codes.tolist() == [[-8, 7, -7, 0, -5, -4, -3, -2], [-7, -6, -5, -4, -3, -2, -1, 7]]


def test_pack_int32_bytes_pinned():
    """pack_to_int32: code + 8, element 8k + j in bits 4j..4j+3 of word k (the first element in
    the low nibble); 8 bits: code + 128, element 4k + j in byte j of word k."""
    codes = torch.tensor([[7, -8, 3, 0, -2, 2, 0, 7, 1, -1]], dtype=torch.int8)
    packed = ct_layout.pack_int32(codes, 4)
    # +8: F 0 B 8 6 A 8 F | 9 7 (zero-padded to a whole word)
    assert packed.dtype == torch.int32
    assert packed.tolist() == [[signed(0xF8A68B0F), 0x79]]
    assert torch.equal(ct_layout.unpack_int32(packed, 4, 10), codes)
    codes8 = torch.tensor([[-128, -1, 0, 127, 5]], dtype=torch.int8)
    packed8 = ct_layout.pack_int32(codes8, 8)
    assert packed8.tolist() == [[signed(0xFF807F00), 0x85]]
    assert torch.equal(ct_layout.unpack_int32(packed8, 8, 5), codes8)
    # zero points are packed along the output dimension (packed_dim 0): a column of 9 -> 2 words
    zeros = torch.arange(-4, 5, dtype=torch.int8)[:, None]
    packed_zeros = ct_layout.pack_int32(zeros, 4, packed_dim=0)
    assert packed_zeros.tolist() == [[signed(0xBA987654)], [0xC]]
    assert torch.equal(ct_layout.unpack_int32(packed_zeros, 4, 9, packed_dim=0), zeros)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("name", SCHEMES)
def test_numbers_and_bytes_match_compressed_tensors(name, dtype):
    """The installed compressed-tensors' own calculate_qparams / quantize / pack_to_int32 (the
    functions llm-compressor's RTN calls) on random groups, outliers and all-zero groups."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
    from compressed_tensors.quantization.utils import calculate_qparams

    scheme = ct_layout.SCHEMES[name]
    args = PRESET_SCHEMES[name]["weights"]
    torch.manual_seed(0)
    weight = (torch.randn(40, 256) * 0.05).to(dtype)
    weight[0, :128] = 0
    weight[1] = 0
    weight[2, 3] = 3.0
    weight[3, :128] = 0.01
    size = scheme.group_size or 256
    grid = weight.unflatten(-1, (-1, size))
    scale, zero = calculate_qparams(grid.amin(-1), grid.amax(-1), args)
    codes = quantize(weight, scale, zero, args, dtype=args.pytorch_dtype())
    ours = ct_layout.quantize_rtn(weight, scheme, scheme.group_size)
    assert ours.scale.dtype == scale.dtype and torch.equal(ours.scale, scale)
    assert ours.codes.dtype == codes.dtype
    assert torch.equal(ours.codes.view(torch.int8), codes.view(torch.int8))
    if not scheme.symmetric:
        assert torch.equal(ours.zero_point, zero)
        assert torch.equal(
            ct_layout.pack_int32(ours.zero_point, 4, packed_dim=0), pack_to_int32(zero, 4, packed_dim=0)
        )
    if scheme.format == "pack-quantized":
        assert torch.equal(ct_layout.pack_int32(ours.codes, scheme.bits), pack_to_int32(codes, scheme.bits))


@pytest.mark.parametrize("shape", [(2, 5, 256), (7, 256)])
@pytest.mark.parametrize("name", ["W8A8", "FP8_DYNAMIC"])
def test_activation_quantization_matches_compressed_tensors(name, shape):
    """What compressed-tensors' forward does to a W8A8 / FP8_DYNAMIC layer's input (dynamic
    per-token scales, fake quantization), on a 3-D input (a scale per token) and a 2-D one (its
    TOKEN strategy then reduces every dimension: one scale)."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    args = PRESET_SCHEMES[name]["input_activations"]
    torch.manual_seed(1)
    x = torch.randn(shape) * 3
    x[0, ..., :] = 0  # an all-zero token (3-D) or row (2-D)
    scale, zero = compute_dynamic_scales_and_zp(x, args, module=None)
    expected = fake_quantize(x, scale, zero, args)
    assert torch.equal(ct_layout.quantize_activations(x, ct_layout.SCHEMES[name].activations), expected)


def test_fp8_codes_clip_at_448():
    """FP8_DYNAMIC: the per-channel scale maps absmax to 448; w / scale is clipped to +-448 (as
    llm-compressor does) so a scale rounded down cannot push a code past E4M3's largest value."""
    weight = torch.tensor([[448.0 * 3, -1.0, 0.5, 3.0]], dtype=torch.bfloat16)
    q = ct_layout.quantize_rtn(weight, ct_layout.SCHEMES["FP8_DYNAMIC"], None)
    assert q.codes.dtype == torch.float8_e4m3fn
    assert q.scale.tolist() == [[3.0]]
    # -1/3 and 0.5/3 in bfloat16 (0.333984375, 0.1669921875), then to E4M3's 3 mantissa bits
    assert q.codes.float().tolist() == [[448.0, -0.34375, 0.171875, 1.0]]


# -- recipe errors ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options,message,cli_message",
    [
        (
            {"scheme": "W3A9"},
            "method compressed-tensors: scheme W3A9 is not supported; choose from W4A16, W4A16_ASYM, W8A16, "
            "W8A8, FP8_DYNAMIC",
            "--method compressed-tensors: --scheme W3A9 is not supported; choose from W4A16, W4A16_ASYM, "
            "W8A16, W8A8, FP8_DYNAMIC",
        ),
        (
            {"scheme": "FP8"},
            "method compressed-tensors: scheme FP8 needs static activation scales from calibration data; "
            "use FP8_DYNAMIC (dynamic activation scales)",
            "--method compressed-tensors: --scheme FP8 needs static activation scales from calibration "
            "data; use FP8_DYNAMIC (dynamic activation scales)",
        ),
        (
            {"solver": "gptq"},
            "method compressed-tensors: solver gptq is not supported; choose from rtn, hqq",
            "--method compressed-tensors: --solver gptq is not supported; choose from rtn, hqq",
        ),
        (
            {"solver": "hqq", "scheme": "FP8_DYNAMIC"},
            "method compressed-tensors: solver hqq does not apply to FP8_DYNAMIC: FP8 has no integer grid "
            "to search",
            "--method compressed-tensors: --solver hqq does not apply to FP8_DYNAMIC: FP8 has no integer "
            "grid to search",
        ),
        (
            {"scheme": "W8A8", "group_size": 64},
            "method compressed-tensors: group_size does not apply to W8A8 (one scale per output channel)",
            "--method compressed-tensors: --group-size does not apply to W8A8 (one scale per output channel)",
        ),
        ({"group_size": 0}, "group_size 0: give 1 or more", "--group-size 0: give 1 or more"),
        (
            {"bits": 4},
            "bits does not apply to method compressed-tensors",
            "--bits does not apply to --method compressed-tensors",
        ),
    ],
)
def test_recipe_errors(options, message, cli_message):
    with pytest.raises(UsageError) as error:
        CT.make_recipe(options)
    assert str(error.value) == message
    assert error.value.cli_message() == cli_message


def test_recipe_defaults_and_label():
    assert CT.make_recipe({}) == {
        "method": "compressed-tensors",
        "scheme": "W4A16",
        "bits": 4,
        "group_size": 128,
        "solver": "rtn",
    }
    assert CT.label(CT.make_recipe({})) == "compressed-tensors W4A16"
    assert CT.label(CT.make_recipe({"group_size": 64})) == "compressed-tensors W4A16 g64"
    assert CT.make_recipe({"scheme": "FP8_DYNAMIC"})["group_size"] is None


# -- against llm-compressor's own output --------------------------------------------------------
def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def assert_same_as_reference(ours: Path, reference: Path, **ignore_order):
    ref, got = folder_tensors(reference), folder_tensors(ours)
    assert sorted(got) == sorted(ref)
    for name, tensor in ref.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        # byte-identical: compare the raw bytes (an FP8 or bf16 NaN pattern would not compare equal)
        assert torch.equal(got[name].contiguous().view(torch.uint8), tensor.contiguous().view(torch.uint8)), (
            name
        )
    expected = json.loads((reference / "config.json").read_text())["quantization_config"]
    config = json.loads((ours / "config.json").read_text())["quantization_config"]
    assert expected.pop("version") == "0.19.0" and config.pop("version") == FORMAT_VERSION
    assert config == expected


@pytest.mark.parametrize("scheme", SCHEMES)
def test_output_is_llm_compressors(cli, tmp_path, scheme):
    out = tmp_path / scheme
    source = REFERENCE / "source"
    cli(
        "convert",
        source,
        "-o",
        out,
        "--method",
        "compressed-tensors",
        "--scheme",
        scheme,
        "--device",
        "cpu",
        "--no-verify",
    )
    assert_same_as_reference(out, REFERENCE / scheme)


def test_skip_is_written_as_llm_compressor_writes_ignore(cli, tmp_path):
    """llm-compressor's ``ignore=["lm_head", "re:.*down_proj$"]`` and qconv's ``--skip down_proj``
    write the same folder: the ignore list names the modules, not the pattern."""
    out = tmp_path / "skip"
    source = REFERENCE / "source"
    cli(
        "convert",
        source,
        "-o",
        out,
        "--method",
        "compressed-tensors",
        "--skip",
        "down_proj",
        "--device",
        "cpu",
        "--no-verify",
    )
    assert_same_as_reference(out, REFERENCE / "W4A16-skip")
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    assert ignore == ["model.layers.0.mlp.down_proj", "lm_head"]  # the model's order, as llm-compressor


def test_config_has_what_vllm_reads(tmp_path, cli):
    """vLLM's CompressedTensorsConfig.from_config (vllm/model_executor/layers/quantization/
    compressed_tensors/compressed_tensors.py) reads ``ignore``, ``format``, ``sparsity_config``,
    ``kv_cache_scheme`` and per config group ``targets``, ``weights`` and ``input_activations``,
    each validated as compressed-tensors' QuantizationArgs."""
    out = tmp_path / "w8a8"
    source = REFERENCE / "source"
    cli(
        "convert",
        source,
        "-o",
        out,
        "--method",
        "compressed-tensors",
        "--scheme",
        "W8A8",
        "--device",
        "cpu",
        "--no-verify",
    )
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    assert config["format"] == "int-quantized"
    assert config["ignore"] == ["lm_head"]
    assert not config["sparsity_config"] and config["kv_cache_scheme"] is None
    (group,) = config["config_groups"].values()
    assert group["targets"] == ["Linear"]
    assert {k: group["weights"][k] for k in ("num_bits", "type", "strategy", "symmetric", "dynamic")} == {
        "num_bits": 8,
        "type": "int",
        "strategy": "channel",
        "symmetric": True,
        "dynamic": False,
    }
    assert {k: group["input_activations"][k] for k in ("num_bits", "type", "strategy", "dynamic")} == {
        "num_bits": 8,
        "type": "int",
        "strategy": "token",
        "dynamic": True,
    }
    compressed_tensors = pytest.importorskip("compressed_tensors")
    parsed = compressed_tensors.QuantizationConfig.model_validate(config)
    assert parsed.format == "int-quantized" and parsed.ignore == ["lm_head"]


# -- the CLI, verify and the real loader --------------------------------------------------------
def reference_model(source: Path, artifact: Path):
    """The source in float32 with each quantized weight replaced by qconv's dequantized bytes."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
    manifest = json.loads((artifact / "qconv.json").read_text())
    tensors = folder_tensors(artifact)
    modules = dict(model.named_modules())
    quantize_input = CT.input_quantizer(manifest["recipe"])
    for name in manifest["layers"]:
        layer = {k.removeprefix(name + "."): v for k, v in tensors.items() if k.startswith(name + ".")}
        modules[name].weight.data = CT.dequantize(layer, manifest["recipe"])
        if quantize_input is not None:  # W8A8, FP8_DYNAMIC: the runtime quantizes each input
            modules[name].register_forward_pre_hook(lambda _m, args: (quantize_input(args[0]),))
    return model.eval(), manifest


@pytest.mark.parametrize("scheme", SCHEMES)
def test_convert_verify_and_stock_transformers(cli, tiny_llama, tmp_path, scheme):
    pytest.importorskip("compressed_tensors")
    out = tmp_path / scheme
    _, doc = cli.json(
        "convert",
        tiny_llama,
        "-o",
        out,
        "--method",
        "compressed-tensors",
        "--scheme",
        scheme,
        "--device",
        "cpu",
    )
    assert doc["verify"]["passed"], doc["verify"]
    assert doc["summary"]["quantized_layers"] == 14
    tolerance = CT.loader_tolerance(doc["recipe"])
    assert doc["verify"]["logits"]["loader_rel_diff"] < tolerance
    reference, manifest = reference_model(tiny_llama, out)
    assert manifest["skipped"] == {"lm_head": "output embeddings stay unquantized"}
    model = CT.load_pretrained(out, CPU, torch.float32)
    with torch.no_grad():
        ours = model(PROMPT).logits
        expected = reference(PROMPT).logits
    assert ((ours - expected).norm() / expected.norm()).item() < tolerance
    _, report = cli.json("verify", out, "--device", "cpu")
    assert report["passed"], report


def test_weight_only_loads_compressed_and_matches_exactly(cli, tiny_llama, tmp_path):
    """W4A16 through stock ``from_pretrained`` with no options: compressed modules, and logits
    equal to qconv's dequantized reference (both decompress the same bytes exactly in float32)."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    out = tmp_path / "w4a16"
    cli("convert", tiny_llama, "-o", out, "--method", "compressed-tensors", "--device", "cpu", "--no-verify")
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert "weight_packed" in model.model.layers[0].self_attn.q_proj.state_dict()
    reference, _ = reference_model(tiny_llama, out)
    with torch.no_grad():
        diff = (model(PROMPT).logits - reference(PROMPT).logits).norm() / reference(PROMPT).logits.norm()
    assert diff.item() < 1e-5


def test_group_size_option(cli, tiny_llama, tmp_path):
    out = tmp_path / "g64"
    _, doc = cli.json(
        "convert",
        tiny_llama,
        "-o",
        out,
        "--method",
        "compressed-tensors",
        "--group-size",
        "64",
        "--device",
        "cpu",
    )
    assert doc["verify"]["passed"], doc["verify"]
    assert doc["recipe"]["label"] == "compressed-tensors W4A16 g64"
    tensors = folder_tensors(out)
    assert tensors["model.layers.0.mlp.down_proj.weight_scale"].shape == (128, 4)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["config_groups"]["group_0"]["weights"]["group_size"] == 64


def test_group_size_not_dividing_leaves_the_layer_unquantized(cli, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=320,
        hidden_size=128,
        intermediate_size=192,  # down_proj [128, 192]: 192 inputs are not groups of 128
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    source = tmp_path / "src"
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(source)
    out = tmp_path / "ct"
    _, doc = cli.json("convert", source, "-o", out, "--method", "compressed-tensors", "--device", "cpu")
    assert doc["verify"]["passed"], doc["verify"]
    manifest = json.loads((out / "qconv.json").read_text())
    assert manifest["skipped"]["model.layers.0.mlp.down_proj"] == (
        "in_features 192 is not a multiple of the group size 128"
    )
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    assert ignore == ["model.layers.0.mlp.down_proj", "lm_head"]
    assert "model.layers.0.mlp.down_proj.weight" in folder_tensors(out)


def run_error(cli, *args) -> str:
    result = cli(*args, ok=None)
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr.strip()


def nothing_written(parent, out, cli):
    assert not out.exists()
    assert not [p.name for p in parent.iterdir() if ".qconv-tmp" in p.name]
    _, rows = cli.json("ls")
    assert rows == []


@pytest.mark.parametrize(
    "flags,message",
    [
        (
            ["--scheme", "W4A8"],
            "Error: --method compressed-tensors: --scheme W4A8 is not supported; choose from W4A16, "
            "W4A16_ASYM, W8A16, W8A8, FP8_DYNAMIC",
        ),
        (
            ["--scheme", "FP8"],
            "Error: --method compressed-tensors: --scheme FP8 needs static activation scales from "
            "calibration data; use FP8_DYNAMIC (dynamic activation scales)",
        ),
        (
            ["--solver", "gptq"],
            "Error: --method compressed-tensors: --solver gptq is not supported; choose from rtn, hqq",
        ),
        (
            ["--scheme", "FP8_DYNAMIC", "--group-size", "32"],
            "Error: --method compressed-tensors: --group-size does not apply to FP8_DYNAMIC (one scale per "
            "output channel)",
        ),
    ],
)
def test_cli_option_errors(cli, tiny_llama, tmp_path, flags, message):
    out = tmp_path / "out"
    assert (
        run_error(cli, "convert", tiny_llama, "-o", out, "--method", "compressed-tensors", *flags) == message
    )
    nothing_written(tmp_path, out, cli)


def test_nan_in_a_weight_is_refused(cli, tiny_llama, tmp_path):
    source = tmp_path / "src"
    shutil.copytree(tiny_llama, source)
    tensors = load_file(str(source / "model.safetensors"))
    tensors["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(tensors, str(source / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    message = run_error(
        cli, "convert", source, "-o", out, "--method", "compressed-tensors", "--device", "cpu"
    )
    assert message == "Error: model.layers.0.mlp.up_proj.weight: the weight has NaN or infinite values"
    nothing_written(tmp_path, out, cli)


def test_aqlm_and_hqq_still_check_their_own_choices():
    """--scheme and --solver are shared with aqlm and hqq (one CLI option per name), so their
    choices are checked by each method's recipe, with the same message as before."""
    with pytest.raises(UsageError) as error:
        get_format("aqlm").make_recipe({"scheme": "W4A16"})
    assert str(error.value) == "method aqlm: scheme W4A16 is not supported; choose from 1x16, 2x8, 1x8"
    with pytest.raises(UsageError) as error:
        get_format("hqq").make_recipe({"solver": "rtn"})
    assert str(error.value) == "method hqq: solver rtn is not supported; choose from qconv, hqq"


def test_model_card_says_how_to_serve():
    """From the declarations (stock_loader, libraries, serving_engines): transformers, vLLM, SGLang."""
    from qconv.model_card import _loading

    text = "\n".join(_loading("compressed-tensors", "me/model-W4A16"))
    assert "Stock transformers loads it (install `compressed-tensors`):" in text
    assert "Serve with vLLM:\n\n```bash\nvllm serve me/model-W4A16\n```" in text
    assert "python -m sglang.launch_server --model-path me/model-W4A16" in text
    assert "vllm" not in "\n".join(_loading("bnb", "me/model"))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_dequantize_matches_compressed_tensors_on_llm_compressors_bytes(scheme):
    """qconv's dequantize reads llm-compressor's own folders as compressed-tensors' decompressor
    does: its float32 values, rounded once to the scale's dtype, are compressed-tensors' bf16
    weights exactly (a code minus a zero point is exact in bf16, the product is rounded once)."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    folder = REFERENCE / scheme
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    group = config["config_groups"]["group_0"]
    ct_scheme = QuantizationScheme.model_validate(
        {k: group[k] for k in ("targets", "weights", "input_activations")}
    )
    compressor = BaseCompressor.get_value_from_registry(config["format"])
    tensors = folder_tensors(folder)
    recipe = {"scheme": scheme, "dtype": "bfloat16"}
    layers = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".weight_scale")})
    assert len(layers) == 7
    for name in layers:
        layer = {k.removeprefix(name + "."): v for k, v in tensors.items() if k.startswith(name + ".")}
        expected = compressor.decompress(dict(layer), ct_scheme)["weight"]
        assert expected.dtype == torch.bfloat16
        assert torch.equal(CT.dequantize(layer, recipe).to(torch.bfloat16), expected), name


def test_load_model_reads_llm_compressors_folder():
    """A folder llm-compressor made (config.json only, no qconv.json), through qconv.load_model:
    the format is found by quant_method, and W4A16_ASYM takes the dequantize=True path."""
    pytest.importorskip("compressed_tensors")
    import qconv

    model = qconv.load_model(REFERENCE / "W4A16_ASYM", device="cpu", dtype=torch.float32)
    tensors = folder_tensors(REFERENCE / "W4A16_ASYM")
    name = "model.layers.0.self_attn.q_proj"
    layer = {k.removeprefix(name + "."): v for k, v in tensors.items() if k.startswith(name + ".")}
    expected = CT.dequantize(layer, {"scheme": "W4A16_ASYM"}).to(torch.bfloat16).float()
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, expected)


def test_shared_options_show_every_methods_help(cli):
    """--scheme, --group-size and --solver serve several methods: the help names each one's."""
    text = " ".join(cli("convert", "--help").stdout.split())
    assert "aqlm: codebooks x bits each (default 1x16); compressed-tensors: llm-compressor's scheme" in text
    assert (
        "compressed-tensors: 'rtn' (llm-compressor's round to nearest) or 'hqq' (a search of the same grid "
        "for the lowest x^2-weighted error per group, refitted with HQQ's step; each layer's error never "
        "above rtn's); gguf: 'qconv'"
    ) in text
    assert "; hqq: 'qconv' (default" in text
    assert "--bits INTEGER bits a weight: 4 or 8 (bnb), or the method's own widths --quant-type" in text
