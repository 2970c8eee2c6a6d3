"""Import a model that is already HQQ-quantized: re-serialize it, never re-quantize it.

Two sources, detected by :func:`hqq_source_kind`:

- ``hqq-qmodel.pt``: what hqq's ``AutoHQQHFModel.save_quantized`` writes, ``config.json`` and
  ``qmodel.pt``, a ``torch.save`` of ``{module name: state dict}``. hqq sets
  ``encoded_state_dict=False`` before saving, so a layer's meta fields are Python objects
  (``int``, ``bool``, ``str``, ``torch.Size``, ``torch.dtype``); modules left in float (embeddings,
  norms, lm_head) hold ``{"weight": tensor, ...}``. The file is a pickle: it is loaded only with
  ``torch.load(weights_only=True)``, which builds tensors and plain values and refuses anything
  else. There is no fallback to ``weights_only=False``: a file that needs it is refused.
- ``hqq-safetensors``: a folder whose ``config.json`` says ``quant_method: hqq``, with the
  layers' state flattened into safetensors as transformers 4.x wrote it (``<module>.W_q``, ...,
  meta fields encoded by hqq's ``encode_safetensor_type``), qconv's own HQQ artifacts included.

Every layer goes through :func:`qconv.formats.format_hqq.parse_layer` and is written with
``format_hqq.layer_tensors``, so the result has the keys and encodings ``qconv convert --method
hqq`` writes. The codes and the values of ``scale``/``zero`` are kept exactly (scale and zero
also keep the dtype they have in the source); the meta fields are re-encoded canonically
(``view_as_float`` off, ``compute_dtype`` the artifact's dtype).

The manifest's recipe says ``imported_from``. Layers may differ (hqq quantizes per linear tag):
the recipe then holds the most common bits/group_size/axis with ``"mixed": true``, and each
layer's own format is in its ``layers`` entry. There is no float source, so layer errors are
unknown (``null``); verification checks the files, that every layer decodes to finite weights,
and that ``qconv.load_model`` runs the artifact to finite logits.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qconv.artifact import Artifact
from qconv.environment import environment, peak_rss_bytes, resolve_device
from qconv.errors import ArtifactError, SourceError, UsageError
from qconv.formats import get_format
from qconv.formats.format_hqq import (
    BOOL_FIELDS,
    DTYPES_BY_NAME,
    INT_FIELDS,
    REQUIRED_FIELDS,
    STRING_FIELDS,
    HQQLayer,
    decode_string,
    encode_string,
    layer_tensors,
    parse_layer,
    unpack,
)
from qconv.pipeline import (
    DTYPES,
    LOGITS_CHECK_AUTO_MAX_PARAMS,
    ConvertResult,
    _finite,
    _move_into_place,
    _write_manifest,
    check_destination,
    dtype_name,
    new_manifest,
    seal_artifact,
    write_config_and_support,
)
from qconv.plan import linear_modules
from qconv.progress import NO_PROGRESS, ProgressSink
from qconv.sources import (
    FLOAT_DTYPES,
    NOT_SUPPORT_FILES,
    WEIGHT_SUFFIXES,
    HFFolderSource,
    Source,
    TensorInfo,
)
from qconv.verify import VerifyReport, check_decodes, check_files, check_runs
from qconv.writer import PlannedTensor, SafetensorsShardWriter, parse_size

QMODEL_NAME = "qmodel.pt"
QMODEL = "hqq-qmodel.pt"
SAFETENSORS = "hqq-safetensors"
#: a layer's fields that are data, not meta: never read while planning
DATA_FIELDS = ("W_q", "scale", "zero", "bias")
KNOWN_FIELDS = {*REQUIRED_FIELDS, *INT_FIELDS, *STRING_FIELDS, *BOOL_FIELDS, "bias"}
WRITE_QUEUE = 8


def hqq_source_kind(ref: str | Path) -> str | None:
    """``hqq-qmodel.pt`` or ``hqq-safetensors`` for a folder that is already HQQ-quantized, else
    None (also for anything unreadable: the ordinary source reader then reports it)."""
    folder = Path(ref).expanduser()
    if not folder.is_dir():
        return None
    if (folder / QMODEL_NAME).is_file():
        return QMODEL
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    if isinstance(quant, dict) and quant.get("quant_method") == "hqq":
        return SAFETENSORS
    return None


# -- the two readers: flattened ``<module>.<field>`` tensors, like any Source --------------------
def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise SourceError(f"{folder}: no config.json (not a Hugging Face model folder)")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"{path}: not valid JSON") from exc
    if not isinstance(config, dict):
        raise SourceError(f"{path}: not a JSON object")
    return config


class HQQSafetensorsSource(HFFolderSource):
    """An HQQ folder in safetensors (transformers 4.x's layout, or a qconv artifact)."""

    def location(self, name: str) -> str:
        return str(self._file_of[name])


class QmodelSource(Source):
    """hqq's ``qmodel.pt``, loaded with ``weights_only=True`` (memory-mapped) and flattened to
    ``<module>.<field>`` tensors, meta values encoded the way hqq's ``encode_safetensor_type``
    encodes them for safetensors."""

    kind = "hf"

    def __init__(self, folder: Path):
        self.folder = folder
        self.ref = str(folder)
        self.path = folder / QMODEL_NAME
        self._config = _read_config(folder)
        self._tensors = _flatten(self.path, load_qmodel(self.path))
        if not self._tensors:
            raise SourceError(f"{self.path}: holds no tensors")

    def location(self, name: str) -> str:
        return str(self.path)

    def config_dict(self) -> dict[str, Any]:
        return dict(self._config)

    def tensors(self) -> list[TensorInfo]:
        return [TensorInfo(name, tuple(t.shape), t.dtype) for name, t in self._tensors.items()]

    def read(self, name: str, pin_memory: bool = False) -> torch.Tensor:
        return self._tensors[name]

    def hashed_files(self) -> list[Path]:
        return [self.folder / "config.json", self.path] + [
            self.folder / n for n in _support_file_names(self.folder)
        ]

    def write_support_files(self, dest: Path) -> list[str]:
        names = _support_file_names(self.folder)
        for name in names:
            shutil.copyfile(self.folder / name, dest / name)
        return names


def _support_file_names(folder: Path) -> list[str]:
    """Tokenizer and generation files beside the weights (as HFFolderSource copies them)."""
    return sorted(
        p.name
        for p in folder.iterdir()
        if p.is_file()
        and p.name not in NOT_SUPPORT_FILES
        and not p.name.endswith(WEIGHT_SUFFIXES)
        and not p.name.startswith(".")
    )


def load_qmodel(path: Path) -> Any:
    """``torch.load`` without running pickle code. A file that needs a Python global torch's
    weights-only unpickler does not allow is refused, naming the global: there is no unsafe retry."""

    def load(mmap: bool):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            return load(mmap=True)
        except RuntimeError as exc:
            if "mmap can only be used" not in str(exc):
                raise
            return load(mmap=False)  # torch.save's legacy (pre-zip) format cannot be mapped
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Weights only load failed" not in text:
            raise SourceError(f"{path}: not a readable torch.save file (truncated or corrupt)") from None
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if found:
            raise SourceError(
                f"{path}: cannot be read safely: it needs the Python object {found.group(1)}, and qconv "
                "loads pickles only with weights_only=True (it never runs pickle code)"
            ) from None
        reason = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
        detail = reason.group(1).strip() if reason else "refused by torch's weights-only unpickler"
        raise SourceError(f"{path}: cannot be read safely: {detail}") from None
    except OSError as exc:
        raise SourceError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except Exception:  # noqa: BLE001 - torch reports a damaged archive in many ways
        raise SourceError(f"{path}: not a readable torch.save file (truncated or corrupt)") from None


def _encode(value: Any) -> torch.Tensor | None:
    """A meta value as hqq's ``encode_safetensor_type`` stores it; None for a missing value."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, torch.Size):
        return torch.tensor(list(value), dtype=torch.int64)
    if isinstance(value, torch.dtype):
        return encode_string(str(value))
    if isinstance(value, bool):
        return torch.tensor(int(value), dtype=torch.uint8)
    if isinstance(value, int):
        return torch.tensor(value, dtype=torch.int32)
    if isinstance(value, float):
        return torch.tensor(value, dtype=torch.float32)
    if isinstance(value, str):
        return encode_string(value)
    if value is None:
        return None
    raise TypeError(type(value).__name__)


def _flatten(path: Path, state: Any) -> dict[str, torch.Tensor]:
    if not isinstance(state, dict):
        raise SourceError(
            f"{path}: not an hqq qmodel.pt (a dict of module state dicts), found {type(state).__name__}"
        )
    flat: dict[str, torch.Tensor] = {}
    for module, fields in state.items():
        if not isinstance(module, str) or not isinstance(fields, dict):
            raise SourceError(f"{path}: entry {module!r} is not a module's state dict")
        prefix = f"{module}." if module else ""
        if "W_q" in fields:
            fields = dict(fields)
            legacy = fields.pop("meta", None)  # hqq before 0.2 kept the meta fields in one dict
            if isinstance(legacy, dict):
                fields = {**legacy, **fields}
            if fields["W_q"] is None:
                raise ArtifactError(f"{path}: layer {module}: W_q is None (the layer was never quantized)")
            for key, value in fields.items():
                try:
                    tensor = _encode(value)
                except TypeError as exc:
                    raise ArtifactError(
                        f"{path}: layer {module}: field {key!r} is a {exc}, not a tensor or a plain value"
                    ) from None
                if tensor is not None:
                    flat[prefix + str(key)] = tensor
            continue
        for key, value in fields.items():
            if not isinstance(value, torch.Tensor):
                raise SourceError(
                    f"{path}: {prefix}{key} is a {type(value).__name__}, not a tensor (module {module!r} is "
                    "not an HQQ layer)"
                )
            flat[prefix + str(key)] = value.detach()
    return flat


def open_hqq_source(ref: str | Path, kind: str) -> Source:
    folder = Path(ref).expanduser()
    return QmodelSource(folder) if kind == QMODEL else HQQSafetensorsSource(folder)


# -- planning: every layer parsed and checked before the first byte is written -------------------
@dataclass
class ImportItem:
    name: str  # the tensor (copied) or the module (an HQQ layer)
    fields: dict[str, str] | None = None  # layer field -> source tensor name
    layer: HQQLayer | None = None  # parsed from the meta fields with data on the meta device
    info: TensorInfo | None = None  # a copied tensor


@dataclass
class ImportPlan:
    items: list[ImportItem]
    infos: dict[str, TensorInfo]
    recipe: dict[str, Any]
    skipped: dict[str, str]
    architecture: str
    working_dtype: torch.dtype


def _fields(
    source: Source, item: ImportItem, infos: dict[str, TensorInfo] | None = None
) -> dict[str, torch.Tensor]:
    """The layer's tensors by field; given ``infos``, its data fields are read as shapes only
    (tensors on the meta device), so planning reads just the small meta fields."""
    tensors = {}
    for field, name in item.fields.items():
        if infos is not None and field in DATA_FIELDS:
            info = infos[name]
            tensors[field] = torch.empty(info.shape, dtype=info.dtype, device="meta")
        else:
            tensors[field] = source.read(name)
    return tensors


def _parse(source: Source, item: ImportItem, tensors: dict[str, torch.Tensor]) -> HQQLayer:
    """parse_layer, its complaint prefixed with the file and the layer's name."""
    try:
        layer = parse_layer(tensors)
        unknown = sorted(set(tensors) - KNOWN_FIELDS)
        if unknown:
            raise ArtifactError(f"unknown HQQ field(s) {', '.join(unknown)}")
    except ArtifactError as exc:
        raise ArtifactError(f"{source.location(item.fields['W_q'])}: layer {item.name}: {exc}") from None
    return layer


def _flag(tensors: dict[str, torch.Tensor], key: str, default: bool) -> bool:
    value = tensors.get(key)
    return default if value is None or value.numel() != 1 else bool(int(value.reshape(-1)[0]))


def _compute_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype | None:
    value = tensors.get("compute_dtype")
    return None if value is None else DTYPES_BY_NAME.get(decode_string(value))


def plan_import(source: Source, kind: str, fmt, dtype: str) -> ImportPlan:
    infos = {info.name: info for info in source.tensors()}
    modules = {name[: -len(".W_q")] for name in infos if name.endswith(".W_q")}
    if not modules:
        raise SourceError(f"{source.ref}: no HQQ layer found (no <module>.W_q tensor)")
    # a layer's fields are <module>.<field>, the first at the place of its first field on disk
    items: list[ImportItem] = []
    by_module: dict[str, ImportItem] = {}
    for name, info in infos.items():
        module, _, field = name.rpartition(".")
        if module not in modules:
            items.append(ImportItem(name, info=info))
            continue
        if module not in by_module:
            by_module[module] = ImportItem(module, fields={})
            items.append(by_module[module])
        by_module[module].fields[field] = name

    arch = linear_modules(source)
    linears, outputs, architecture = arch.linears, arch.outputs, arch.name
    styles: Counter = Counter()
    compute_dtypes: Counter = Counter()
    for item in by_module.values():
        tensors = _fields(source, item, infos)
        item.layer = layer = _parse(source, item, tensors)
        where = f"{source.location(item.fields['W_q'])}: layer {item.name}"
        if item.name not in linears:
            raise ArtifactError(f"{where}: not a Linear module of {architecture}")
        if tuple(layer.shape) != linears[item.name]:
            raise ArtifactError(
                f"{where}: shape {list(layer.shape)} is not the Linear's [out, in] {list(linears[item.name])}"
            )
        styles[
            (layer.nbits, layer.group_size, layer.axis, _flag(tensors, "round_zero", layer.nbits == 4))
        ] += 1
        compute_dtypes[_compute_dtype(tensors)] += 1

    if dtype != "auto":
        working = DTYPES[dtype]
    else:
        floats = Counter(i.info.dtype for i in items if i.info is not None and i.info.dtype in FLOAT_DTYPES)
        common_compute = compute_dtypes.most_common(1)[0][0]
        working = floats.most_common(1)[0][0] if floats else common_compute or torch.bfloat16
    (bits, group_size, axis, round_zero), _ = styles.most_common(1)[0]
    recipe: dict[str, Any] = {
        "method": fmt.name,
        "bits": bits,
        "group_size": group_size,
        "axis": axis,
        "round_zero": round_zero,
        "imported_from": kind,
        "mixed": len({style[:3] for style in styles}) > 1,
        "dtype": dtype_name(working),
        "skip": [],
    }
    recipe["label"] = fmt.label(recipe) + (" (mixed)" if recipe["mixed"] else "")
    skipped = {}
    for module in sorted(set(linears) - set(by_module)):
        if module in outputs:
            skipped[module] = "output embeddings, not quantized in the source"
        else:
            skipped[module] = "not quantized in the source"
    return ImportPlan(items, infos, recipe, skipped, architecture, working)


def _layer_recipe(layer: HQQLayer, round_zero: bool, dtype: torch.dtype) -> dict[str, Any]:
    return {
        "bits": layer.nbits,
        "group_size": layer.group_size,
        "axis": layer.axis,
        "round_zero": round_zero,
        "dtype": dtype_name(dtype),
    }


def canonical_layer(
    layer: HQQLayer, tensors: dict[str, torch.Tensor], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The layer as ``qconv convert --method hqq`` writes it: codes re-packed (the same bytes;
    a 3-bit layer's padding rows become zero), scale and zero as found, meta fields canonical."""
    recipe = _layer_recipe(layer, _flag(tensors, "round_zero", layer.nbits == 4), dtype)
    rows, _ = layer.grid
    out = layer_tensors(unpack(layer.W_q, layer.packing, rows), layer.scale, layer.zero, recipe, layer.shape)
    out["scale"], out["zero"] = layer.scale.contiguous(), layer.zero.contiguous()
    for key in ("channel_wise", "optimize"):  # how the layer was made, as the source says
        out[key] = torch.tensor(int(_flag(tensors, key, True)), dtype=torch.uint8)
    return out


def _planned(plan: ImportPlan, fmt) -> list[PlannedTensor]:
    planned = []
    for item in plan.items:
        if item.info is not None:
            info = item.info
            dtype = plan.working_dtype if info.dtype in FLOAT_DTYPES else info.dtype
            planned.append(PlannedTensor(info.name, dtype, tuple(info.shape)))
            continue
        layer = item.layer
        specs = fmt.output_specs(layer.shape, _layer_recipe(layer, False, plan.working_dtype))
        specs["scale"] = (layer.scale.dtype, tuple(layer.scale.shape))
        specs["zero"] = (layer.zero.dtype, tuple(layer.zero.shape))
        planned += [PlannedTensor(f"{item.name}.{suffix}", *spec) for suffix, spec in specs.items()]
        if "bias" in item.fields:
            bias = plan.infos[item.fields["bias"]]
            bias_dtype = plan.working_dtype if bias.dtype in FLOAT_DTYPES else bias.dtype
            planned.append(PlannedTensor(f"{item.name}.bias", bias_dtype, tuple(bias.shape)))
    return planned


# -- the import ----------------------------------------------------------------------------------
def check_import_options(
    source_ref: str, method: str | None, options: dict[str, Any] | None, skip, max_rel_error
) -> None:
    """An import takes no quantization options: the layers keep what they were made with."""
    if method is not None:
        get_format(method)  # an unknown name fails with the list of valid ones
        if method != "hqq":
            raise UsageError(
                f"{source_ref}: already quantized with HQQ; qconv imports it as it is (omit --method or "
                f"use --method hqq) and does not re-quantize it with --method {method}"
            )
    given = sorted(k for k, v in (options or {}).items() if v is not None)
    flags = ["--" + k.replace("_", "-") for k in given]
    if skip:
        flags.append("--skip")
    if max_rel_error is not None:
        flags.append("--max-rel-error")
    if flags:
        raise UsageError(
            f"{', '.join(flags)} does not apply to an import: {source_ref} is already quantized with HQQ "
            "and its layers keep their own settings"
        )


def import_hqq(
    source_ref: str,
    output: str | Path,
    method: str | None = None,
    options: dict[str, Any] | None = None,
    *,
    skip: tuple[str, ...] | list[str] = (),
    device: str = "auto",
    dtype: str = "auto",
    max_shard_size: str | int = "5GB",
    force: bool = False,
    verify: bool = True,
    logits: bool | None = None,
    max_rel_error: float | None = None,
    registry=None,
    progress: ProgressSink = NO_PROGRESS,
) -> ConvertResult:
    """Import the HQQ folder ``source_ref`` into a qconv HQQ artifact at ``output`` (the same
    arguments as :func:`qconv.pipeline.convert`, which hands HQQ folders here)."""
    started = time.perf_counter()
    kind = hqq_source_kind(source_ref)
    if kind is None:
        raise UsageError(
            f"{source_ref}: not an HQQ folder (no {QMODEL_NAME}, no quant_method hqq in config.json)"
        )
    check_import_options(str(source_ref), method, options, skip, max_rel_error)
    fmt = get_format("hqq")
    dest = Path(output).expanduser()
    check_destination(dest, str(source_ref), force)
    try:
        max_shard_bytes = parse_size(max_shard_size)
    except ValueError as exc:
        raise UsageError(f"--max-shard-size: {exc}") from None
    if dtype != "auto" and dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r}: choose auto, {', '.join(DTYPES)}")
    torch_device = resolve_device(device)

    with open_hqq_source(source_ref, kind) as source:
        plan = plan_import(source, kind, fmt, dtype)
        source.start_hashing()  # only once the source is known to be importable
        prepare_s = time.perf_counter() - started
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.qconv-tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            result = _import_into(
                source, plan, fmt, tmp, torch_device, max_shard_bytes, verify, logits, progress
            )
            _move_into_place(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    result.path = dest
    result.stats["prepare_s"] = prepare_s
    result.stats["total_s"] = time.perf_counter() - started
    if registry is not None:
        result.artifact_id = registry.record_artifact(result.manifest, dest.resolve())
    return result


def _import_into(
    source: Source,
    plan: ImportPlan,
    fmt,
    tmp: Path,
    device: torch.device,
    max_shard_bytes: int,
    verify: bool,
    logits: bool | None,
    progress: ProgressSink,
) -> ConvertResult:
    t0 = time.perf_counter()
    planned = _planned(plan, fmt)
    progress.start("write", sum(p.nbytes for p in planned), "bytes")
    writer = SafetensorsShardWriter(
        tmp, planned, max_shard_bytes, WRITE_QUEUE, on_written=lambda n: progress.advance("write", n)
    )
    layers: dict[str, dict] = {}
    packed_bytes = quantized_params = total_params = 0
    try:
        for item in plan.items:
            if item.info is not None:
                tensor = source.read(item.name)
                total_params += tensor.numel()
                writer.add(
                    item.name, tensor.to(plan.working_dtype) if tensor.dtype in FLOAT_DTYPES else tensor
                )
                continue
            tensors = _fields(source, item)
            layer = _parse(source, item, tensors)
            outputs = canonical_layer(layer, tensors, plan.working_dtype)
            packed_bytes += sum(v.numel() * v.element_size() for v in outputs.values())
            numel = layer.shape[0] * layer.shape[1]
            quantized_params += numel
            total_params += numel
            if "bias" in tensors:
                bias = tensors["bias"]
                outputs["bias"] = bias.to(plan.working_dtype) if bias.dtype in FLOAT_DTYPES else bias
                total_params += bias.numel()
            for suffix, value in outputs.items():
                writer.add(f"{item.name}.{suffix}", value)
            recipe = _layer_recipe(layer, False, plan.working_dtype)
            layers[item.name] = {
                "rel_error": None,  # no float source to measure against
                "max_abs": None,
                "snr_db": None,
                "shape": list(layer.shape),
                "format": fmt.label(recipe),
            }
        files = writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        progress.finish("write")
    import_s = time.perf_counter() - t0
    source_files = source.file_hashes()

    quantization_config = fmt.quantization_config(plan.recipe, plan)
    support = write_config_and_support(tmp, source, quantization_config, plan.working_dtype)
    manifest = new_manifest(
        source,
        plan,
        source_files,
        plan.recipe,
        None,
        environment(device, fmt.libraries),
        layers,
        {
            "quantized_params": quantized_params,
            "total_params": total_params,
            "quantized_layers": len(layers),
            "bits_per_weight": 8 * packed_bytes / quantized_params,
            "worst_layer": None,
            "worst_rel_error": None,
        },
    )
    seal_artifact(tmp, manifest, files, support)

    report = None
    t1 = time.perf_counter()
    if verify:
        report = VerifyReport(path=str(tmp))
        check_files(tmp, manifest["files"], report)
        artifact = Artifact(tmp)
        try:
            check_decodes(artifact, report)
        finally:
            artifact.close()
        run_logits = logits if logits is not None else total_params <= LOGITS_CHECK_AUTO_MAX_PARAMS
        if run_logits:
            progress.start("verify", None, "models")
            check_runs(tmp, device, report)
            progress.finish("verify")
        manifest["verify"] = report.manifest_entry()
        _write_manifest(tmp, manifest)
    stats = {
        "import_s": import_s,
        "verify_s": time.perf_counter() - t1,
        "bytes_written": writer.bytes_written,
        "peak_rss_bytes": peak_rss_bytes(),
    }
    return ConvertResult(path=tmp, manifest=_finite(manifest), report=report, stats=stats)
