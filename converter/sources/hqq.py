"""HQQ source: a folder another tool quantized with HQQ already, imported as it is.

Two forms (formats/hqq_layout.py reads both): hqq's own ``AutoHQQHFModel.save_quantized`` folder
(``config.json`` + ``qmodel.pt``, loaded only with ``torch.load(weights_only=True)``), and
safetensors with ``quant_method: hqq`` as transformers 4.x wrote them (qconv's own HQQ artifacts
included). The folder goes through the one pipeline like any source: each HQQ layer is listed as
``<module>.weight`` and arrives already packed (:meth:`HQQSource.packed`), re-encoded the way
``qconv convert --method hqq`` writes it; everything else (embeddings, norms, biases, layers
left in float) is read and copied as from a float model.

The codes and the values of ``scale``/``zero`` are kept exactly (scale and zero also keep the
dtype they have in the source); the meta fields are re-encoded canonically. Every layer's meta
fields are parsed and checked when the source is opened, before a byte is written.

Layers may differ (hqq quantizes per linear tag): the recipe then holds the most common
bits/group_size/axis with ``"mixed": true``, and each layer's own format is in its manifest
entry. There is no float source, so layer errors are unknown (``null``).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import torch

from qconv.errors import ArtifactError, SourceError
from qconv.files import FLOAT_DTYPES
from qconv.formats import get_format
from qconv.formats.hqq_layout import (
    DATA_FIELDS,
    QMODEL,
    QMODEL_NAME,
    HQQLayer,
    canonical_layer,
    canonical_specs,
    flatten_qmodel,
    folder_form,
    layer_compute_dtype,
    layer_round_zero,
    load_qmodel,
    parse_imported_layer,
)
from qconv.sources.base import (
    PackedLayer,
    Source,
    TensorInfo,
    copy_support_files,
    read_folder_config,
    support_file_names,
)
from qconv.sources.hf_folder import HFFolderSource

METHOD = "hqq"


def hqq_form(ref: str | Path) -> str | None:
    """``hqq-qmodel.pt`` or ``hqq-safetensors`` for a local folder quantized with HQQ already,
    else None (also for anything unreadable: the ordinary source reader then reports it)."""
    return folder_form(Path(ref).expanduser())


def imported_method(ref: str | Path) -> str | None:
    """The method of a local folder another tool quantized already (qconv imports it as it is and
    never re-quantizes it), None for anything else."""
    return METHOD if hqq_form(ref) is not None else None


class QmodelSource(Source):
    """hqq's ``qmodel.pt``, loaded with ``weights_only=True`` (memory-mapped) and flattened to
    ``<module>.<field>`` tensors, meta values encoded the way hqq's ``encode_safetensor_type``
    encodes them for safetensors."""

    kind = "hf"

    def __init__(self, folder: Path):
        self.folder = folder
        self.ref = str(folder)
        self.path = folder / QMODEL_NAME
        self._config = read_folder_config(folder)
        self._tensors = flatten_qmodel(self.path, load_qmodel(self.path))
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
            self.folder / n for n in support_file_names(self.folder)
        ]

    def write_support_files(self, dest: Path) -> list[str]:
        return copy_support_files(self.folder, dest)


class HQQSource(Source):
    """A folder quantized with HQQ (``form``: ``hqq-qmodel.pt`` or ``hqq-safetensors``), read
    through the reader of its files, its HQQ layers presented as packed Linear weights."""

    kind = "hf"

    def __init__(self, folder: Path, form: str):
        self.folder = folder
        self.ref = str(folder)
        self.imported_from = form
        self.files: Source = QmodelSource(folder) if form == QMODEL else HFFolderSource(folder)
        self.license = self.files.license
        infos = {info.name: info for info in self.files.tensors()}
        modules = {name[: -len(".W_q")] for name in infos if name.endswith(".W_q")}
        if not modules:
            raise SourceError(f"{self.ref}: no HQQ layer found (no <module>.W_q tensor)")
        # a layer's fields are <module>.<field>; its weight is listed at the place of its first
        # field on disk, its bias (a plain tensor of the model) at its own place
        self._fields: dict[str, dict[str, str]] = {}
        order: list[str] = []  # copied tensor names and packed modules, in disk order
        self._copied: dict[str, TensorInfo] = {}
        for name, info in infos.items():
            module, _, field = name.rpartition(".")
            if module not in modules or field == "bias":
                self._copied[name] = info
                order.append(name)
                continue
            if module not in self._fields:
                self._fields[module] = {}
                order.append(module)
            self._fields[module][field] = name
        self._layers: dict[str, HQQLayer] = {}
        self._round_zero: dict[str, bool] = {}
        self._compute_dtype: dict[str, torch.dtype | None] = {}
        for module in self._fields:
            tensors = self._read_fields(module, infos)
            self._layers[module] = self._parse(module, tensors)
            self._round_zero[module] = layer_round_zero(tensors, self._layers[module].nbits)
            self._compute_dtype[module] = layer_compute_dtype(tensors)
        self._infos = [
            self._copied[name] if name in self._copied else self._weight_info(name) for name in order
        ]

    def _weight_info(self, module: str) -> TensorInfo:
        layer = self._layers[module]
        return TensorInfo(f"{module}.weight", tuple(layer.shape), layer.W_q.dtype)

    def _read_fields(
        self, module: str, infos: dict[str, TensorInfo] | None = None
    ) -> dict[str, torch.Tensor]:
        """The layer's tensors by field; given ``infos``, its data fields are shapes only
        (tensors on the meta device), so opening the source reads just the small meta fields."""
        tensors = {}
        for field, name in self._fields[module].items():
            if infos is not None and field in DATA_FIELDS:
                info = infos[name]
                tensors[field] = torch.empty(info.shape, dtype=info.dtype, device="meta")
            else:
                tensors[field] = self.files.read(name)
        return tensors

    def _parse(self, module: str, tensors: dict[str, torch.Tensor]) -> HQQLayer:
        """The layer decoded and checked, a complaint prefixed with its file and name."""
        try:
            return parse_imported_layer(tensors)
        except ArtifactError as exc:
            raise ArtifactError(f"{self._where(module)}: {exc}") from None

    def _where(self, module: str) -> str:
        return f"{self.files.location(self._fields[module]['W_q'])}: layer {module}"

    # -- Source ---------------------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        return self.files.config_dict()

    def tensors(self) -> list[TensorInfo]:
        return list(self._infos)

    def read(self, name: str, pin_memory: bool = False) -> torch.Tensor:
        if name not in self._copied:
            raise SourceError(f"{self.ref}: {name} is stored quantized with HQQ: it has no float values")
        return self.files.read(name, pin_memory=pin_memory)

    def location(self, name: str) -> str:
        return self.files.location(name)

    def hashed_files(self) -> list[Path]:
        return self.files.hashed_files()

    def start_hashing(self) -> None:
        self.files.start_hashing()

    def file_hashes(self) -> dict[str, dict]:
        return self.files.file_hashes()

    def write_support_files(self, dest: Path) -> list[str]:
        return self.files.write_support_files(dest)

    def default_dtype(self) -> torch.dtype:
        """The copied tensors' most common float dtype, else the layers' most common compute
        dtype, else bfloat16."""
        floats = Counter(
            info.dtype
            for name, info in self._copied.items()
            if info.dtype in FLOAT_DTYPES and name.rpartition(".")[0] not in self._fields
        )
        if floats:
            return floats.most_common(1)[0][0]
        return Counter(self._compute_dtype.values()).most_common(1)[0][0] or torch.bfloat16

    def close(self) -> None:
        self.files.close()

    # -- the packed layers ----------------------------------------------------------------------
    def packed_layers(self) -> dict[str, PackedLayer]:
        fmt = get_format(METHOD)
        return {
            module: PackedLayer(
                tuple(layer.shape),
                fmt.label({"bits": layer.nbits, "group_size": layer.group_size, "axis": layer.axis}),
                self._where(module),
            )
            for module, layer in self._layers.items()
        }

    def packed_specs(self, module: str, dtype: str) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return canonical_specs(self._layers[module], dtype)

    def packed(self, module: str, dtype: str) -> dict[str, torch.Tensor]:
        tensors = self._read_fields(module)
        return canonical_layer(self._parse(module, tensors), tensors, dtype)

    def imported_recipe(self, dtype: str) -> dict[str, Any]:
        """The most common layer format; ``mixed`` when the layers differ in bits, group size or axis."""
        styles = Counter(
            (layer.nbits, layer.group_size, layer.axis, self._round_zero[module])
            for module, layer in self._layers.items()
        )
        (bits, group_size, axis, round_zero), _ = styles.most_common(1)[0]
        recipe: dict[str, Any] = {
            "method": METHOD,
            "bits": bits,
            "group_size": group_size,
            "axis": axis,
            "round_zero": round_zero,
            "imported_from": self.imported_from,
            "mixed": len({style[:3] for style in styles}) > 1,
            "dtype": dtype,
            "skip": [],
        }
        recipe["label"] = get_format(METHOD).label(recipe) + (" (mixed)" if recipe["mixed"] else "")
        return recipe
