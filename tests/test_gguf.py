"""qconv convert --method gguf end to end, through the CLI, against llama.cpp itself.

The source is a tiny random Llama (rows of 256 and 512, so the k-quants apply) with a
SentencePiece tokenizer trained here (llama.cpp's "llama" vocabulary); llama.cpp
(llama-cpp-python) is the real loader, and its own ``llama_model_quantize`` the reference:
quantizing qconv's BF16 file of the same source must give exactly the types, shapes and bytes
of qconv's ``--solver llama`` file, for every mix tested.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf_reference
import pytest
import torch
from conftest import train_sentencepiece

from qconv.formats.gguf_mix import FILE_TYPES

pytestmark = pytest.mark.skipif(not gguf_reference.available(), reason=gguf_reference.MISSING)

VOCAB = 512


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory) -> Path:
    """A random bf16 Llama of 3 blocks (hidden 256, intermediate 512, GQA 4/2, untied) with a
    SentencePiece tokenizer of 512 pieces."""
    pytest.importorskip("sentencepiece")
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("gguf-src") / "tiny-llama"
    folder.mkdir()
    train_sentencepiece(folder, vocab_size=VOCAB, dummy_prefix=True)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bf16_file(tiny_source, tmp_path_factory) -> Path:
    """qconv's BF16 GGUF of the source: the input llama.cpp's own quantizer is given (its values
    are the bf16 source's exactly, so both quantizers start from the same numbers)."""
    from click.testing import CliRunner

    from qconv.cli import main

    out = tmp_path_factory.mktemp("gguf-bf16") / "bf16"
    result = CliRunner().invoke(
        main,
        ["convert", str(tiny_source), "-o", str(out), "--method", "gguf", "--type", "BF16", "--no-verify"],
    )
    assert result.exit_code == 0, result.output
    return out / "tiny-llama-BF16.gguf"


def test_convert_writes_one_gguf_that_llama_cpp_verifies(cli, tiny_source, tmp_path):
    out = tmp_path / "q4km"
    result = cli("convert", tiny_source, "-o", out, "--method", "gguf", "--device", "cpu")
    assert re.match(
        rf"wrote {out} \(gguf Q4_K_M, 23 layers, [\d.]+ [KM]B, [\d.]+ bits/weight\) in [\d.]+ s\n",
        result.stdout,
    ), result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "qconv.json", "tiny-llama-Q4_K_M.gguf"]
    manifest = json.loads((out / "qconv.json").read_text())
    checks = {c["name"]: c for c in manifest["verify"]["checks"]}
    assert checks["files"]["passed"] if "files" in checks else True
    assert checks["layers"]["passed"] and checks["loader"]["passed"], checks
    assert manifest["verify"]["logits"]["loader"].startswith("llama.cpp (llama-cpp-python ")
    assert manifest["recipe"]["type"] == "Q4_K_M" and manifest["recipe"]["solver"] == "qconv"
    # every Linear and the token embeddings are quantized; the output too (GGUF's way)
    assert "model.embed_tokens" in manifest["layers"] and "lm_head" in manifest["layers"]
    assert manifest["layers"]["lm_head"]["format"] == "Q6_K"
    # verify again from disk: the layers read back by transformers' GGUF reader, llama.cpp runs it
    again = cli("verify", out, "--json")
    report = json.loads(again.stdout)
    assert report["passed"], report
    listed = cli("ls", "--json")
    assert any(row["path"] == str(out.resolve()) for row in json.loads(listed.stdout))


@pytest.mark.parametrize("mix", ["Q4_K_M", "Q3_K_M", "Q2_K", "Q5_K_S", "Q6_K", "Q4_0", "Q5_1", "Q8_0"])
def test_llama_solver_equals_llama_model_quantize(cli, tiny_source, bf16_file, tmp_path, mix):
    """Same types, shapes and bytes as llama.cpp's own quantizer for the whole file."""
    ours = tmp_path / "ours"
    cli(
        "convert",
        tiny_source,
        "-o",
        ours,
        "--method",
        "gguf",
        "--type",
        mix,
        "--solver",
        "llama",
        "--no-verify",
    )
    theirs = tmp_path / f"llama-{mix}.gguf"
    gguf_reference.llama_model_quantize(bf16_file, theirs, FILE_TYPES[mix].ftype)
    mine = gguf_reference.tensors_of(ours / f"tiny-llama-{mix}.gguf")
    reference = gguf_reference.tensors_of(theirs)
    assert list(mine) == list(reference)  # the same tensors in the same order
    for name, (ggml_type, shape, data) in reference.items():
        assert mine[name][:2] == (ggml_type, shape), name
        assert mine[name][2] == data, f"{name} ({ggml_type}) differs from llama.cpp's bytes"


@pytest.mark.parametrize("mix", ["Q4_K_M", "Q3_K_M", "Q2_K", "Q4_0"])
def test_qconv_solver_is_never_worse_than_llama(cli, tiny_source, tmp_path, mix):
    errors = {}
    for solver in ("llama", "qconv"):
        out = tmp_path / solver
        args = ("convert", tiny_source, "-o", out, "--method", "gguf", "--type", mix, "--solver", solver)
        cli(*args, "--no-verify")
        errors[solver] = json.loads((out / "qconv.json").read_text())["layers"]
    assert errors["qconv"].keys() == errors["llama"].keys()
    for layer, entry in errors["llama"].items():
        assert errors["qconv"][layer]["format"] == entry["format"]
        assert errors["qconv"][layer]["rel_error"] <= entry["rel_error"], layer
    assert sum(e["rel_error"] for e in errors["qconv"].values()) < sum(
        e["rel_error"] for e in errors["llama"].values()
    )


def test_split_file_is_loaded_from_its_first_part(cli, tiny_source, tmp_path):
    out = tmp_path / "split"
    cli(
        "convert",
        tiny_source,
        "-o",
        out,
        "--method",
        "gguf",
        "--type",
        "Q8_0",
        "--solver",
        "llama",
        "--max-shard-size",
        "400KB",
    )
    parts = sorted(p.name for p in out.glob("*.gguf"))
    assert len(parts) > 1
    assert parts[0] == f"tiny-llama-Q8_0-00001-of-{len(parts):05d}.gguf"
    manifest = json.loads((out / "qconv.json").read_text())
    assert manifest["verify"]["passed"], manifest["verify"]
    assert set(parts) <= set(manifest["files"])


def test_eval_runs_llama_cpp_under_the_protocol(cli, tiny_source, tmp_path):
    out = tmp_path / "q8"
    cli(
        "convert",
        tiny_source,
        "-o",
        out,
        "--method",
        "gguf",
        "--type",
        "Q8_0",
        "--solver",
        "llama",
        "--no-verify",
    )
    _, document = cli.json("eval", out, "--seqlen", "64", "--max-windows", "2")
    assert document["protocol"]["engine"].startswith("llama.cpp (llama-cpp-python ")
    assert document["protocol"]["windows"] == 2 and document["protocol"]["seqlen"] == 64
    assert document["protocol"]["gguf_file"] == "tiny-llama-Q8_0.gguf"
    assert 1 < document["metrics"]["ppl"] < 10 * VOCAB  # a random model: near-uniform, finite


def test_hub_card_follows_the_gguf_conventions(cli, tiny_source, tmp_path):
    from qconv.model_card import hub_model_card

    out = tmp_path / "q4"
    cli("convert", tiny_source, "-o", out, "--method", "gguf", "--type", "Q4_0", "--solver", "llama")
    card = hub_model_card(json.loads((out / "qconv.json").read_text()), [], "me/tiny-llama-GGUF")
    front = card.split("---")[1]
    assert "- gguf" in front and "- Q4_0" in front and "library_name" not in front
    assert "llama-cli -hf me/tiny-llama-GGUF:Q4_0" in card
    assert 'filename="tiny-llama-Q4_0.gguf"' in card
    assert "Verified with llama.cpp (llama-cpp-python " in card


def test_push_and_load_model(cli, hub, tiny_source, tmp_path):
    import qconv

    out = tmp_path / "q4"
    cli("convert", tiny_source, "-o", out, "--method", "gguf", "--type", "Q4_0", "--solver", "llama")
    _, doc = cli.json("push", out, "--repo", "qconv-test/tiny-llama-GGUF")
    assert doc["status"] == "committed"
    manifest = json.loads((out / "qconv.json").read_text())
    remote = hub.files("qconv-test/tiny-llama-GGUF")
    name = "tiny-llama-Q4_0.gguf"
    assert name in remote
    assert remote[name].lfs_oid in (None, manifest["files"][name]["sha256"])
    card = hub.file_bytes("qconv-test/tiny-llama-GGUF", "README.md").decode()
    assert card.startswith("---\ntags:\n- qconv\n- gguf\n- quantized\n- Q4_0\n---\n")
    # Python access to the same weights: transformers' GGUF loader, dequantized
    model = qconv.load_model(out, device="cpu", dtype=torch.float32)
    assert model.config.vocab_size == VOCAB and not model.training


def test_quantized_gguf_source_is_requantized_with_a_warning(cli, tiny_source, tmp_path):
    first = tmp_path / "q4"
    cli(
        "convert",
        tiny_source,
        "-o",
        first,
        "--method",
        "gguf",
        "--type",
        "Q4_0",
        "--solver",
        "llama",
        "--no-verify",
    )
    out = tmp_path / "q8"
    result = cli(
        "convert",
        first / "tiny-llama-Q4_0.gguf",
        "-o",
        out,
        "--method",
        "gguf",
        "--type",
        "Q8_0",
        "--no-verify",
    )
    assert (
        result.stderr.startswith("warning: ")
        and "holds Q4_0, Q6_K tensors: re-quantizing them adds error" in result.stderr
    )
    assert (out / "tiny-llama-Q8_0.gguf").is_file()


# -- bad input: one line, exit 2, nothing written ------------------------------------------------
def _refused(cli, tmp_path, *args) -> str:
    out = tmp_path / "out"
    result = cli("convert", *args, "-o", out, ok=None)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    return result.stderr.strip()


def test_unknown_type_is_refused(cli, tiny_source, tmp_path):
    message = _refused(cli, tmp_path, tiny_source, "--method", "gguf", "--type", "Q9_9")
    assert message == (
        "Error: --method gguf: --type Q9_9 is not supported; choose from " + ", ".join(FILE_TYPES)
    )


def test_unknown_solver_is_refused(cli, tiny_source, tmp_path):
    message = _refused(cli, tmp_path, tiny_source, "--method", "gguf", "--solver", "hqq")
    assert message == "Error: --method gguf: --solver hqq is not supported; choose from qconv, llama"


def test_architecture_llama_cpp_or_qconv_does_not_know_is_refused(cli, tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    source = tmp_path / "opt"
    config = OPTConfig(
        hidden_size=64, ffn_dim=128, num_hidden_layers=1, num_attention_heads=2, vocab_size=512
    )
    OPTForCausalLM(config).save_pretrained(source)
    train_sentencepiece(source, vocab_size=512)
    message = _refused(cli, tmp_path, source, "--method", "gguf")
    assert message.startswith(f"Error: {source}: ") and "'opt'" in message and "supported:" in message, (
        message
    )


def test_truncated_gguf_source_is_refused(cli, tiny_source, tmp_path):
    first = tmp_path / "q8"
    cli(
        "convert",
        tiny_source,
        "-o",
        first,
        "--method",
        "gguf",
        "--type",
        "Q8_0",
        "--solver",
        "llama",
        "--no-verify",
    )
    broken = tmp_path / "broken.gguf"
    data = (first / "tiny-llama-Q8_0.gguf").read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    message = _refused(cli, tmp_path, broken, "--method", "gguf")
    assert message.startswith(f"Error: {broken}"), message


def test_existing_output_is_refused(cli, tiny_source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = cli("convert", tiny_source, "-o", out, "--method", "gguf", ok=None)
    assert result.exit_code == 2
    assert result.stderr.strip() == f"Error: {out}: already exists (use --force to replace it)"
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "model_type, sizes",
    [
        ("gemma2", dict(head_dim=64, query_pre_attn_scalar=64, sliding_window=32)),
        ("qwen3", dict(head_dim=64)),
        ("phi3", dict()),  # a SentencePiece vocabulary holding Phi-3's named tokens
    ],
)
def test_other_architectures_convert_and_verify_in_llama_cpp(cli, tmp_path, model_type, sizes):
    """The same path for every architecture qconv describes (formats/gguf_metadata.py's own tests
    check each one's logits in llama.cpp against transformers on float weights): a tiny random
    model through `qconv convert --method gguf`, verified by llama.cpp."""
    pytest.importorskip("sentencepiece")
    from transformers import AutoConfig, AutoModelForCausalLM

    source = tmp_path / model_type
    source.mkdir()
    phi3_tokens = ("<|endoftext|>",) if model_type == "phi3" else ()
    train_sentencepiece(
        source, vocab_size=VOCAB, dummy_prefix=model_type != "gemma2", user_symbols=phi3_tokens
    )
    config = AutoConfig.for_model(
        model_type,
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **sizes,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(source)
    out = tmp_path / "out"
    cli(
        "convert",
        source,
        "-o",
        out,
        "--method",
        "gguf",
        "--type",
        "Q8_0",
        "--solver",
        "llama",
        "--device",
        "cpu",
    )
    manifest = json.loads((out / "qconv.json").read_text())
    assert manifest["verify"]["passed"], manifest["verify"]["checks"]
    assert manifest["recipe"]["gguf_architecture"] == model_type


def test_phi3_named_model_without_its_tokens_is_refused(cli, tmp_path):
    """llama.cpp looks up </s>, <unk>, <s> and <|endoftext|> by text in the vocabulary of any model
    whose name contains "phi3" (llama-vocab.cpp) and fails to load the file when one is missing:
    qconv refuses before writing, in one line."""
    pytest.importorskip("sentencepiece")
    from transformers import AutoConfig, AutoModelForCausalLM

    source = tmp_path / "my-phi3-mini"
    source.mkdir()
    train_sentencepiece(source, vocab_size=VOCAB, dummy_prefix=True)
    config = AutoConfig.for_model(
        "phi3",
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(source)
    message = _refused(cli, tmp_path, source, "--method", "gguf", "--type", "Q8_0")
    assert message == (
        f"Error: {source}: llama.cpp expects the tokens </s>, <unk>, <s>, <|endoftext|> in the vocabulary of a "
        "model named like Phi-3 ('my-phi3-mini'), and this tokenizer lacks <|endoftext|>: llama.cpp could not "
        "load the file"
    )
