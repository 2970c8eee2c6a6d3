"""The GGUF conversion: read -> plan -> quantize -> write, for methods whose container is one
llama.cpp file (``formats/format_gguf.py``). The pipeline (:mod:`qconv.pipeline`) calls
:func:`convert_into` in place of its safetensors writer, and does the rest as for every method:
destination checks, the temporary folder renamed into place, the manifest, verify, record.

Line by line:
- describe the source for GGUF (``formats/gguf_metadata.py``): llama.cpp's architecture, its
  hyper-parameters and tokenizer as metadata, each tensor's GGUF name and transform;
- plan every tensor's GGML type with llama.cpp's own rules for the file type
  (``formats/gguf_mix.py``), in the order llama.cpp's quantizer writes them;
- write the header (metadata and every tensor's name, shape, type and offset) first, then the
  tensors one at a time: read, transform, quantize (on the GPU where there is one), measure the
  error with the ``gguf`` package's own dequantizer, write. Memory: one tensor at a time.
"""

from __future__ import annotations

import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qconv.errors import QconvError, QconvWarning, SourceError, literal
from qconv.files import sha256_file
from qconv.formats import gguf_gptq
from qconv.formats.format_gguf import FLOAT_TYPES, GGUFFormat
from qconv.formats.gguf_metadata import GGUFModel, describe_gguf, describe_hf
from qconv.formats.gguf_mix import ModelFacts, quantize_order, tensor_types
from qconv.manifest import base_model_name
from qconv.plan import compile_skip_patterns, matches_skip
from qconv.progress import ProgressSink
from qconv.sources import Source

#: rows dequantized at a time when measuring a tensor's error (bounded memory for a 128k-row
#: token embedding: this many elements of float32 at most, about 64 MB)
ERROR_CHUNK_ELEMENTS = 16 * 2**20
#: the source name of a tensor llama.cpp's converter adds (GGUFModel.extra_tensors)
EXTRA = "<llama.cpp>"
#: a tensor kept unquantized by --skip is stored in this type (llama.cpp's intermediate type)
SKIPPED_TYPE = "F16"
#: the default --max-shard-size of a GGUF artifact: the Hub refuses files over 50 GB, so a model
#: bigger than this is split as llama.cpp's gguf-split splits it (llama.cpp loads the first part)
DEFAULT_MAX_SHARD = "48GB"


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the GGUF file, in write order."""

    source_name: str  # the Hugging Face name read from the source
    name: str  # the GGUF name
    shape: tuple[int, ...]  # torch order ([rows, row length]; [n] for 1-D)
    ggml_type: str
    module: str | None  # the layer it belongs to, for weights of 2 dimensions (manifest key)
    values: torch.Tensor | None = None  # a tensor llama.cpp adds that no source holds (float32)

    @property
    def quantized(self) -> bool:
        return self.ggml_type not in ("F32", "F16", "BF16")


def file_stem(source: Source) -> str:
    """NAME of ``NAME-TYPE.gguf``: the source's short name, without a GGUF source's type suffix
    (``SmolLM2-135M-Instruct.Q4_1.gguf`` -> ``SmolLM2-135M-Instruct``)."""
    name = base_model_name(source.kind, source.ref) or "model"
    name = name.rsplit("/", 1)[-1]
    if source.kind == "gguf":
        name = re.sub(r"[.-](?:[FQ]\d+(?:_[0-9A-Z]+)*|BF16|IQ\d\w*)$", "", name, flags=re.IGNORECASE)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"


def describe_source(source: Source, scratch: Path) -> GGUFModel:
    """The source as llama.cpp needs it described. A GGUF source keeps its own metadata (the
    tokenizer exactly as it was); other sources are described from config.json and their
    tokenizer files, written into ``scratch`` first."""
    name = file_stem(source)
    if source.kind == "gguf":
        import gguf

        reader = gguf.GGUFReader(str(source.path))
        _warn_if_quantized(source, reader)
        return describe_gguf(reader, name)
    scratch.mkdir(parents=True, exist_ok=True)
    source.write_support_files(scratch)
    try:
        return describe_hf(source.config_dict(), scratch, name)
    except QconvError as exc:  # name the source, not the scratch folder its tokenizer went to
        message = str(exc).replace(str(scratch), source.ref)
        if not message.startswith(source.ref):
            message = f"{source.ref}: {message}"
        raise type(exc)(literal(message)) from None


#: GGUF source types whose values re-quantize without a loss beyond the new type's own
LOSSLESS_SOURCE_TYPES = ("F32", "F16", "BF16", "Q8_0")


def _warn_if_quantized(source: Source, reader) -> None:
    """A source quantized below 8 bits is accepted, with a warning: its values carry that
    quantization's error already, and the new type adds its own on top."""
    lossy = sorted(
        {t.tensor_type.name for t in reader.tensors if len(t.shape) > 1} - set(LOSSLESS_SOURCE_TYPES)
    )
    if lossy:
        warnings.warn(
            f"{source.ref} holds {', '.join(lossy)} tensors: re-quantizing them adds error to what "
            "that quantization lost already (a F16/BF16/F32 or Q8_0 source gives a better artifact)",
            QconvWarning,
            stacklevel=2,
        )


def plan_tensors(source: Source, model: GGUFModel, recipe: dict, skip: list[str]) -> list[PlannedTensor]:
    """Every tensor of the file with its GGML type, in the order llama.cpp's quantizer writes
    them. A weight matching ``--skip`` stays in float (:data:`SKIPPED_TYPE`)."""
    patterns = compile_skip_patterns(skip)
    entries: dict[str, tuple[str, tuple[int, ...]]] = {}
    for info in source.tensors():
        name = model.tensor_name(info.name)
        if name is None:
            continue
        if name in entries:
            raise SourceError(
                f"{source.ref}: tensors {entries[name][0]!r} and {info.name!r} both map to {name}"
            )
        entries[name] = (info.name, tuple(info.shape))
    if not entries:
        raise SourceError(f"{source.ref}: no tensor llama.cpp's {model.arch} architecture uses")
    extras = dict(model.extra_tensors())  # llama.cpp's own tensors (Llama 3's rope_freqs...)
    for name, values in extras.items():
        entries[name] = (EXTRA, tuple(values.shape))
    order = quantize_order(list(entries))
    facts = ModelFacts(
        arch=model.arch,
        n_layer=model.n_layer,
        n_head=model.n_head,
        n_head_kv=model.n_head_kv,
        n_expert=model.n_expert,
    )
    types = tensor_types(recipe["type"], [(name, entries[name][1]) for name in order], facts)
    planned = []
    for name in order:
        source_name, shape = entries[name]
        module = (
            source_name[: -len(".weight")] if source_name.endswith(".weight") and len(shape) >= 2 else None
        )
        ggml_type = types[name]
        if source_name == EXTRA:
            planned.append(PlannedTensor(name, name, shape, "F32", None, extras[name]))
            continue
        if module is not None and ggml_type not in FLOAT_TYPES and matches_skip(module, patterns):
            ggml_type = SKIPPED_TYPE
        planned.append(PlannedTensor(source_name, name, shape, ggml_type, module))
    return planned


def _add_metadata(writer, model: GGUFModel, recipe: dict) -> None:
    import gguf

    model.add_metadata(writer)
    writer.add_file_type(recipe["file_type"])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def byte_shape(shape: tuple[int, ...], ggml_type: str) -> tuple[int, ...]:
    """The shape of a tensor's bytes as uint8 (the last dimension in bytes)."""
    import gguf

    block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ggml_type]]
    *rows, n = shape
    if n % block:
        raise SourceError(f"rows of {n} are not a multiple of {ggml_type}'s block of {block}")
    return (*rows, n // block * type_size)


@dataclass
class WrittenGGUF:
    files: dict[str, dict]  # file name -> {"sha256", "size"}
    layers: dict[str, dict]  # module -> error entry
    skipped: dict[str, str]  # module -> why it stays in float
    quantized_params: int
    total_params: int
    quantized_bytes: int
    timers: dict[str, float]


def write_gguf(
    source: Source,
    model: GGUFModel,
    planned: list[PlannedTensor],
    fmt: GGUFFormat,
    recipe: dict,
    path: Path,
    device: torch.device,
    max_shard_bytes: int,
    progress: ProgressSink,
    prepared=None,
) -> WrittenGGUF:
    """Write the GGUF file(s) at ``path`` (parts named as gguf-split names them when the file
    would exceed ``max_shard_bytes``) and measure every quantized tensor's error. ``prepared``:
    a calibration stage's result (formats/gguf_calibrated.py): the layers it holds bytes for are
    written from them (rows permuted as the tensor's transform permutes them), not quantized."""
    import gguf

    total = sum(int(np.prod(byte_shape(t.shape, t.ggml_type))) for t in planned)
    # split only a file over the limit (the writer warns about every unsplit file otherwise)
    split = max_shard_bytes if total > max_shard_bytes else 0
    writer = gguf.GGUFWriter(str(path), model.arch, split_max_size=split)
    _add_metadata(writer, model, recipe)
    for tensor in planned:
        shape = byte_shape(tensor.shape, tensor.ggml_type)
        nbytes = int(np.prod(shape))
        writer.add_tensor_info(
            tensor.name,
            shape,
            np.dtype(np.uint8),
            nbytes,
            raw_dtype=gguf.GGMLQuantizationType[tensor.ggml_type],
        )
    layers: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    # quantize_cpu_s: this process's CPU seconds while quantizing (every thread's), which a shared
    # machine's load does not inflate as it does the wall time quantize_s
    timers = {"read_s": 0.0, "quantize_s": 0.0, "quantize_cpu_s": 0.0, "measure_s": 0.0, "write_s": 0.0}
    quantized_params = total_params = quantized_bytes = 0
    progress.start("quantize", len(planned))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in planned:
            clock = time.perf_counter()
            values = tensor.values if tensor.values is not None else source.read(tensor.source_name)
            timers["read_s"] += time.perf_counter() - clock
            clock, cpu_clock = time.perf_counter(), time.process_time()
            if tuple(values.shape) != tensor.shape:
                raise SourceError(f"tensor {tensor.source_name!r} changed shape while reading")
            values = values.to(device=device, dtype=torch.float32)
            try:
                if tensor.values is None:
                    values = model.transform(tensor.source_name, values)
                rows = values.reshape(-1, tensor.shape[-1])
                packed = prepared.packed(tensor.module) if prepared is not None and tensor.module else None
                if packed is not None:
                    data = _prepared_bytes(model, tensor, next(iter(packed.values())))
                else:
                    data = fmt.quantize_as(rows, tensor.ggml_type, recipe["solver"]).cpu().numpy()
            except QconvError as exc:
                raise exc.with_context(tensor.source_name) from None
            timers["quantize_s"] += time.perf_counter() - clock
            timers["quantize_cpu_s"] += time.process_time() - cpu_clock
            total_params += values.numel()
            # a weight is a layer of the manifest when stored in the file type's own kind: any
            # GGML type in a quantized file (a float one stands out as skipped), F16/BF16 in theirs
            stored_as_layer = tensor.quantized or recipe["type"] in FLOAT_TYPES
            if tensor.module is not None and stored_as_layer:
                clock = time.perf_counter()
                layers[tensor.module] = {
                    **_tensor_error(fmt, rows, data, tensor.ggml_type),
                    "shape": list(tensor.shape),
                    "format": tensor.ggml_type,
                    "gguf_name": tensor.name,
                    **(prepared.layer_stats(tensor.module) if prepared is not None else {}),
                }
                quantized_params += values.numel()
                quantized_bytes += data.nbytes
                timers["measure_s"] += time.perf_counter() - clock
            elif tensor.module is not None:
                skipped[tensor.module] = _float_reason(tensor, recipe)
            del values, rows
            clock = time.perf_counter()
            writer.write_tensor_data(data.reshape(byte_shape(tensor.shape, tensor.ggml_type)))
            timers["write_s"] += time.perf_counter() - clock
            progress.advance("quantize")
        writer.flush()
    finally:
        writer.close()
        progress.finish("quantize")
    names = [p.name for p in writer.format_shard_names(path)]
    files = {}
    for name in names:
        file = path.parent / name
        files[name] = {"sha256": sha256_file(file), "size": file.stat().st_size}
    return WrittenGGUF(files, layers, skipped, quantized_params, total_params, quantized_bytes, timers)


def _prepared_bytes(model: GGUFModel, tensor: PlannedTensor, data: torch.Tensor) -> np.ndarray:
    """A calibrated layer's bytes (rows in the source's order) in the file's row order."""
    expected = byte_shape(tensor.shape, tensor.ggml_type)
    if tuple(data.shape) != expected:
        raise SourceError(
            f"the calibration checkpoint holds {list(data.shape)} bytes, not {tensor.ggml_type}'s {list(expected)}"
        )
    return data[row_order(model, tensor.source_name, tensor.shape)].contiguous().numpy()


def _float_reason(tensor: PlannedTensor, recipe: dict) -> str:
    if tensor.ggml_type == SKIPPED_TYPE and recipe.get("skip"):
        return f"kept {tensor.ggml_type} (matches --skip, or llama.cpp's rules for {recipe['type']})"
    return f"kept {tensor.ggml_type} by llama.cpp's rules for {recipe['type']}"


def _tensor_error(fmt: GGUFFormat, rows: torch.Tensor, data: np.ndarray, ggml_type: str) -> dict[str, float]:
    """Relative Frobenius error, max abs error and SNR of a tensor's stored bytes against its
    float32 rows, dequantized by the ``gguf`` package in chunks of rows (bounded memory)."""
    import math

    chunk = max(1, ERROR_CHUNK_ELEMENTS // rows.shape[1])
    ref_sq = diff_sq = 0.0
    max_abs = 0.0
    for start in range(0, rows.shape[0], chunk):
        part = rows[start : start + chunk].to("cpu", torch.float64)
        restored = torch.from_numpy(fmt.dequantize_bytes(data[start : start + chunk], ggml_type)).double()
        diff = restored.reshape(part.shape) - part
        ref_sq += float((part * part).sum())
        diff_sq += float((diff * diff).sum())
        max_abs = max(max_abs, float(diff.abs().max()) if diff.numel() else 0.0)
    ref_norm, diff_norm = math.sqrt(ref_sq), math.sqrt(diff_sq)
    rel = diff_norm / ref_norm if ref_norm > 0 else (0.0 if diff_norm == 0 else math.inf)
    snr = 20 * math.log10(ref_norm / diff_norm) if diff_norm > 0 and ref_norm > 0 else math.inf
    return {"rel_error": rel, "max_abs": max_abs, "snr_db": snr}


# -- reading a written file back (verify) ---------------------------------------------------------
class StoredGGUF:
    """The tensors of a GGUF artifact (every part of a split one) by GGUF name, read back as the
    source's Hugging Face tensors: dequantized by the ``gguf`` package, and the row permutation
    llama.cpp's converter applied (Llama's q/k rotary layout) undone. Independent of
    transformers' GGUF loader, whose per-architecture config mapping does not cover every model
    qconv writes (Qwen3's grouped k/v heads, Gemma 2's soft-capping)."""

    def __init__(self, paths: list[Path], model: GGUFModel):
        import gguf

        self.model = model
        self._tensors = {}
        for path in paths:
            for tensor in gguf.GGUFReader(str(path)).tensors:
                self._tensors[tensor.name] = tensor

    def read(self, hf_name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The stored value of source tensor ``hf_name`` (of ``shape``), float32 in HF layout."""
        import gguf

        name = self.model.tensor_name(hf_name)
        if name is None or name not in self._tensors:
            raise SourceError(f"the GGUF holds no tensor for {hf_name!r}")
        tensor = self._tensors[name]
        values = torch.from_numpy(
            np.ascontiguousarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        )
        if values.numel() != int(np.prod(shape)):
            raise SourceError(f"{name} holds {values.numel()} values, the source's {hf_name} {list(shape)}")
        values = values.reshape(shape)
        if len(shape) == 2:
            values = values[row_order(self.model, hf_name, shape).argsort()]
        return values


def block_typed_layers(model: GGUFModel, planned: list[PlannedTensor]) -> dict[str, tuple[str, str]]:
    """module -> (GGML type, source tensor name) of every 2-D weight the writer stores in a block
    type a calibrated stage can compute (formats/gguf_gptq.py's TYPES); a weight whose GGUF
    transform is not a row permutation is left out (its bytes could not be computed in the
    source's layout)."""
    types = {}
    for tensor in planned:
        if tensor.module is None or tensor.ggml_type not in gguf_gptq.TYPES or len(tensor.shape) != 2:
            continue
        try:
            row_order(model, tensor.source_name, tensor.shape)
        except SourceError:
            continue
        types[tensor.module] = (tensor.ggml_type, tensor.source_name)
    return types


def row_order(model: GGUFModel, hf_name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Which source row each stored row is (the transform's row permutation), found by
    transforming rows that hold their own index; refuses a transform that is not one."""
    probe = torch.arange(shape[0], dtype=torch.float32)[:, None].expand(shape).contiguous()
    moved = model.transform(hf_name, probe)
    order = moved[:, 0].round().long()
    if (
        tuple(moved.shape) != tuple(shape)
        or not torch.equal(moved, order[:, None].float().expand(shape))
        or not torch.equal(order.sort().values, torch.arange(shape[0]))
    ):
        raise SourceError(f"{hf_name}: llama.cpp's transform of this tensor is not a row permutation")
    return order
