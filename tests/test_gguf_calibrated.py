"""Calibrated GGUF (issue 17): GPTQ into GGML block bytes (formats/gguf_gptq.py) and
``qconv convert --method gguf --calibration`` end to end, verified by llama.cpp.

The solver on fixed problems for every block type qconv writes; conversions of tiny random
Llamas carrying SmolLM2's real tokenizer (llama.cpp recognises its BPE pre-tokenizer, and the
calibration text is tokenized with it): rows of 256/512 (k-quants) and rows of 192/384, where
llama.cpp's mixes fall back to the legacy 32-value types; kill -9 and --resume; the bad inputs."""

from __future__ import annotations

import json
import shutil

import gguf_reference
import pytest
import torch
from conftest import convert_killed_after_first_block

from qconv.formats import get_format, gguf_gptq
from qconv.formats.format_gguf import QUANTIZERS
from qconv.formats.gptq import output_error

pytestmark = pytest.mark.skipif(not gguf_reference.available(), reason=gguf_reference.MISSING)

GGUF = get_format("gguf")
WIKITEXT_SHA256 = "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8"
CALIBRATED = ["--device", "cpu", "--calibration", "wikitext2", "--calib-tokens", "1024"]


def _problem(out=32, inputs=512, seed=0):
    """A weight with a few outliers and inputs with correlated, unevenly scaled features."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, inputs, generator=generator) * 0.02
    weight.view(-1)[::97] *= 8
    mix = torch.randn(inputs, inputs, generator=generator) * 0.1 + torch.eye(inputs)
    x = torch.randn(2048, inputs, generator=generator) @ mix
    x[:, :8] *= 10  # a few loud input features, as LLM activations have
    return weight, x.t() @ x / x.shape[0]


# -- the solver ---------------------------------------------------------------------------------
@pytest.mark.parametrize("ggml_type", gguf_gptq.TYPES)
def test_gptq_bytes_dequantize_to_the_walks_values_and_beat_the_data_free_solver(ggml_type):
    """The gguf package's own dequantizer gives back exactly the values the walk fed its error
    from; the H-weighted output error is below half the data-free qconv solver's."""
    weight, xtx = _problem()
    data, values = gguf_gptq.quantize_gptq_gguf(weight, xtx, ggml_type)
    data_free = QUANTIZERS[ggml_type](weight, "qconv")
    assert data.dtype == torch.uint8 and data.shape == data_free.shape
    stored = gguf_gptq.dequantize_bytes(data, ggml_type, tuple(weight.shape))
    assert torch.equal(stored, values)
    calibrated = output_error(weight, stored, xtx)
    free = output_error(weight, gguf_gptq.dequantize_bytes(data_free, ggml_type, tuple(weight.shape)), xtx)
    assert calibrated < 0.5 * free, (calibrated, free)


def test_gptq_is_deterministic_and_refuses_partial_blocks():
    weight, xtx = _problem(out=8, inputs=256)
    first, second = (gguf_gptq.quantize_gptq_gguf(weight, xtx, "Q4_K")[0] for _ in range(2))
    assert torch.equal(first, second)
    with pytest.raises(ValueError, match="96 inputs do not split into Q4_K blocks of 256"):
        gguf_gptq.quantize_gptq_gguf(weight[:, :96], xtx[:96, :96], "Q4_K")


# -- conversions --------------------------------------------------------------------------------
def _tiny_llama(folder, tokenizer, hidden: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152,  # SmolLM2's tokenizer
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,  # one vocabulary-sized tensor to quantize, not two
    )
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    for file in tokenizer.iterdir():
        shutil.copy(file, folder / file.name)
    return folder


def _sentencepiece_llama(folder):
    """tests/test_gguf.py's source: a SentencePiece vocabulary of 512 (llama.cpp reads it; this
    transformers does not tokenize with a bare tokenizer.model)."""
    from conftest import train_sentencepiece
    from transformers import LlamaConfig, LlamaForCausalLM

    pytest.importorskip("sentencepiece")
    folder.mkdir()
    train_sentencepiece(folder, vocab_size=512, dummy_prefix=True)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
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
def smollm2_tokenizer(smollm2_gguf, tmp_path_factory):
    from qconv.sources import open_source

    folder = tmp_path_factory.mktemp("smollm2-tokenizer")
    with open_source(str(smollm2_gguf)) as source:
        source.write_support_files(folder)
    return folder


@pytest.fixture(scope="module")
def llama256(smollm2_tokenizer, tmp_path_factory):
    """Rows of 256 and 512: the k-quants apply."""
    return _tiny_llama(tmp_path_factory.mktemp("src") / "tiny-256", smollm2_tokenizer, 256, 2)


@pytest.fixture(scope="module")
def llama192(smollm2_tokenizer, tmp_path_factory):
    """Rows of 192 and 384 (not multiples of 256, as SmolLM2's 576): llama.cpp's legacy fallbacks."""
    return _tiny_llama(tmp_path_factory.mktemp("src") / "tiny-192", smollm2_tokenizer, 192, 3)


def _check_layers(source, out, count: int, types: set[str]) -> dict:
    """Every block Linear was calibrated, in the planned types; on the first block (whose inputs
    quantization does not change) each layer's output error under the calibration inputs'
    token-weighted H (each token weighs 1 + the attention it receives, gguf_calibrated.py),
    recomputed here from the GGUF file as the gguf package reads it, is the manifest's and below
    the data-free qconv solver's bytes of the same type."""
    from torch import nn

    from qconv.calibration import BlockRunner, load_calibration
    from qconv.gguf_export import StoredGGUF, describe_source
    from qconv.sources import open_source

    manifest = json.loads((out / "qconv.json").read_text())
    calibrated = {name: e for name, e in manifest["layers"].items() if "rel_output_error" in e}
    assert len(calibrated) == count
    assert {e["format"] for e in calibrated.values()} == types
    for name, entry in calibrated.items():
        assert entry["rel_output_error"] < entry["data_free_rel_output_error"], name
    prefix = "model.layers.0."
    with open_source(str(source)) as src:
        model = describe_source(src, out / "scratch")
        stored = StoredGGUF(sorted(out.glob("*.gguf")), model)
        calib = load_calibration(src, "wikitext2", 1024, 256)
        runner = BlockRunner(src, torch.device("cpu"))
        hidden, kwargs = runner.first_inputs(calib.ids)
        block = runner.load_block(0)
        names = [prefix + n for n, m in block.named_modules() if isinstance(m, nn.Linear)]
        from qconv.formats.token_weights import collect_statistics

        outputs = torch.empty_like(hidden)
        statistics = collect_statistics(block, prefix, names, hidden, kwargs[0], outputs)
        # the eager pass that gave the attention weights computed the block's own outputs
        assert statistics.attention_seen
        torch.testing.assert_close(outputs, BlockRunner.run(block, hidden, kwargs[0]), rtol=1e-4, atol=1e-4)
        # inside the attention, w_t = 1 + attention received: every query hands out 1 in all, so
        # the weights sum to 2 per token; the MLP's Linears weigh each token 1
        tokens = hidden.shape[0] * hidden.shape[1]
        assert statistics.weighted_names == {prefix + f"self_attn.{p}_proj" for p in "qkvo"}
        assert {name: total / tokens for name, total in statistics.weight_sums.items()} == {
            name: pytest.approx(2.0 if ".self_attn." in name else 1.0) for name in names
        }
        for name in names:
            weight = block.get_submodule(name[len(prefix) :]).weight.detach().float()
            xtx = statistics.pop(name)
            error = output_error(weight, stored.read(name + ".weight", tuple(weight.shape)), xtx)
            assert error == pytest.approx(calibrated[name]["rel_output_error"], rel=1e-3), name
            ggml_type = calibrated[name]["format"]
            free = gguf_gptq.dequantize_bytes(QUANTIZERS[ggml_type](weight, "qconv"), ggml_type, weight.shape)
            assert error < 0.8 * output_error(weight, free, xtx), name
    shutil.rmtree(out / "scratch")
    return manifest


def test_calibrated_k_quants_verify_in_llama_cpp_and_record_the_calibration(cli, llama256, tmp_path):
    out = tmp_path / "out"
    _, doc = cli.json("convert", llama256, "-o", out, "--method", "gguf", "--type", "Q4_K_M", *CALIBRATED)
    assert doc["verify"]["passed"], doc["verify"]
    # llama.cpp (qconv.llamacpp.open_llama) against qconv's float32 reference of the same bytes
    assert doc["verify"]["logits"]["loader_rel_diff"] < GGUF.loader_tolerance({"type": "Q4_K_M"})
    manifest = _check_layers(llama256, out, 14, {"Q4_K", "Q6_K"})
    calibration = manifest["calibration"]
    assert calibration["text"] == "wikitext2-validation" and calibration["sha256"] == WIKITEXT_SHA256
    assert (calibration["solver"], calibration["sequences"], calibration["tokens"]) == ("gptq", 4, 1024)
    assert set(calibration["blocks"]) == {"model.layers.0", "model.layers.1"}
    recipe = manifest["recipe"]
    assert recipe["label"] == "gguf Q4_K_M gptq" and recipe["solver"] == "qconv"
    assert recipe["calibration"] == {"text": "wikitext2-validation", "tokens": 1024, "seqlen": 256}
    assert "rel_output_error" not in manifest["layers"]["model.embed_tokens"]  # outside the blocks
    assert not (tmp_path / ".out.qconv-checkpoint").exists()
    shown = cli("show", out).stdout
    assert "gptq" in shown and WIKITEXT_SHA256 in shown


def test_calibrated_legacy_fallbacks_verify_in_llama_cpp(cli, llama192, tmp_path):
    out = tmp_path / "out"
    _, doc = cli.json("convert", llama192, "-o", out, "--method", "gguf", "--type", "Q3_K_M", *CALIBRATED)
    assert doc["verify"]["passed"], doc["verify"]
    _check_layers(llama192, out, 21, {"Q4_0", "Q5_0", "Q5_1"})


def test_killed_calibration_resumes_to_the_same_bytes(cli, llama192, tmp_path):
    """kill -9 after the first block's checkpoint, --resume: the same GGUF bytes as an
    uninterrupted run (CPU)."""
    whole = tmp_path / "whole"
    args = ["--method", "gguf", "--type", "Q4_0", *CALIBRATED, "--no-verify", "--no-record"]
    assert cli("convert", llama192, "-o", whole, *args).exit_code == 0

    out = tmp_path / "resumed"
    checkpoint = tmp_path / ".resumed.qconv-checkpoint"
    assert 1 <= convert_killed_after_first_block(llama192, out, args) < 3

    other = [a if a != "Q4_0" else "Q5_0" for a in args]  # another recipe: refused
    mismatch = cli("convert", llama192, "-o", out, *other, "--resume", ok=None)
    assert mismatch.exit_code == 2
    assert "the checkpoint was made from another source, recipe or calibration text" in mismatch.output

    resumed = cli("convert", llama192, "-o", out, *args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    name = "tiny-192-Q4_0.gguf"
    assert (whole / name).read_bytes() == (out / name).read_bytes()
    assert not checkpoint.exists()


def test_calibration_none_writes_todays_bytes(cli, tmp_path):
    """``--calibration none`` is the data-free recipe, and the very same file."""
    assert GGUF.make_recipe({"calibration": "none"}) == GGUF.make_recipe({})
    assert "calibration" not in GGUF.make_recipe({})
    source = _sentencepiece_llama(tmp_path / "tiny-llama")
    args = ["--method", "gguf", "--type", "Q4_K_M", "--device", "cpu", "--no-verify", "--no-record"]
    cli("convert", source, "-o", tmp_path / "a", *args)
    cli("convert", source, "-o", tmp_path / "b", *args, "--calibration", "none")
    name = "tiny-llama-Q4_K_M.gguf"
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


# -- bad input ----------------------------------------------------------------------------------
def test_a_source_without_usable_tokenizer_cannot_be_calibrated(cli, tmp_path):
    """A SentencePiece-only source that llama.cpp reads but transformers does not tokenize with."""
    source = _sentencepiece_llama(tmp_path / "tiny-llama")
    args = ["--method", "gguf", *CALIBRATED]
    result = cli("convert", source, "-o", tmp_path / "out", *args, ok=None)
    assert result.exit_code == 2
    error = result.stderr.strip()
    assert error.startswith(f"Error: {source}: no usable tokenizer for the calibration text (")
    assert error.endswith("); --calibration none quantizes from the weights alone"), error
    assert len(error.splitlines()) == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.qconv-checkpoint").exists()


@pytest.mark.parametrize(
    "content,message",
    [
        (b"A short text .", "Error: --calibration {path}: {count} tokens, fewer than one sequence of 256"),
        (
            b"\xff\xfe not UTF-8",
            "Error: --calibration {path}: cannot read the text ('utf-8' codec can't decode byte 0xff in "
            "position 0: invalid start byte)",
        ),
    ],
    ids=["short", "not-utf8"],
)
def test_bad_calibration_text(cli, llama256, tmp_path, content, message):
    from transformers import AutoTokenizer

    path = tmp_path / "calib.txt"
    path.write_bytes(content)
    args = ["--method", "gguf", "--device", "cpu", "--calibration", path, "--calib-tokens", "1024"]
    result = cli("convert", llama256, "-o", tmp_path / "out", *args, ok=None)
    assert result.exit_code == 2
    count = len(AutoTokenizer.from_pretrained(str(llama256))(content.decode(errors="replace"))["input_ids"])
    assert result.stderr.strip() == message.format(path=path, count=count)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.qconv-checkpoint").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--calib-tokens", "1024"],
            "--calib-tokens needs calibration data: add --calibration FILE or wikitext2",
        ),
        (
            ["--calibration", "wikitext2", "--type", "BF16"],
            "--method gguf: --calibration does not apply to BF16: its weights are stored as floats, no "
            "block to fit",
        ),
        (
            ["--calibration", "wikitext2", "--solver", "llama"],
            "--method gguf: --solver llama is data-free; with --calibration the block Linears' solver is GPTQ",
        ),
        (
            ["--calibration", "wikitext2", "--calib-tokens", "1"],
            "--calib-tokens 1: give at least one sequence's worth",
        ),
    ],
)
def test_calibration_option_errors(cli, tmp_path, args, message):
    result = cli("convert", "unused-source", "-o", tmp_path / "out", "--method", "gguf", *args, ok=None)
    assert result.exit_code == 2
    assert result.stderr.strip() == "Error: " + message
    assert not (tmp_path / "out").exists()
