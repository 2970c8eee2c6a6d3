"""GGUF metadata, tensor names and transforms: a GGUF written from them must load in llama.cpp and
compute what transformers computes.

The loader is llama.cpp itself (llama-cpp-python). Each architecture gets a tiny random model built here
with transformers, written as an F32 GGUF with ``gguf.GGUFWriter`` from ``describe_hf``'s metadata,
tensor names and transforms; llama.cpp's logits for a few tokens must equal transformers' (float32).
Tolerance: both sides compute in float32 (llama.cpp's KV cache too, set here) with different summation
orders; measured relative L2 ~6e-7, so 1e-5 catches any layout or formula mistake (a wrong rotary
permutation or norm offset is O(1)). Gemma's GELU is the exception: ggml's CPU GELU reads a float16
table, measured 2e-4..4e-4, so 1e-3 there.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import train_sentencepiece

from qconv import llamacpp
from qconv.errors import UsageError
from qconv.formats.gguf_metadata import describe_gguf, describe_hf
from qconv.llamacpp import open_llama

MISSING = "needs llama-cpp-python (pip install -e '.[llama]'; make test installs it)"
needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason=MISSING)
TOLERANCE = 1e-5
GELU_TOLERANCE = 1e-3  # ggml_vec_gelu_f32 goes through a float16 table
IDS = [1, 504, 3458, 314, 2190, 28, 975, 4566, 30, 17, 99, 1000]  # ids valid in every test vocabulary


def relative_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def smollm2_source(smollm2_gguf):
    """The real SmolLM2 gguf through qconv's GGUF source reader, opened once (it takes seconds)."""
    from qconv.sources import open_source

    source = open_source(smollm2_gguf)
    yield source
    source.close()


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_source, tmp_path_factory) -> Path:
    """SmolLM2's real byte-level BPE tokenizer (49152 tokens), rebuilt by transformers from the gguf."""
    folder = tmp_path_factory.mktemp("smollm2-tokenizer")
    smollm2_source.write_support_files(folder)
    return folder


def tiny_model(model_type: str, seed: int = 0, **overrides):
    """A random causal LM of ``model_type``, float32, with every norm weight and bias moved off its
    initial value (so that a missing norm offset or bias shows in the logits) and weights large enough
    for attention to be far from uniform (so that a wrong q/k layout shows)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.1,
    )
    config = AutoConfig.for_model(model_type, **{**sizes, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(0.1 * torch.randn_like(param))
    return model


def saved_config(model, folder: Path) -> dict:
    """The config.json transformers writes for the model (the dict qconv reads from a source)."""
    model.config.to_json_file(folder / "config.json")
    return json.loads((folder / "config.json").read_text())


def write_gguf(path: Path, description, state: dict[str, torch.Tensor], *, exact: bool = False) -> None:
    """An F32 GGUF from a description: the metadata() pairs (or add_metadata for an exact copy), every
    tensor under tensor_name() with transform() applied, and the extra tensors."""
    writer = gguf.GGUFWriter(path, description.arch)
    if exact:
        description.add_metadata(writer)
    else:
        for key, value, vtype in description.metadata():
            if key != "general.architecture":  # the writer's constructor wrote it
                writer.add_key_value(key, value, vtype)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for hf_name, tensor in state.items():
        gguf_name = description.tensor_name(hf_name)
        if gguf_name is not None:
            writer.add_tensor(gguf_name, description.transform(hf_name, tensor).numpy())
    for gguf_name, tensor in description.extra_tensors():
        writer.add_tensor(gguf_name, tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llama_cpp_logits(path: Path, ids: list[int]) -> np.ndarray:
    # qconv's own opening (extra buffer types off: AMX crashes here; float32 KV cache: the default
    # float16 cache alone costs ~5e-4 relative error)
    with open_llama(path, n_ctx=64) as llm:
        return llamacpp.logits(llm, ids)


def llama_cpp_tokens(path: Path, text: str) -> list[int]:
    with open_llama(path, n_ctx=64, logits_all=False, vocab_only=True) as llm:
        return llm.tokenize(text.encode(), add_bos=False, special=False)


def check_logits(tmp_path: Path, model, config: dict, tokenizer: Path, ids=IDS) -> Path:
    tolerance = (
        GELU_TOLERANCE
        if "gelu" in str(config.get("hidden_activation") or config.get("hidden_act"))
        else TOLERANCE
    )
    description = describe_hf(config, tokenizer, "tiny")
    path = tmp_path / "model.gguf"
    write_gguf(path, description, {k: v.detach() for k, v in model.state_dict().items()})
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    got = llama_cpp_logits(path, ids)
    assert got.shape == expected.shape
    assert relative_l2(got, expected) < tolerance
    return path


# --- BPE tokenizer (SmolLM2's): one test an architecture ------------------------------------------------

BPE_ARCHITECTURES = {
    # untied lm_head, head_dim not hidden/heads (output.weight, key_length/value_length), Llama 3.1's
    # rope scaling (rope_freqs.weight) with wavelengths on both sides of the original context
    "llama": dict(
        tie_word_embeddings=False,
        head_dim=32,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=100.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=16,
        ),
    ),
    "mistral": dict(tie_word_embeddings=True, sliding_window=None),
    "qwen2": dict(tie_word_embeddings=True),  # q/k/v biases
    "qwen3": dict(tie_word_embeddings=False, head_dim=32),  # q_norm / k_norm
    # soft-capping (caps low enough to bend the values), sliding window shorter than the text, post
    # norms, norm + 1
    "gemma2": dict(
        head_dim=16,
        sliding_window=4,
        query_pre_attn_scalar=16,
        attn_logit_softcapping=2.0,
        final_logit_softcapping=1.0,
    ),
    # 6 layers: 5 sliding (local rope base) and one global; q/k norms
    "gemma3_text": dict(
        head_dim=16,
        sliding_window=4,
        num_hidden_layers=6,
        query_pre_attn_scalar=16,
        final_logit_softcapping=1.0,
    ),
    "phi3": dict(tie_word_embeddings=False, num_key_value_heads=4, pad_token_id=0),  # fused qkv / gate_up
}


@needs_llama_cpp
@pytest.mark.parametrize("model_type", sorted(set(BPE_ARCHITECTURES) - {"gemma2"}))
def test_bpe_architecture_matches_transformers(model_type, smollm2_tokenizer, tmp_path):
    model = tiny_model(model_type, vocab_size=49152, **BPE_ARCHITECTURES[model_type])
    config = saved_config(model, tmp_path)
    tokenizer = smollm2_tokenizer
    if model_type == "phi3":
        # llama.cpp reads phi3's vocabulary as BPE for a GPT2Tokenizer only (Phi-4's), else from
        # tokenizer.model; transformers 5 saved SmolLM2's as TokenizersBackend
        tokenizer = tmp_path / "tokenizer"
        shutil.copytree(smollm2_tokenizer, tokenizer)
        tokenizer_config = json.loads((tokenizer / "tokenizer_config.json").read_text())
        tokenizer_config["tokenizer_class"] = "GPT2Tokenizer"
        (tokenizer / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    check_logits(tmp_path, model, config, tokenizer)


@needs_llama_cpp
def test_bpe_tokenizer_matches_transformers(smollm2_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    model = tiny_model("llama", vocab_size=49152, num_hidden_layers=1)
    description = describe_hf(saved_config(model, tmp_path), smollm2_tokenizer, "tiny")
    kv = {key: value for key, value, _ in description.metadata()}
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "smollm"
    path = tmp_path / "model.gguf"
    write_gguf(path, description, {k: v.detach() for k, v in model.state_dict().items()})
    text = "Hello world! The capital of France is Paris; 1234 apples, naïve café.\n  x"
    expected = AutoTokenizer.from_pretrained(smollm2_tokenizer)(text, add_special_tokens=False).input_ids
    assert llama_cpp_tokens(path, text) == expected


def test_metadata_keys_and_names(smollm2_tokenizer, tmp_path):
    model = tiny_model("qwen3", vocab_size=49152, tie_word_embeddings=True, head_dim=32)
    description = describe_hf(saved_config(model, tmp_path), smollm2_tokenizer, "tiny")
    kv = {key: value for key, value, _ in description.metadata()}
    assert kv["general.architecture"] == "qwen3" and kv["general.name"] == "tiny"
    assert kv["qwen3.block_count"] == 2 and kv["qwen3.attention.head_count_kv"] == 2
    assert kv["qwen3.attention.key_length"] == 32 and kv["qwen3.attention.value_length"] == 32
    assert len(kv["tokenizer.ggml.tokens"]) == 49152 and kv["tokenizer.ggml.merges"]
    assert "general.file_type" not in kv and "general.quantization_version" not in kv
    assert (description.n_layer, description.n_head, description.n_head_kv, description.n_expert) == (
        2,
        4,
        2,
        0,
    )
    assert description.tensor_name("model.layers.1.self_attn.k_norm.weight") == "blk.1.attn_k_norm.weight"
    assert description.tensor_name("lm_head.weight") is None  # tied
    assert description.tensor_name("model.rotary_emb.inv_freq") is None
    with pytest.raises(UsageError, match="'model.layers.0.mystery.weight'"):
        description.tensor_name("model.layers.0.mystery.weight")


def test_mistral_sliding_window_dropped_with_a_warning(smollm2_tokenizer):
    from transformers import AutoConfig

    config = AutoConfig.for_model(
        "mistral", vocab_size=49152, hidden_size=64, num_hidden_layers=1, sliding_window=4096
    ).to_dict()
    with pytest.warns(UserWarning, match="mistral sliding_window 4096 is not in the GGUF"):
        description = describe_hf(config, smollm2_tokenizer, "tiny")
    assert description.arch == "llama"
    assert not any("sliding_window" in key for key, _, _ in description.metadata())


def test_unknown_architecture_is_refused_in_one_line(tmp_path):
    with pytest.raises(UsageError) as caught:
        describe_hf({"model_type": "mamba2", "num_hidden_layers": 2}, tmp_path, "tiny")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("llama.cpp/qconv does not know architecture 'mamba2'")
    assert "supported: gemma2, gemma3_text, llama, mistral, phi3, qwen2, qwen3" in message


def test_missing_tokenizer_is_refused(tmp_path):
    model = tiny_model("llama", vocab_size=300, num_hidden_layers=1)
    with pytest.raises(UsageError, match="no tokenizer.json or tokenizer.model"):
        describe_hf(saved_config(model, tmp_path), tmp_path, "tiny")


def test_unknown_pre_tokenizer_is_refused_as_llama_cpp_does(tmp_path):
    """A byte-level BPE whose check-text ids llama.cpp's table does not have: convert_hf_to_gguf.py
    raises, since llama.cpp would split text differently; so does qconv."""
    from conftest import add_tiny_tokenizer

    add_tiny_tokenizer(tmp_path, vocab_size=300)
    model = tiny_model("llama", vocab_size=300, num_hidden_layers=1)
    with pytest.raises(UsageError, match="does not know this BPE pre-tokenizer"):
        describe_hf(saved_config(model, tmp_path), tmp_path, "tiny")


def test_tokenizer_model_llama_cpp_cannot_take_is_refused(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    unigram = Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0), ("b", -2.0)], unk_id=0))
    PreTrainedTokenizerFast(tokenizer_object=unigram, unk_token="<unk>").save_pretrained(tmp_path)
    model = tiny_model("qwen2", vocab_size=3, num_hidden_layers=1)
    with pytest.raises(
        UsageError, match="tokenizer.json holds a Unigram tokenizer; llama.cpp's converter takes"
    ):
        describe_hf(saved_config(model, tmp_path), tmp_path, "tiny")


def test_gemma2_without_tokenizer_model_is_refused(smollm2_tokenizer, tmp_path):
    model = tiny_model("gemma2", vocab_size=49152, **BPE_ARCHITECTURES["gemma2"])
    with pytest.raises(UsageError, match="gemma2 needs tokenizer.model"):
        describe_hf(saved_config(model, tmp_path), smollm2_tokenizer, "tiny")


# --- SentencePiece-style tokenizers ----------------------------------------------------------------------


@needs_llama_cpp
def test_gemma2_sentencepiece_matches_transformers(tmp_path):
    spm = pytest.importorskip("sentencepiece", reason="needs sentencepiece to train a tokenizer.model")
    train_sentencepiece(tmp_path, vocab_size=1024)
    model = tiny_model("gemma2", vocab_size=1024, **BPE_ARCHITECTURES["gemma2"])
    path = check_logits(tmp_path, model, saved_config(model, tmp_path), tmp_path, ids=[i % 1024 for i in IDS])
    text = "The capital of France is Paris, and 1234 apples."
    processor = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert llama_cpp_tokens(path, text) == processor.encode(text)


@needs_llama_cpp
def test_llama_sentencepiece_matches_transformers(tmp_path):
    spm = pytest.importorskip("sentencepiece", reason="needs sentencepiece to train a tokenizer.model")
    train_sentencepiece(tmp_path, vocab_size=1024, dummy_prefix=True)
    model = tiny_model("llama", vocab_size=1024, tie_word_embeddings=True)
    config = saved_config(model, tmp_path)
    kv = {key: value for key, value, _ in describe_hf(config, tmp_path, "tiny").metadata()}
    assert kv["tokenizer.ggml.model"] == "llama" and len(kv["tokenizer.ggml.scores"]) == 1024
    path = check_logits(tmp_path, model, config, tmp_path, ids=[i % 1024 for i in IDS])
    text = "The capital of France is Paris, and 1234 apples."
    processor = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert llama_cpp_tokens(path, text) == processor.encode(text)


@needs_llama_cpp
def test_llama_hf_sentencepiece_style_tokenizer_json(tmp_path):
    """A Llama whose tokenizer.json is SentencePiece-style BPE (byte fallback) and has no
    tokenizer.model: read through gguf's LlamaHfVocab as llama.cpp does, tokenizer model "llama"."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from qconv.calibration import default_text_path

    tokenizer = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    specials = ["<unk>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=specials + [f"<0x{b:02X}>" for b in range(256)],
        show_progress=False,
    )
    tokenizer.train_from_iterator([default_text_path().read_text(encoding="utf-8")[:30_000]], trainer=trainer)
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(tmp_path)
    n_vocab = tokenizer.get_vocab_size()
    model = tiny_model("llama", vocab_size=n_vocab, tie_word_embeddings=True)
    config = saved_config(model, tmp_path)
    description = describe_hf(config, tmp_path, "tiny")
    kv = {key: value for key, value, _ in description.metadata()}
    assert kv["tokenizer.ggml.model"] == "llama" and kv["tokenizer.ggml.pre"] == "default"
    assert kv["tokenizer.ggml.bos_token_id"] == 1 and kv["tokenizer.ggml.eos_token_id"] == 2
    path = check_logits(tmp_path, model, config, tmp_path, ids=[i % n_vocab for i in IDS])
    text = "The capital of France is Paris, and 1234 apples."
    expected = AutoTokenizer.from_pretrained(tmp_path)(text, add_special_tokens=False).input_ids
    assert llama_cpp_tokens(path, text) == expected


# --- GGUF source -----------------------------------------------------------------------------------------


@needs_llama_cpp
def test_gguf_source_round_trip(smollm2_gguf, smollm2_source, tmp_path):
    """SmolLM2's Q4_1 gguf read through qconv's GGUF source (HF names, q/k un-permuted, dequantized),
    written back as F32 with describe_gguf: llama.cpp computes what it computes on the source file.
    The F32 values are exactly the dequantized Q4_1/Q8_0 ones, so only ggml's quantized-vs-float dot
    products differ (Q4_1 x Q8_1 activations on the source side): a few per cent at most, far from a
    wrong layout (O(1))."""
    reader = gguf.GGUFReader(smollm2_gguf)
    description = describe_gguf(reader, "SmolLM2")
    state = {info.name: smollm2_source.read(info.name).float() for info in smollm2_source.tensors()}
    path = tmp_path / "roundtrip.gguf"
    write_gguf(path, description, state, exact=True)

    copied = gguf.GGUFReader(path)
    skipped = ("GGUF.", "general.file_type", "general.quantization_version")
    for key, field in reader.fields.items():
        if not key.startswith(skipped):
            assert copied.fields[key].types == field.types, key
            assert [bytes(copied.fields[key].parts[i]) for i in copied.fields[key].data] == [
                bytes(field.parts[i]) for i in field.data
            ], key
    assert sorted(t.name for t in copied.tensors) == sorted(t.name for t in reader.tensors)
    # every value is the source's dequantized value, in llama.cpp's layout (q/k permuted back)
    written = {t.name: t for t in copied.tensors}
    for tensor in reader.tensors:
        source_values = gguf.dequantize(tensor.data, tensor.tensor_type)
        np.testing.assert_array_equal(
            np.asarray(written[tensor.name].data), source_values, err_msg=tensor.name
        )

    ids = IDS[:8]
    expected = llama_cpp_logits(smollm2_gguf, ids)
    got = llama_cpp_logits(path, ids)
    assert relative_l2(got, expected) < 0.05
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.75
