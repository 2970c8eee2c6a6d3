"""HQQ through the CLI and ``qconv.load_model``: every bit width, hqq's own classes reading the
artifact, logits against a reference dequantized by hqq itself, and the real SmolLM2."""

from __future__ import annotations

import json

import pytest
import torch
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear, Quantizer
from safetensors.torch import load_file, save_file
from test_smollm2 import QUESTION

import qconv
from qconv.errors import ArtifactError
from qconv.formats.hqq_layout import BITS, PACKING, unpack

PROMPT = torch.tensor([[1, 17, 42, 99, 7, 256, 3, 12, 64, 5]])


def read_folder(folder):
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def layer_state(tensors, module):
    prefix = module + "."
    return {
        k[len(prefix) :]: v
        for k, v in tensors.items()
        if k.startswith(prefix) and "." not in k[len(prefix) :]
    }


def tied_qwen2(layers: int):
    """A tiny Qwen2 (seed 3, float32): q/k/v biases, and lm_head tied to the embeddings. The
    model test_import_hqq.py quantizes with hqq's own AutoHQQHFModel as well."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(3)
    config = Qwen2Config(
        vocab_size=300,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(config).eval()


def hqq_dequantized_model(source_folder, artifact_folder):
    """The source model with every quantized weight replaced by what hqq's own HQQLinear
    dequantizes from the artifact's tensors: the reference qconv.load_model must match."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(source_folder), dtype=torch.float32)
    tensors = read_folder(artifact_folder)
    modules = dict(model.named_modules())
    quantized = [k.removesuffix(".W_q") for k in tensors if k.endswith(".W_q")]
    for name in quantized:
        layer = HQQLinear(None, None, compute_dtype=torch.float32, device="cpu", initialize=False)
        state = layer_state(tensors, name)
        state.pop("bias", None)
        layer.load_state_dict(state)
        modules[name].weight.data = layer.dequantize().reshape(modules[name].weight.shape)
    return model.eval(), quantized


@pytest.mark.parametrize("bits", BITS)
def test_every_bit_width_converts_verifies_and_runs_like_hqq(cli, tiny_llama, tmp_path, bits):
    out = tmp_path / f"hqq{bits}"
    _, doc = cli.json("convert", tiny_llama, "-o", out, "--method", "hqq", "--bits", bits, "--device", "cpu")
    assert doc["verify"]["passed"], doc["verify"]
    assert doc["summary"]["quantized_layers"] == 14
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "hqq"
    assert config["quant_config"]["weight_quant_params"]["nbits"] == bits
    assert config["skip_modules"] == ["lm_head"]

    reference, quantized = hqq_dequantized_model(tiny_llama, out)
    assert len(quantized) == 14
    loaded = qconv.load_model(out, device="cpu", dtype=torch.float32)
    assert type(loaded.model.layers[0].mlp.down_proj).__name__ == "HQQDequantLinear"
    with torch.no_grad():
        ours = loaded(PROMPT).logits
        theirs = reference(PROMPT).logits
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-5), (ours - theirs).abs().max()


@pytest.mark.parametrize("bits,axis", [(4, 1), (3, 0), (2, 1)])
def test_hqq_solver_codes_equal_hqq_quantizer(cli, tiny_llama, tmp_path, bits, axis):
    out = tmp_path / "ref"
    cli(
        "convert",
        tiny_llama,
        "-o",
        out,
        "--method",
        "hqq",
        "--bits",
        bits,
        "--axis",
        axis,
        "--solver",
        "hqq",
        "--device",
        "cpu",
        "--no-verify",
    )
    source = read_folder(tiny_llama)
    tensors = read_folder(out)
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
        weight = source[name + ".weight"]
        W_q, meta = Quantizer.quantize(
            weight, nbits=bits, group_size=64, axis=axis, round_zero=bits == 4, device="cpu", bitpack=True
        )
        state = layer_state(tensors, name)
        assert torch.equal(state["W_q"], W_q), name
        assert torch.equal(state["scale"], meta["scale"].to(torch.float16))
        assert torch.equal(state["zero"], meta["zero"].to(torch.float16))
        assert "".join(map(chr, state["packing"].tolist())) == PACKING[bits]


def test_model_with_biases_and_tied_embeddings(cli, tmp_path):
    """Qwen2 has q/k/v biases and ties lm_head to the embeddings: both go through load_model."""
    tied_qwen2(layers=2).to(torch.bfloat16).save_pretrained(tmp_path / "qwen")
    out = tmp_path / "qwen-hqq"
    _, doc = cli.json(
        "convert", tmp_path / "qwen", "-o", out, "--method", "hqq", "--bits", 8, "--device", "cpu"
    )
    assert doc["verify"]["passed"]
    tensors = read_folder(out)
    assert "model.layers.0.self_attn.q_proj.bias" in tensors and "lm_head.weight" not in tensors

    loaded = qconv.load_model(out, device="cpu", dtype=torch.float32)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert loaded.model.layers[0].self_attn.q_proj.bias is not None
    reference, _ = hqq_dequantized_model(tmp_path / "qwen", out)
    with torch.no_grad():
        assert torch.allclose(loaded(PROMPT).logits, reference(PROMPT).logits, rtol=0, atol=1e-5)


def test_load_model_names_a_malformed_layer(cli, tiny_llama, tmp_path):
    out = tmp_path / "bad"
    cli("convert", tiny_llama, "-o", out, "--method", "hqq", "--device", "cpu", "--no-verify", "--no-record")
    shard = out / "model.safetensors"
    tensors = load_file(str(shard))
    tensors["model.layers.1.mlp.up_proj.W_q"] = tensors["model.layers.1.mlp.up_proj.W_q"][:-1].clone()
    save_file(tensors, str(shard))
    with pytest.raises(ArtifactError) as error:
        qconv.load_model(out, device="cpu")
    assert str(error.value) == (
        f"{out}: layer model.layers.1.mlp.up_proj: W_q is uint8 [255, 64], expected uint8 [256, 64] "
        "for 4-bit [256, 128] group 64 axis 1"
    )


def test_load_model_refuses_a_folder_without_config(tmp_path):
    with pytest.raises(ArtifactError, match="no config.json"):
        qconv.load_model(tmp_path, device="cpu")


def test_hqq_options_are_refused_for_bnb(cli, tiny_llama, tmp_path):
    result = cli(
        "convert", tiny_llama, "-o", tmp_path / "x", "--method", "bnb", "--group-size", "64", ok=False
    )
    assert result.exit_code == 2
    assert result.stderr.strip() == "Error: --group-size does not apply to --method bnb"
    assert not (tmp_path / "x").exists()


# -- the real SmolLM2 ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_folder(smollm2_gguf, tmp_path_factory):
    """SmolLM2 as a bf16 Hugging Face folder, written once from the gguf by qconv's reader (the
    GGUF tokenizer conversion would otherwise be paid by every conversion below)."""
    from qconv.sources import open_source

    folder = tmp_path_factory.mktemp("smol") / "smollm2-bf16"
    folder.mkdir()
    with open_source(smollm2_gguf) as source:
        save_file(
            {info.name: source.read(info.name).to(torch.bfloat16).contiguous() for info in source.tensors()},
            str(folder / "model.safetensors"),
            metadata={"format": "pt"},
        )
        source.write_support_files(folder)
        (folder / "config.json").write_text(json.dumps(source.config_dict(), indent=2))
    return folder


def answer(model, folder) -> str:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    ids = tokenizer.apply_chat_template(
        QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.slow
def test_smollm2_hqq_4bit_verifies_and_answers(cli, smollm2_folder, tmp_path):
    out = tmp_path / "smol-hqq4"
    _, doc = cli.json("convert", smollm2_folder, "-o", out, "--method", "hqq", "--bits", 4, "--device", "cpu")
    assert doc["verify"]["passed"]
    assert doc["summary"]["quantized_layers"] == 210
    assert doc["verify"]["logits"]["loader_rel_diff"] < 1e-5
    assert "Paris" in answer(qconv.load_model(out, device="cpu"), out)


@pytest.mark.slow
@pytest.mark.parametrize("bits", [b for b in BITS if b != 4])
def test_smollm2_every_bit_width_round_trips(cli, smollm2_folder, tmp_path, bits):
    """Layers 0 and 1 quantized (the rest skipped to keep CI fast): hqq's HQQLinear reads the
    stored layers to the same weights qconv's reader does, and the loader check passes."""
    out = tmp_path / f"smol-hqq{bits}"
    _, doc = cli.json(
        "convert",
        smollm2_folder,
        "-o",
        out,
        "--method",
        "hqq",
        "--bits",
        bits,
        "--device",
        "cpu",
        "--skip",
        r"re:model\.layers\.([2-9]|[12][0-9])\..*",
        "--logits",
    )
    assert doc["verify"]["passed"], doc["verify"]
    assert doc["summary"]["quantized_layers"] == 14
    tensors = read_folder(out)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        state = layer_state(tensors, name)
        layer = HQQLinear(
            None,
            BaseQuantizeConfig(nbits=bits, group_size=64),
            compute_dtype=torch.float32,
            device="cpu",
            initialize=False,
        )
        layer.load_state_dict(dict(state))
        rows = state["W_q"].shape[0] * {8: 1, 6: 1, 5: 1, 4: 2, 3: 10, 2: 4, 1: 8}[bits]
        codes = unpack(state["W_q"], PACKING[bits], rows)
        assert int(codes.max()) <= 2**bits - 1
        ours = qconv.formats.get_format("hqq").dequantize(state, {})
        assert torch.equal(layer.dequantize().reshape(ours.shape), ours)
