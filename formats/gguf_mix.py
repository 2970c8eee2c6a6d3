"""Which GGML type each tensor of a GGUF file gets for a llama.cpp file type ("mix"), as
``llama-quantize`` decides it.

A GGUF mix such as ``Q4_K_M`` is not one type: llama.cpp's quantizer (``src/llama-quant.cpp`` of
the llama.cpp that llama-cpp-python 0.3.36 vendors) keeps some tensors in float, gives the
output and token embeddings more bits, raises ``attn_v`` and ``ffn_down`` in chosen layers, and
falls back to another type when a row length is not a multiple of the type's block. This module
ports those rules, so that qconv writes the same types as ``convert_hf_to_gguf.py --outtype f16``
followed by ``llama-quantize MIX`` (the tests compare with llama.cpp's own ``llama_model_quantize``).

The entry point is :func:`tensor_types`. Its rules, upstream function by function:

- ``tensor_allows_quantization``: only tensors of at least 2 dimensions (as ggml counts them:
  trailing sizes of 1 do not count) whose name ends in ``weight`` are quantized, minus norms,
  MoE routers, position embeddings and a list of small tensors (:func:`_allows_quantization`).
  Every other tensor keeps its type in the input file, which is what ``convert_hf_to_gguf.py``
  wrote: F32 for 1-D tensors, norms, biases and a few forced kinds, else the intermediate type
  (F16) (:func:`_converted_type`). llama-quantize never changes an F32 1-D tensor.
- ``llama_tensor_get_type_impl``: the per-category rules of the mix (:func:`_mix_rule`),
  with its counters over ``attn_v`` tensors and ``ffn_down`` layers, counted in the order
  llama.cpp visits tensors (:func:`quantize_order`, not the file's order).
- ``tensor_type_fallback``: a k-quant whose 256-block does not divide the row length becomes a
  32-block legacy type (Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0), and a
  row length that 32 does not divide either is stored F16 (:func:`_fallback`).

Only the mixes in :data:`FILE_TYPES` are offered; for them the rules pick only F32, F16, BF16,
Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and Q2_K..Q6_K (IQ types, IQ4_NL included, appear only in the IQ
mixes; Q4_1/Q5_1 in a Q4_0/Q5_0 file only with an importance matrix).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from qconv.errors import SourceError, UsageError


@dataclass(frozen=True)
class FileType:
    """A llama.cpp file type: ``name`` as llama-quantize spells it, ``ftype`` the number in
    ``general.file_type`` (``enum llama_ftype``, include/llama.h), ``default_type`` the GGML type
    of its ordinary tensors (``llama_ftype_get_default_type``, src/llama-quant.cpp)."""

    name: str
    ftype: int
    default_type: str


FILE_TYPES: dict[str, FileType] = {
    ft.name: ft
    for ft in (
        FileType("F16", 1, "F16"),
        FileType("BF16", 32, "BF16"),
        FileType("Q8_0", 7, "Q8_0"),
        FileType("Q4_0", 2, "Q4_0"),
        FileType("Q4_1", 3, "Q4_1"),
        FileType("Q5_0", 8, "Q5_0"),
        FileType("Q5_1", 9, "Q5_1"),
        FileType("Q6_K", 18, "Q6_K"),
        FileType("Q5_K_S", 16, "Q5_K"),
        FileType("Q5_K_M", 17, "Q5_K"),
        FileType("Q4_K_S", 14, "Q4_K"),
        FileType("Q4_K_M", 15, "Q4_K"),
        FileType("Q3_K_S", 11, "Q3_K"),
        FileType("Q3_K_M", 12, "Q3_K"),
        FileType("Q3_K_L", 13, "Q3_K"),
        FileType("Q2_K", 10, "Q2_K"),
    )
}

# elements per block of each type the rules can name (ggml's type_traits, ggml/src/ggml.c)
BLOCK_SIZE: dict[str, int] = {
    "F32": 1,
    "F16": 1,
    "BF16": 1,
    "Q4_0": 32,
    "Q4_1": 32,
    "Q5_0": 32,
    "Q5_1": 32,
    "Q8_0": 32,
    "IQ4_NL": 32,
    "Q2_K": 256,
    "Q3_K": 256,
    "Q4_K": 256,
    "Q5_K": 256,
    "Q6_K": 256,
}
_FLOAT_TYPES = ("F32", "F16", "BF16")

# tensor_type_fallback (src/llama-quant.cpp): a 256-block type whose block does not divide the
# row length -> a 32-block type. (The IQ types' row, -> IQ4_NL, is left out: no offered mix
# picks an IQ type.)
_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


@dataclass(frozen=True)
class ModelFacts:
    """What llama.cpp's rules read about the model, from the GGUF metadata it writes.

    ``arch``: ``general.architecture`` ("llama", "qwen2"...). ``n_layer``: ``{arch}.block_count``
    (all blocks, MTP/NextN ones included: llama.cpp's ``n_layer_all``). ``n_head`` and
    ``n_head_kv``: ``{arch}.attention.head_count`` / ``head_count_kv``, layer 0's where they are
    per layer (``n_gqa()`` reads layer 0); ``n_head_kv`` defaults to ``n_head`` as in llama.cpp.
    ``n_expert``: ``{arch}.expert_count`` (0 for a dense model). ``n_layer_nextn``:
    ``{arch}.nextn_predict_layers`` (only the 70B test reads it: llama.cpp counts those layers
    out when it names the model's size).

    Whether the model has an ``output.weight`` (tied embeddings when not) is read from the
    tensor list itself, as llama.cpp does.
    """

    arch: str
    n_layer: int
    n_head: int
    n_head_kv: int | None = None
    n_expert: int = 0
    n_layer_nextn: int = 0

    @property
    def n_gqa(self) -> int:
        """Query heads per KV head (``llama_hparams::n_gqa``; 0 without KV heads)."""
        n_head_kv = self.n_head if self.n_head_kv is None else self.n_head_kv
        return self.n_head // n_head_kv if n_head_kv else 0

    @property
    def is_70b(self) -> bool:
        """llama.cpp's model type is LLM_TYPE_70B (its attn_v then gets Q5_K over Q3_K/Q4_K):
        set in each architecture's ``load_arch_hparams`` (src/models/*.cpp) from the layer count."""
        n_layer = self.n_layer - self.n_layer_nextn
        if self.arch == "llama":
            n_head_kv = self.n_head if self.n_head_kv is None else self.n_head_kv
            return self.n_expert != 8 and n_layer == 80 and self.n_head != n_head_kv
        if self.arch in ("qwen2", "deci", "olmo"):
            return n_layer == 80
        if self.arch == "jais2":
            return n_layer == 68
        return False


def get_file_type(name: str) -> FileType:
    """The :class:`FileType` named ``name`` ("Q4_K_M"); an unknown name is a :class:`UsageError`
    listing the valid ones."""
    try:
        return FILE_TYPES[name]
    except KeyError:
        raise UsageError(
            f"unknown GGUF file type {name!r}; valid file types: {', '.join(FILE_TYPES)}"
        ) from None


# -- the order llama.cpp visits tensors in ---------------------------------------------------------

_LAYER = re.compile(r"blk\.\s*([+-]?\d+)")


def _layer_of(name: str) -> int | None:
    """The block number as ``sscanf(name, "blk.%d.", ...)`` reads it, None when it reads none."""
    match = _LAYER.match(name)
    return int(match.group(1)) if match else None


def quantize_order(names: Iterable[str]) -> list[str]:
    """``names`` in the order llama-quantize visits (and writes) tensors: its loader keeps them in a
    map ordered by block number (-1 for tensors outside blocks), then by name
    (``weight_name_comparer``, src/llama-model-loader.h). The attn_v and ffn_down counters of the
    mixes count in this order."""

    def key(name: str) -> tuple[int, bytes]:
        layer = _layer_of(name)
        return (-1 if layer is None else layer, name.encode())

    return sorted(names, key=key)


# -- which tensors are quantized -------------------------------------------------------------------

# substrings that keep a tensor out of quantization whatever the architecture
# (tensor_allows_quantization, src/llama-quant.cpp)
_NEVER_QUANTIZED = (
    "_norm.weight",
    "ffn_gate_inp.weight",  # MoE routers
    "ffn_gate_tid2eid.weight",
    "altup",
    "laurel",
    "per_layer_model_proj",
    "ssm_conv1d",
    "shortconv.conv.weight",
    "indexer.k_proj.weight",
    "indexer.q_proj.weight",
    "time_mix_first.weight",
    "time_mix_w0.weight",
    "time_mix_w1.weight",
    "time_mix_w2.weight",
    "time_mix_v0.weight",
    "time_mix_v1.weight",
    "time_mix_v2.weight",
    "time_mix_a0.weight",
    "time_mix_a1.weight",
    "time_mix_a2.weight",
    "time_mix_g1.weight",
    "time_mix_g2.weight",
    "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight",
    "attn_rel_b.weight",
    ".position_embd",
    "sam.pos_embd",
    "sam.neck.",
    "sam.net_",
    ".rel_pos",
    ".patch_embd",
    ".patch_merger",
    "a.rvq.codebook",
    "mm.a.code_embd",
)
_NEVER_QUANTIZED_NAMES = ("position_embd.weight", "token_types.weight")
_NEVER_QUANTIZED_GLM5_NEXT = (
    "hc_",
    "indexer.attn_q_b",
    "indexer.attn_k",
    "indexer.proj",
    "indexer_compressor_gate",
    "indexer_compressor_ape",
    "ssm_f_a.weight",
    "ssm_f_b.weight",
    "ssm_g_a.weight",
    "ssm_g_b.weight",
    "ssm_beta.weight",
    "attn_kv_a_mqa.weight",
    "attn_k_b.weight",
    "attn_v_b.weight",
)


def ggml_n_dims(shape: tuple[int, ...]) -> int:
    """Dimensions as ggml counts them (``ggml_n_dims``): trailing sizes of 1 in ggml's order,
    leading ones in torch's, do not count, so a [1, n] tensor is 1-D."""
    n = len(shape)
    while n > 1 and shape[len(shape) - n] == 1:
        n -= 1
    return max(n, 1)


def _allows_quantization(name: str, shape: tuple[int, ...], arch: str) -> bool:
    """``tensor_allows_quantization`` (src/llama-quant.cpp) with llama-quantize's default
    parameters (the output tensor is quantized, nothing is only copied)."""
    # upstream tests "ends with weight" as rfind("weight") == size - 6 on unsigned sizes, which
    # also holds for any 5-character name (npos == 5 - 6); ported as it behaves
    if ggml_n_dims(shape) < 2 or not (name.endswith("weight") or len(name.encode()) == 5):
        return False
    if name in _NEVER_QUANTIZED_NAMES or any(part in name for part in _NEVER_QUANTIZED):
        return False
    return not (arch == "glm5-next" and any(part in name for part in _NEVER_QUANTIZED_GLM5_NEXT))


# tensors convert_hf_to_gguf.py always writes in F32, as GGUF names (ModelBase.prepare_tensors,
# conversion/base.py: FFN_GATE_INP ... INDEXER_PROJ)
_CONVERTED_F32 = re.compile(
    r"(blk\.\d+\.(ffn_gate_inp|ffn_gate_inp_shexp|ssm_conv1d|shortconv\.conv|time_mix_first|time_mix_w1"
    r"|time_mix_w2|time_mix_decay_w1|time_mix_decay_w2|time_mix_lerp_fused|altup_correct_coef"
    r"|altup_predict_coef|ssm_conv1d_q|ssm_conv1d_k|ssm_conv1d_v|indexer\.proj)"
    r"|posnet\.\d+\.norm[12]|position_embd|token_types|v\.position_embd|a\.position_embd)\.weight"
)


def _converted_type(name: str, shape: tuple[int, ...], intermediate: str) -> str:
    """The type convert_hf_to_gguf.py gives a tensor when it writes the file llama-quantize reads
    (``ModelBase.prepare_tensors``): F32 for 1-D tensors (numpy's count of dimensions), norms,
    tensors whose name does not end in ``.weight`` (biases) and a list of small kinds; else the
    ``--outtype`` (``intermediate``)."""
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return "F32"
    if _CONVERTED_F32.fullmatch(name):
        return "F32"
    return intermediate


# -- the mix's rules -------------------------------------------------------------------------------


def _category(name: str) -> str:
    """``tensor_get_category`` (src/llama-quant.cpp): the first match wins, by substring."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for part, category in (
        ("attn_qkv.weight", "attn_qkv"),
        ("attn_kv_b.weight", "attn_kv_b"),
        ("attn_v.weight", "attn_v"),
        ("attn_k.weight", "attn_k"),
        ("attn_q.weight", "attn_q"),
        ("attn_output.weight", "attn_output"),
        ("ffn_up", "ffn_up"),
        ("ffn_gate", "ffn_gate"),
        ("ffn_down", "ffn_down"),
    ):
        if part in name:
            return category
    return "other"


# attn_qkv and attn_kv_b are "attn_v-like" (category_is_attn_v): they take attn_v's rules and
# counter, so the separate attn_qkv rules upstream (Q4_K_M -> Q5_K...) are never reached
_ATTN_V_LIKE = ("attn_v", "attn_qkv", "attn_kv_b")


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    """The layers the _M mixes give more bits (``use_more_bits`` in llama_tensor_get_type_impl):
    the first and last eighth, and every third layer between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


@dataclass
class _Counters:
    """``quantize_state_impl``'s counters: attn_v-like tensors seen so far and in all, and the
    ffn_down/gate/up tensors seen so far (their total is the block count)."""

    n_attention_wv: int
    i_attention_wv: int = 0
    i_ffn_down: int = 0
    i_ffn_gate: int = 0
    i_ffn_up: int = 0


def _layer_info(counter: int, name: str, facts: ModelFacts) -> tuple[int, int]:
    """(layer, layer count) of an ffn tensor (``layer_info``): the counter for a dense model; in a
    MoE model, whose experts are not in layer order, the block number in the name."""
    if facts.n_expert <= 1:
        return counter, facts.n_layer
    layer = _layer_of(name)
    if layer is None:
        raise SourceError(f"{name}: no block number in the name of an ffn tensor of a MoE model")
    if not 0 <= layer < facts.n_layer:
        raise SourceError(f"{name}: block {layer} outside the model's {facts.n_layer} blocks")
    return layer, facts.n_layer


def _mix_rule(
    mix: str,
    new_type: str,
    name: str,
    shape: tuple[int, ...],
    category: str,
    facts: ModelFacts,
    tied: bool,
    imatrix: bool,
    counters: _Counters,
) -> str:
    """``llama_tensor_get_type_impl`` (src/llama-quant.cpp) for the offered mixes, from the
    mix's default type ``new_type``; the branches of the IQ, TQ and MXFP4 mixes are left out."""
    arch = facts.arch
    n_expert = facts.n_expert

    # glm5-next keeps its q projections at Q8_0 at least
    if arch == "glm5-next" and any(p in name for p in ("attn_q_a", "attn_q_b", "nextn.eh_proj")):
        return "Q8_0"

    if category == "output" or (tied and category == "token_embd"):
        # the output (and a token embedding that doubles as the output) gets Q6_K, or Q8_0
        # where the mix's block does not divide its rows
        if arch == "falcon" or shape[-1] % BLOCK_SIZE[new_type]:
            return "Q8_0"
        return new_type if new_type == "Q8_0" else "Q6_K"

    if category == "token_embd":
        return new_type  # the IQ and TQ mixes' rules only

    if category in _ATTN_V_LIKE:
        i, n = counters.i_attention_wv, counters.n_attention_wv
        if mix == "Q2_K":
            new_type = "Q4_K" if facts.n_gqa >= 4 else "Q3_K"
        elif mix == "Q3_K_M":
            new_type = "Q5_K" if i < 2 else "Q4_K"
        elif mix == "Q3_K_L":
            new_type = "Q5_K"
        elif mix in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i, n):
            new_type = "Q6_K"
        elif mix == "Q4_K_S" and i < 4:
            new_type = "Q5_K"
        if facts.is_70b and new_type in ("Q3_K", "Q4_K"):
            # 8 query heads share each attn_v: more bits there cost little
            new_type = "Q5_K"
        if n_expert == 8:
            new_type = "Q8_0"
        counters.i_attention_wv += 1
        return new_type

    if category == "attn_k":
        return "Q8_0" if n_expert == 8 else new_type

    if category == "ffn_down":
        i_layer, n_layer = _layer_info(counters.i_ffn_down, name, facts)
        counters.i_ffn_down += 1
        more = _use_more_bits(i_layer, n_layer)
        if mix == "Q2_K":
            return "Q3_K"
        if mix == "Q3_K_M":
            if i_layer < n_layer // 16:
                return "Q5_K"
            return "Q4_K" if arch != "falcon" or more else "Q3_K"
        if mix == "Q3_K_L":
            return "Q4_K" if arch == "falcon" else "Q5_K"
        if mix == "Q4_K_M":
            if arch == "falcon":
                return "Q6_K" if i_layer < n_layer // 16 else "Q5_K" if more else "Q4_K"
            return "Q6_K" if more else new_type
        if mix == "Q5_K_M":
            return "Q6_K" if more else new_type
        if mix == "Q4_K_S":
            return "Q5_K" if arch != "falcon" and i_layer < n_layer // 8 else new_type
        if mix in ("Q4_0", "Q5_0") and imatrix and i_layer < n_layer // 8:
            # guards the first ffn_down layers of an imatrix-quantized Q4_0/Q5_0
            return "Q4_1" if mix == "Q4_0" else "Q5_1"
        return new_type

    if category == "attn_output":
        if arch == "falcon":
            return "Q4_K" if mix == "Q3_K_L" else new_type
        if n_expert == 8:
            return "Q5_K" if mix in ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M") else new_type
        return {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(mix, new_type)

    if category in ("ffn_gate", "ffn_up"):
        # only IQ3_XS changes these, but a MoE model's names are still checked for a block number
        field = "i_ffn_gate" if category == "ffn_gate" else "i_ffn_up"
        _layer_info(getattr(counters, field), name, facts)
        setattr(counters, field, getattr(counters, field) + 1)
    return new_type


def _fallback(new_type: str, row_length: int) -> str:
    """``tensor_type_fallback`` (src/llama-quant.cpp): a type whose block does not divide the row
    length -> a 32-block type, and F16 when that does not divide it either (F16 takes any row
    length, so every tensor gets a type)."""
    if row_length % BLOCK_SIZE[new_type] == 0:
        return new_type
    fallback = _FALLBACK.get(new_type, new_type)
    return fallback if row_length % BLOCK_SIZE[fallback] == 0 else "F16"


def tensor_types(
    file_type: str,
    tensors: list[tuple[str, tuple[int, ...]]],
    facts: ModelFacts,
    *,
    imatrix: bool = False,
    intermediate: str = "F16",
) -> dict[str, str]:
    """The GGML type name ("Q4_K", "F32"...) of every tensor of a GGUF file of mix ``file_type``
    ("Q4_K_M"), as ``convert_hf_to_gguf.py --outtype f16`` then ``llama-quantize`` give them.

    ``tensors``: every tensor of the model, (GGUF name, shape in torch order: [rows, row length],
    [n] for 1-D, [experts, rows, row length]). The result is keyed by name, in the order given.
    ``imatrix``: whether llama-quantize is given an importance matrix (it changes only the first
    ffn_down layers of Q4_0/Q5_0). ``intermediate``: the ``--outtype`` of the file llama-quantize
    reads, which the tensors it does not quantize keep (F32 for 1-D ones whatever it is).
    A model whose MoE ffn tensors lack a usable block number is a :class:`SourceError`, as
    llama-quantize refuses it.

    Every row length has a type: the last fallback, F16, takes any.
    """
    mix = get_file_type(file_type)
    if intermediate not in _FLOAT_TYPES:
        raise UsageError(f"intermediate type {intermediate!r} is not one of {', '.join(_FLOAT_TYPES)}")
    shapes = {name: tuple(int(n) for n in shape) for name, shape in tensors}
    if len(shapes) != len(tensors):
        raise SourceError("a tensor name appears twice in the model")
    names = quantize_order(shapes)
    categories = {name: _category(name) for name in names}
    counters = _Counters(n_attention_wv=sum(c in _ATTN_V_LIKE for c in categories.values()))
    # assume tied until an output tensor is seen (quantize_state_impl::has_tied_embeddings)
    tied = "output.weight" not in shapes
    default = mix.default_type

    chosen = {}
    for name in names:
        shape = shapes[name]
        if not _allows_quantization(name, shape, facts.arch):
            chosen[name] = _converted_type(name, shape, intermediate)
        elif default in _FLOAT_TYPES:
            chosen[name] = default  # F16/BF16 mixes: no rules, no fallback
        else:
            rule = _mix_rule(mix.name, default, name, shape, categories[name], facts, tied, imatrix, counters)
            chosen[name] = _fallback(rule, shape[-1])
    return {name: chosen[name] for name, _ in tensors}
