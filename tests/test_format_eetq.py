"""EETQ: quantization and both layouts pinned byte for byte against the upstream algorithm
(NetEase-FuXi/EETQ csrc/cutlass_kernels/cutlass_preprocessors.cc), transformers' keys and
config, the CLI, ``qconv.load_model`` against the dequantized reference, and the real SmolLM2.

The eetq package cannot be installed here (FORMATS.md), so no test runs upstream's code: the
expected bytes below were worked out by hand from its loops, and a loop-by-loop transcription
of those loops (``upstream_preprocess``) checks the vectorised layout on random matrices.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import qconv
from qconv.errors import ArtifactError, UsageError
from qconv.formats import eetq_layout, get_format
from qconv.formats.format_eetq import EETQLinear
from qconv.plan import Plan

EETQ = get_format("eetq")
CPU = torch.device("cpu")
PROMPT = torch.tensor([[1, 17, 42, 99, 7, 256, 3, 12, 64, 5]])


def recipe(**options):
    return {**EETQ.make_recipe(options), "dtype": "bfloat16"}


# -- quantization -------------------------------------------------------------------------------
def test_quantization_bytes_pinned():
    weight = torch.tensor(
        [
            # max 1: scale 1/128; +max rounds to 128 and is clamped to 127
            [1.0, -0.5, 0.25, 0.0],
            # max 2: scale 1/64; 2.5 -> 3 and 0.5 -> 1 (C's round: halves away from zero)
            [-2.0, 0.0390625, -0.0234375, 0.0078125],
            # all zero: upstream computes round(0/0) = NaN, and std::min(127.f, NaN) gives 127
            [0.0, 0.0, 0.0, 0.0],
            # fp16(0.3) = 2457/8192, fp16(0.1) = 819/8192: 128 * 819/2457 = 42.67 -> 43
            [0.2999267578125, 0.0999755859375, -0.2999267578125, 0.0],
        ],
        dtype=torch.float16,
    )
    q, scales = eetq_layout.quantize(weight)
    assert q.dtype == torch.int8 and scales.dtype == torch.float16
    assert q.tolist() == [[127, -64, 32, 0], [-128, 3, -2, 1], [127, 127, 127, 127], [127, 43, -128, 0]]
    # 2457/2^20 is 1228.5 steps of fp16's 2^-19 there: the tie rounds to even, 1228 * 2^-19
    assert scales.tolist() == [0.0078125, 0.015625, 0.0, 0.00234222412109375]
    assert eetq_layout.dequantize(q, scales)[2].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_c_round_differs_from_torch_round_only_on_halves():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997, 2.4, -3.6, 127.5])
    assert eetq_layout.c_round(x).tolist() == [1.0, 2.0, 3.0, -1.0, -3.0, 0.0, 2.0, -4.0, 128.0]


# -- layouts ------------------------------------------------------------------------------------
def position_matrix(rows: int, cols: int) -> torch.Tensor:
    """q[k, n] = k + 2n - 128: the stored byte (q + 128) tells which element landed there."""
    k = torch.arange(rows)[:, None]
    n = torch.arange(cols)[None, :]
    return (k + 2 * n - 128).to(torch.int8)


# Worked out by hand for sm80, one 64-row tile of one column (q + 128 = k): stored byte o of
# the tile holds row PERM[r] where r is o with bytes 1 and 2 of its 4-byte group swapped (step
# 4), and PERM (step 1) is 0 1 8 9 2 3 10 11 4 5 12 13 6 7 14 15 within every 16 rows.
SM80_TILE = [
    0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15,
    16, 24, 17, 25, 18, 26, 19, 27, 20, 28, 21, 29, 22, 30, 23, 31,
    32, 40, 33, 41, 34, 42, 35, 43, 36, 44, 37, 45, 38, 46, 39, 47,
    48, 56, 49, 57, 50, 58, 51, 59, 52, 60, 53, 61, 54, 62, 55, 63,
]  # fmt: skip


def test_sm80_layout_bytes_pinned():
    q = position_matrix(128, 64)  # in 128 (two 64-row tiles), out 64
    stored = eetq_layout.preprocess(q, "sm80")
    assert stored.dtype == torch.int8 and stored.shape == (128, 64)
    data = stored.view(torch.uint8).reshape(-1).tolist()
    # Memory order: column pairs (n, n+1); within a pair, tile 0 of n, tile 0 of n+1, tile 1 of
    # n, tile 1 of n+1 (step 3), each tile as SM80_TILE. Pair 0 is the first 256 bytes.
    assert data[:256] == (
        SM80_TILE + [b + 2 for b in SM80_TILE] + [b + 64 for b in SM80_TILE] + [b + 66 for b in SM80_TILE]
    )
    # Pair 5 (columns 10 and 11): +20 and +22 on every byte.
    assert data[5 * 256 : 5 * 256 + 8] == [20, 28, 21, 29, 22, 30, 23, 31]
    assert data[5 * 256 + 64 : 5 * 256 + 72] == [22, 30, 23, 31, 24, 32, 25, 33]
    # The last byte: column 63, row 127 (-> 127 + 126).
    assert data[-4:] == [118 + 126, 126 + 126, 119 + 126, 127 + 126]


def test_sm70_layout_bytes_pinned():
    q = position_matrix(64, 64)
    stored = eetq_layout.preprocess(q, "sm70")
    data = stored.view(torch.uint8).reshape(64, 64)
    # Row-major [in, out] kept; only +128 and bytes 1 and 2 of each 4 swapped: row k holds
    # k + 2n for n = 0 2 1 3 4 6 5 7 ...
    assert data[0, :16].tolist() == [0, 4, 2, 6, 8, 12, 10, 14, 16, 20, 18, 22, 24, 28, 26, 30]
    assert data[5, :8].tolist() == [5, 9, 7, 11, 13, 17, 15, 19]
    assert data[63, -4:].tolist() == [63 + 120, 63 + 124, 63 + 122, 63 + 126]


def test_bias_maps_int8_extremes_to_unsigned():
    q = torch.zeros(64, 64, dtype=torch.int8)
    q[0, 0], q[0, 3] = -128, 127
    data = eetq_layout.preprocess(q, "sm70").view(torch.uint8)
    assert data[0, :4].tolist() == [0, 128, 128, 255]


def upstream_preprocess(q: torch.Tensor, arch: str) -> list[int]:
    """A loop-by-loop transcription of upstream's preprocess_weights_for_mixed_gemm for int8,
    on 32-bit words as upstream indexes them (slow; small matrices only)."""
    rows, cols = q.shape
    buf = [int(b) for b in q.view(torch.uint8).reshape(-1).tolist()]

    def words(data):
        return [data[i : i + 4] for i in range(0, len(data), 4)]

    def flat(ws):
        return [b for w in ws for b in w]

    if arch == "sm80":
        # permute_B_rows_for_mixed_gemm
        vec_cols = cols // 4
        src, dst = words(buf), [None] * (rows * vec_cols)
        for base in range(0, rows, 16):
            for tile_row in range(16):
                read_row = base + 8 * ((tile_row % 4) // 2) + tile_row % 2 + 2 * (tile_row // 4)
                for col in range(vec_cols):
                    dst[(base + tile_row) * vec_cols + col] = src[read_row * vec_cols + col]
        buf = flat(dst)
        # subbyte_transpose (int8: a plain transpose)
        buf = [buf[r * cols + c] for c in range(cols) for r in range(rows)]
        # interleave_column_major_tensor, ColumnMajorTileInterleave<64, 2>
        vec_rows, per_tile, interleave = rows // 4, 16, 2
        src, dst = words(buf), [None] * (rows * cols // 4)
        for read_col in range(cols):
            write_col = read_col // interleave
            for base in range(0, vec_rows, per_tile):
                for vec_read_row in range(base, min(vec_rows, base + per_tile)):
                    vec_write_row = (
                        interleave * base + per_tile * (read_col % interleave) + vec_read_row % per_tile
                    )
                    dst[write_col * vec_rows * interleave + vec_write_row] = src[
                        read_col * vec_rows + vec_read_row
                    ]
        buf = flat(dst)
    # add_bias_and_interleave_int8s_inplace
    buf = [(b + 128) % 256 for b in buf]
    for base in range(0, len(buf), 4):
        buf[base + 1], buf[base + 2] = buf[base + 2], buf[base + 1]
    return buf


@pytest.mark.parametrize("arch", eetq_layout.ARCHS)
@pytest.mark.parametrize("shape", [(64, 64), (128, 192), (192, 128)])
def test_layout_equals_upstream_loops_and_inverts(arch, shape):
    torch.manual_seed(sum(shape))
    q = torch.randint(-128, 128, shape, dtype=torch.int8)
    stored = eetq_layout.preprocess(q, arch)
    assert stored.view(torch.uint8).reshape(-1).tolist() == upstream_preprocess(q, arch)
    assert torch.equal(eetq_layout.unpreprocess(stored, arch), q)


@pytest.mark.parametrize("arch", eetq_layout.ARCHS)
def test_inverse_round_trip_on_a_real_sized_matrix(arch):
    torch.manual_seed(3)
    q = torch.randint(-128, 128, (576, 1536), dtype=torch.int8)
    assert torch.equal(eetq_layout.unpreprocess(eetq_layout.preprocess(q, arch), arch), q)
    assert not torch.equal(eetq_layout.preprocess(q, "sm80"), eetq_layout.preprocess(q, "sm70"))


# -- the format ---------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", eetq_layout.ARCHS)
def test_quantize_writes_transformers_keys_and_dequantizes(arch):
    torch.manual_seed(0)
    weight = (torch.randn(192, 128) * 0.02).to(torch.bfloat16)  # [out, in]
    r = recipe(arch=arch)
    packed = EETQ.quantize(weight, r, CPU)
    assert {k: (v.dtype, tuple(v.shape)) for k, v in packed.items()} == EETQ.output_specs((192, 128), r)
    assert EETQ.output_specs((192, 128), r) == {
        "weight": (torch.int8, (128, 192)),
        "weight_scales": (torch.float16, (192,)),
    }
    q, scales = eetq_layout.quantize(weight.half())
    assert torch.equal(packed["weight"], eetq_layout.preprocess(q.t().contiguous(), arch))
    assert torch.equal(packed["weight_scales"], scales)
    deq = EETQ.dequantize(packed, r)
    assert torch.equal(deq, q.float() * scales.float()[:, None])
    rel = (deq - weight.float()).norm() / weight.float().norm()
    assert rel < 0.01


def test_transformers_eetq_linear_has_our_keys():
    """transformers' EetqLinear (what its EETQ loader fills) declares exactly our tensors."""
    from transformers.integrations.eetq import EetqLinear
    from transformers.utils.quantization_config import EetqConfig

    theirs = EetqLinear(128, 192, bias=True).state_dict()
    ours = EETQ.output_specs((192, 128), recipe())
    assert sorted(theirs) == sorted([*ours, "bias"])
    for key, (dtype, shape) in ours.items():
        assert (theirs[key].dtype, tuple(theirs[key].shape)) == (dtype, shape), key
    config = EETQ.quantization_config(recipe(), Plan(tensors=[], skipped={"lm_head": "output embeddings"}))
    assert config == {"quant_method": "eetq", "weights": "int8", "modules_to_not_convert": ["lm_head"]}
    parsed = EetqConfig.from_dict(config)
    assert parsed.weights == "int8" and parsed.modules_to_not_convert == ["lm_head"]


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_runtime_module_matches_dequantized_linear(rows, dtype):
    """One row goes through torch._weight_int8pack_mm, more through dequantize + matmul."""
    torch.manual_seed(1)
    weight = torch.randn(192, 128) * 0.02
    bias = torch.randn(192) * 0.1
    r = recipe()
    packed = EETQ.quantize(weight, r, CPU)
    module = EETQLinear.from_stored(packed, bias.to(dtype), "sm80")
    assert module.weight.shape == (192, 128) and module.weight.dtype == torch.int8
    x = torch.randn(2, rows, 128).to(dtype)
    reference = torch.nn.functional.linear(x.float(), EETQ.dequantize(packed, r), bias.to(dtype).float())
    out = module(x)
    assert out.dtype == dtype and out.shape == (2, rows, 192)
    rel = ((out.float() - reference).norm() / reference.norm()).item()
    assert rel < (1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize(
    "options,message,cli_message",
    [
        (
            {"bits": 4},
            "method eetq: bits 4 is not supported; choose from 8",
            "--method eetq: --bits 4 is not supported; choose from 8",
        ),
        (
            {"arch": "sm90"},
            "method eetq: arch sm90 is not supported; choose from sm70, sm80 "
            "(sm80 serves SM75-SM89; upstream EETQ has no layout for SM90 and later)",
            "--method eetq: --arch sm90 is not supported; choose from sm70, sm80 "
            "(sm80 serves SM75-SM89; upstream EETQ has no layout for SM90 and later)",
        ),
        (
            {"group_size": 64},
            "group_size does not apply to method eetq",
            "--group-size does not apply to --method eetq",
        ),
    ],
)
def test_recipe_errors(options, message, cli_message):
    with pytest.raises(UsageError) as error:
        EETQ.make_recipe(options)
    assert str(error.value) == message
    assert error.value.cli_message() == cli_message


def test_recipe_defaults_and_skip_reasons():
    assert EETQ.make_recipe({}) == {"method": "eetq", "bits": 8, "arch": "sm80"}
    assert EETQ.label(EETQ.make_recipe({"arch": "sm70"})) == "eetq int8 sm70"
    r = EETQ.make_recipe({})
    assert EETQ.skip_reason("m", (192, 576), r) is None
    assert EETQ.skip_reason("m", (160, 128), r) == (
        "in_features 128 and out_features 160: EETQ's kernel needs multiples of 64"
    )


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda t: t.pop("weight_scales"), "missing EETQ tensor(s) weight_scales"),
        (lambda t: t.update(weight=t["weight"].to(torch.uint8)), "weight is uint8 [128, 192], expected int8"),
        (
            lambda t: t.update(weight_scales=t["weight_scales"][:5]),
            "weight_scales is float16 [5], expected 192",
        ),
    ],
)
def test_malformed_layer_is_refused(change, message):
    tensors = EETQ.quantize(torch.randn(192, 128), recipe(), CPU)
    change(tensors)
    with pytest.raises(ArtifactError) as error:
        EETQ.dequantize(tensors, recipe())
    assert message in str(error.value)


# -- the CLI and qconv.load_model ---------------------------------------------------------------
def run_error(cli, *args) -> str:
    result = cli(*args, ok=None)
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr.strip()


def reference_model(source, artifact):
    """The source in float32 with each quantized weight replaced by its dequantized bytes."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
    manifest = json.loads((artifact / "qconv.json").read_text())
    tensors = {}
    for path in sorted(artifact.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    modules = dict(model.named_modules())
    for name in manifest["layers"]:
        layer = {s: tensors[f"{name}.{s}"] for s in ("weight", "weight_scales")}
        modules[name].weight.data = EETQ.dequantize(layer, manifest["recipe"])
    return model.eval(), manifest


@pytest.mark.parametrize("arch", eetq_layout.ARCHS)
def test_convert_verify_and_load_model_match_reference(cli, tiny_llama, tmp_path, arch):
    out = tmp_path / f"eetq-{arch}"
    _, doc = cli.json("convert", tiny_llama, "-o", out, "--method", "eetq", "--arch", arch, "--device", "cpu")
    assert doc["verify"]["passed"], doc["verify"]
    assert doc["recipe"]["arch"] == arch and doc["recipe"]["label"] == f"eetq int8 {arch}"
    assert doc["summary"]["quantized_layers"] == 14
    assert doc["verify"]["logits"]["loader_rel_diff"] < 1e-5
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "eetq",
        "weights": "int8",
        "modules_to_not_convert": ["lm_head"],
    }
    reference, manifest = reference_model(tiny_llama, out)
    assert manifest["skipped"] == {"lm_head": "output embeddings stay unquantized"}
    model = qconv.load_model(out, device="cpu", dtype=torch.float32)
    assert type(model.model.layers[0].self_attn.q_proj) is EETQLinear
    assert model.model.layers[0].self_attn.q_proj.arch == arch
    with torch.no_grad():
        ours = model(PROMPT).logits
        expected = reference(PROMPT).logits
    assert ((ours - expected).norm() / expected.norm()).item() < 1e-5
    _, report = cli.json("verify", out, "--device", "cpu")
    assert report["passed"], report


def test_folder_without_manifest_loads_as_sm80(cli, tiny_llama, tmp_path):
    """A folder from elsewhere (config.json only): quant_method eetq, layout sm80."""
    out = tmp_path / "eetq"
    cli("convert", tiny_llama, "-o", out, "--method", "eetq", "--device", "cpu", "--no-verify")
    with_manifest = qconv.load_model(out, device="cpu", dtype=torch.float32)
    (out / "qconv.json").unlink()
    without = qconv.load_model(out, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(with_manifest(PROMPT).logits, without(PROMPT).logits)


def test_layers_not_multiple_of_64_stay_unquantized(cli, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=320,
        hidden_size=128,
        intermediate_size=160,  # gate/up [160, 128] and down [128, 160]: not EETQ shapes
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    source = tmp_path / "src"
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(source)
    out = tmp_path / "eetq"
    _, doc = cli.json("convert", source, "-o", out, "--method", "eetq", "--device", "cpu")
    assert doc["verify"]["passed"], doc["verify"]
    manifest = json.loads((out / "qconv.json").read_text())
    assert manifest["skipped"]["model.layers.0.mlp.down_proj"] == (
        "in_features 160 and out_features 128: EETQ's kernel needs multiples of 64"
    )
    assert manifest["skipped"]["model.layers.0.mlp.gate_proj"] == (
        "in_features 128 and out_features 160: EETQ's kernel needs multiples of 64"
    )
    assert sorted(manifest["layers"]) == [f"model.layers.0.self_attn.{p}_proj" for p in "koqv"]
    modules = json.loads((out / "config.json").read_text())["quantization_config"]["modules_to_not_convert"]
    assert modules == [
        "lm_head",
        "model.layers.0.mlp.down_proj",
        "model.layers.0.mlp.gate_proj",
        "model.layers.0.mlp.up_proj",
    ]
    model = qconv.load_model(out, device="cpu")
    assert type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear


def nothing_written(parent, out, cli):
    assert not out.exists()
    assert not [p.name for p in parent.iterdir() if ".qconv-tmp" in p.name]
    _, rows = cli.json("ls")
    assert rows == []


@pytest.mark.parametrize(
    "flags,message",
    [
        (
            ["--arch", "sm90"],
            "Error: --method eetq: --arch sm90 is not supported; choose from sm70, sm80 "
            "(sm80 serves SM75-SM89; upstream EETQ has no layout for SM90 and later)",
        ),
        (["--bits", "4"], "Error: --method eetq: --bits 4 is not supported; choose from 8"),
    ],
)
def test_cli_option_errors(cli, tiny_llama, tmp_path, flags, message):
    out = tmp_path / "out"
    assert run_error(cli, "convert", tiny_llama, "-o", out, "--method", "eetq", *flags) == message
    nothing_written(tmp_path, out, cli)


def test_arch_does_not_apply_to_other_methods(cli, tiny_llama, tmp_path):
    out = tmp_path / "out"
    got = run_error(cli, "convert", tiny_llama, "-o", out, "--method", "bnb", "--arch", "sm80")
    assert got == "Error: --arch does not apply to --method bnb"
    nothing_written(tmp_path, out, cli)


def test_weight_beyond_float16_is_refused_naming_the_tensor(cli, tmp_path):
    from conftest import make_tiny_llama
    from safetensors.torch import save_file

    source = make_tiny_llama(tmp_path / "src", dtype=torch.float32)
    tensors = load_file(str(source / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight"][3, 7] = 1e6
    save_file(tensors, str(source / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    got = run_error(cli, "convert", source, "-o", out, "--method", "eetq", "--device", "cpu")
    assert got == (
        "Error: model.layers.1.mlp.up_proj.weight: |w| reaches 1e+06, beyond float16's 65504; "
        "EETQ quantizes from float16"
    )
    nothing_written(tmp_path, out, cli)


# -- the real SmolLM2 ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_eetq(smollm2_gguf, tmp_path_factory):
    from click.testing import CliRunner

    from qconv.cli import main

    out = tmp_path_factory.mktemp("smol") / "smollm2-eetq"
    result = CliRunner().invoke(
        main,
        [
            "convert",
            str(smollm2_gguf),
            "-o",
            str(out),
            "--method",
            "eetq",
            "--device",
            "cpu",
            "--no-record",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


@pytest.mark.slow
def test_smollm2_converts_and_verifies(smollm2_eetq):
    out, doc = smollm2_eetq
    assert doc["verify"]["passed"], doc["verify"]
    assert doc["summary"]["quantized_layers"] == 210
    assert 7.9 < doc["summary"]["bits_per_weight"] < 8.1
    assert doc["summary"]["worst_rel_error"] < 0.02
    assert doc["verify"]["logits"]["loader_rel_diff"] < 1e-5
    assert doc["verify"]["logits"]["top1_agreement"] > 0.9


@pytest.mark.slow
def test_smollm2_answers_through_load_model(smollm2_eetq):
    from test_hqq_cli import answer

    out, _ = smollm2_eetq
    # Greedy answers in float32: in bf16 the 12 generated tokens depend on the CPU's bf16 matmul
    # kernels (with AMX, oneDNN's rounding differs and the bf16 model wanders off after "L'"),
    # which is arithmetic, not the artifact; verify compares the loader's logits in float32 too.
    model = qconv.load_model(out, device="cpu", dtype=torch.float32)
    assert "Paris" in answer(model, out)
