"""Architectures beyond Llama, through the CLI: checkpoints whose names or layout transformers
changes while loading (GPT-NeoX's ``embed_out``, Mixtral's one Linear per expert), a model with
dropout (OPT: a loader that leaves it in training mode gives other logits each call), and models
whose Linear layers are subclasses of nn.Linear (Falcon), which transformers' bitsandbytes
loading does not replace."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import qconv

COMMON = dict(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2)


def _save(folder: Path, config_cls, model_cls, **extra) -> Path:
    torch.manual_seed(0)
    model_cls(config_cls(**COMMON, num_attention_heads=4, **extra)).to(torch.bfloat16).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    import transformers as t

    root = tmp_path_factory.mktemp("architectures")
    return {
        "gpt_neox": _save(root / "gpt_neox", t.GPTNeoXConfig, t.GPTNeoXForCausalLM),
        "mixtral": _save(
            root / "mixtral",
            t.MixtralConfig,
            t.MixtralForCausalLM,
            num_key_value_heads=2,
            num_local_experts=4,
        ),
        "opt": _save(
            root / "opt", t.OPTConfig, t.OPTForCausalLM, ffn_dim=256, word_embed_proj_dim=128, dropout=0.1
        ),
        "falcon": _save(
            root / "falcon",
            t.FalconConfig,
            t.FalconForCausalLM,
            new_decoder_architecture=True,
            num_kv_heads=2,
        ),
    }


def test_the_checkpoints_use_names_transformers_maps_at_load(models):
    """The premise: the files name tensors as earlier releases did."""
    with safe_open(str(models["gpt_neox"] / "model.safetensors"), "pt") as f:
        assert "embed_out.weight" in f.keys()
    with safe_open(str(models["mixtral"] / "model.safetensors"), "pt") as f:
        assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in f.keys()


@pytest.mark.parametrize("arch", ["gpt_neox", "mixtral", "opt"])
@pytest.mark.parametrize("method", [["bnb", "--bits", "4"], ["hqq", "--bits", "4"], ["eetq"]])
def test_converts_verifies_and_loads(cli, models, tmp_path, arch, method):
    out = tmp_path / "out"
    _, doc = cli.json("convert", models[arch], "-o", out, "--method", *method, "--device", "cpu")
    checks = {c["name"]: c for c in doc["verify"]["checks"]}
    assert checks["loader"]["passed"], checks["loader"]["detail"]
    assert doc["verify"]["logits"]["loader_rel_diff"] < 1e-3
    assert doc["verify"]["logits"]["top1_agreement"] > 0.5
    model = qconv.load_model(out, device="cpu", dtype=torch.float32)
    logits = model(input_ids=torch.tensor([[1, 5, 9, 200]])).logits
    assert torch.isfinite(logits).all()


def test_bnb_refuses_linear_subclasses_transformers_would_not_replace(cli, models, tmp_path):
    result = cli("convert", models["falcon"], "-o", tmp_path / "out", "--method", "bnb", ok=None)
    assert result.exit_code == 2
    assert result.stderr == (
        f"Error: {models['falcon']}: no layer to quantize (every Linear is skipped or absent); "
        "transformer.h.0.mlp.dense_4h_to_h: a FalconLinear (subclass of nn.Linear), which transformers' "
        "bitsandbytes loading leaves unquantized\n"
    )
    assert not (tmp_path / "out").exists()


def test_hqq_quantizes_linear_subclasses(cli, models, tmp_path):
    """qconv's own loader swaps any nn.Linear, subclasses included."""
    _, doc = cli.json(
        "convert", models["falcon"], "-o", tmp_path / "out", "--method", "hqq", "--device", "cpu"
    )
    assert doc["verify"]["passed"] and doc["summary"]["quantized_layers"] == 8


def test_gpt2_conv1d_is_refused_with_the_reason(cli, tmp_path):
    import transformers as t

    torch.manual_seed(0)
    config = t.GPT2Config(vocab_size=320, n_embd=64, n_layer=1, n_head=2, n_positions=64)
    t.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    result = cli("convert", tmp_path / "gpt2", "-o", tmp_path / "out", "--method", "hqq", ok=None)
    assert result.exit_code == 2
    assert result.stderr == (
        f"Error: {tmp_path / 'gpt2'}: no layer to quantize (every Linear is skipped or absent); the architecture "
        "has no nn.Linear besides the output embeddings (Conv1D layers, as in GPT-2, are not supported)\n"
    )


@pytest.mark.parametrize(
    ("arch", "config", "model", "extra"),
    [
        # learned positions (256 of them, fewer than the default 2,048-token sequences) and
        # a projection before the first block
        (
            "opt",
            "OPTConfig",
            "OPTForCausalLM",
            dict(ffn_dim=256, word_embed_proj_dim=64, max_position_embeddings=256),
        ),
        # a LayerNorm on the embeddings before the first block
        ("bloom", "BloomConfig", "BloomForCausalLM", dict(n_layer=2, n_head=4)),
    ],
)
def test_calibrated_aqlm_runs_what_precedes_the_blocks(cli, tmp_path, arch, config, model, extra):
    import transformers as t
    from conftest import add_tiny_tokenizer

    folder = _save(tmp_path / arch, getattr(t, config), getattr(t, model), **extra)
    add_tiny_tokenizer(folder)
    _, doc = cli.json(
        "convert", folder, "-o", tmp_path / "out", "--method", "aqlm", "--calib-tokens", 512,
        "--max-epochs", 1, "--no-finetune", "--device", "cpu",
    )  # fmt: skip
    assert doc["verify"]["passed"]
    expected_seqlen = 256 if arch == "opt" else 512
    assert doc["recipe"]["calibration"]["seqlen"] == expected_seqlen


def test_a_stray_tensor_in_a_renamed_checkpoint_artifact_is_named(cli, models, tmp_path):
    """The transformers-loaded path still refuses what belongs to no module."""
    from safetensors.torch import load_file, save_file

    from qconv.errors import ArtifactError

    out = tmp_path / "out"
    cli("convert", models["gpt_neox"], "-o", out, "--method", "hqq", "--device", "cpu", "--no-verify")
    tensors = load_file(str(out / "model.safetensors"))
    tensors["gpt_neox.stray.weight"] = torch.zeros(2, 2, dtype=torch.bfloat16)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ArtifactError) as error:
        qconv.load_model(out, device="cpu")
    assert str(error.value) == f"{out}: tensor 'gpt_neox.stray.weight' belongs to no module of the model"


def test_calibrated_aqlm_refuses_fused_experts_in_one_line(cli, models, tmp_path):
    from conftest import add_tiny_tokenizer

    add_tiny_tokenizer(models["mixtral"])
    out = tmp_path / "out"
    result = cli("convert", models["mixtral"], "-o", out, "--method", "aqlm", "--device", "cpu", ok=None)
    assert result.exit_code == 2
    assert result.stderr == (
        f"Error: {models['mixtral']}: no tensor 'model.layers.0.mlp.gate.weight', which the block needs "
        "(checkpoints laid out as an earlier transformers saved them are not mapped for calibration; "
        "--calibration none works)\n"
    )
    assert not out.exists()
    # nothing to resume is left behind: the same command refuses the same way, not with "add --resume"
    assert not (tmp_path / ".out.qconv-checkpoint").exists()
    again = cli("convert", models["mixtral"], "-o", out, "--method", "aqlm", "--device", "cpu", ok=None)
    assert again.exit_code == 2 and again.stderr == result.stderr


def test_a_real_loader_failing_inside_its_library_fails_verify_in_one_line(cli, models, tmp_path):
    """transformers' Falcon initialises the weight of every FalconLinear by ``module.weight``, which
    compressed-tensors' compressed modules no longer have: the artifact does not load in stock
    transformers, and verify says so (the loader check fails, exit 1) instead of a traceback.
    A transformers that stops doing so turns this test red: then the artifact loads, and the
    assertions below should say that."""
    out = tmp_path / "out"
    result = cli(
        "convert", models["falcon"], "-o", out, "--method", "compressed-tensors", "--device", "cpu", ok=None
    )
    assert result.exit_code == 1
    assert "verification FAILED" in result.output
    manifest = json.loads((out / "qconv.json").read_text())
    loader = next(c for c in manifest["verify"]["checks"] if c["name"] == "loader")
    assert loader == {
        "name": "loader",
        "passed": False,
        "detail": "the real loader failed: AttributeError: 'FalconLinear' object has no attribute 'weight'",
    }


def test_only_exceptions_raised_inside_a_library_count_as_its_loader_failing():
    from qconv.verify import _raised_by_a_library, _sortable

    try:
        torch.nn.Linear(2, 2).no_such_attribute  # noqa: B018 - raised inside torch's Module.__getattr__
    except AttributeError as exc:
        assert _raised_by_a_library(exc)
    try:
        _sortable("not a number")  # math.isnan's TypeError, raised in qconv's own frame: a bug
    except TypeError as exc:
        assert not _raised_by_a_library(exc)
