"""HQQ's on-disk forms and codec, as pure functions: no solver, no loader, no pipeline.

- The codec: hqq's ``BitPack`` layout of the integer codes (:func:`pack`, :func:`unpack`) and the
  per-layer state of hqq's ``HQQLinear`` as transformers 4.x flattened it into safetensors
  (``W_q``, ``scale``, ``zero`` and the meta fields encoded as hqq's ``encode_safetensor_type``
  does: bools uint8, ints int32, strings as uint8 codes). :func:`parse_layer` decodes and checks
  one layer; :func:`layer_tensors` encodes one. formats/format_hqq.py writes and runs this layout.
- The forms other tools leave on disk, read to import them (converter/sources/hqq.py):
  ``hqq-qmodel.pt``, what hqq's ``AutoHQQHFModel.save_quantized`` writes (``config.json`` and
  ``qmodel.pt``, a ``torch.save`` of ``{module name: state dict}``, read only with
  ``torch.load(weights_only=True)``: :func:`load_qmodel`, :func:`flatten_qmodel`); and
  ``hqq-safetensors``, a folder whose ``config.json`` says ``quant_method: hqq`` with the layers
  flattened as above (qconv's own HQQ artifacts included). :func:`canonical_layer` re-encodes an
  imported layer the way ``qconv convert --method hqq`` writes one.

The numbers of a layer: integer codes ``q`` in ``[0, 2^nbits - 1]``, one ``scale`` and one
``zero`` (floats) per group of ``group_size`` weights taken along ``axis`` of the weight
reshaped as hqq does; ``w = (q - zero) * scale``.
"""

from __future__ import annotations

import functools
import json
import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qconv.errors import ArtifactError, SourceError

BITS = (1, 2, 3, 4, 5, 6, 8)
# hqq 0.2.8 core/quantize.py Quantizer.bit_to_packing: 5 and 6 bits are stored one a byte.
PACKING = {8: "8bit_u8", 6: "8bit_u8", 5: "8bit_u8", 4: "4bit_u8", 3: "3bit_32", 2: "2bit_u8", 1: "1bit_u8"}
# Codes in one storage element: the first rows of W_q go to the highest bits (hqq BitPack).
CODES_PER_ELEMENT = {"8bit_u8": 1, "4bit_u8": 2, "2bit_u8": 4, "1bit_u8": 8, "3bit_32": 10}
BITS_PER_CODE = {"8bit_u8": 8, "4bit_u8": 4, "2bit_u8": 2, "1bit_u8": 1, "3bit_32": 3}
STORAGE_DTYPE = {"3bit_32": torch.int32}  # the others: uint8

#: meta fields of HQQLinear.state_dict() after W_q/scale/zero, with their encoded dtypes
BOOL_FIELDS = (
    "view_as_float",
    "quant_scale",
    "quant_zero",
    "offload_meta",
    "encoded_state_dict",
    "stores_quant_config",
    "channel_wise",
    "optimize",
    "round_zero",
)
INT_FIELDS = ("nbits", "group_size", "axis")
STRING_FIELDS = ("packing", "unpack_view_dtype", "compute_dtype")
REQUIRED_FIELDS = ("W_q", "scale", "zero", "nbits", "group_size", "shape", "axis", "packing")
# Dtype names hqq writes as strings; parsed from this table (hqq itself eval()s them).
DTYPES_BY_NAME = {
    "torch.float16": torch.float16,
    "torch.bfloat16": torch.bfloat16,
    "torch.float32": torch.float32,
    "torch.uint8": torch.uint8,
    "torch.int32": torch.int32,
}


# -- bit packing (hqq's BitPack layout, pure torch) --------------------------------------------
def group_grid(shape: tuple[int, ...], group_size: int, axis: int) -> tuple[int, int]:
    """Rows and columns of the unpacked codes of a weight of ``shape``: hqq reshapes the weight
    to ``[-1, group_size]`` (groups are rows, axis 1) or ``[group_size, -1]`` (columns, axis 0)."""
    numel = math.prod(shape)
    if axis == 1:
        return (numel // group_size, group_size)
    return (group_size, numel // group_size)


def packed_shape(rows: int, cols: int, packing: str) -> tuple[int, int]:
    per = CODES_PER_ELEMENT[packing]
    if packing == "3bit_32":
        return (math.ceil(rows / per), cols)  # hqq pads the rows to a multiple of 10
    return (rows // per, cols)


def pack(codes: torch.Tensor, packing: str) -> torch.Tensor:
    """uint8 codes ``[rows, cols]`` -> hqq's packed ``W_q`` (row slices stacked into the bits)."""
    per, bits = CODES_PER_ELEMENT[packing], BITS_PER_CODE[packing]
    if per == 1:
        return codes.to(torch.uint8)
    if packing == "3bit_32":
        rows = codes.shape[0]
        padded = torch.zeros(
            (math.ceil(rows / per) * per, codes.shape[1]), dtype=torch.int32, device=codes.device
        )
        padded[:rows] = codes
        source, dtype = padded, torch.int32
    else:
        source, dtype = codes.to(torch.uint8), torch.uint8
    step = source.shape[0] // per
    out = torch.zeros((step, source.shape[1]), dtype=dtype, device=codes.device)
    for slot in range(per):
        shift = bits * (per - 1 - slot)
        out |= source[slot * step : (slot + 1) * step].to(dtype) << shift
    return out


def unpack(packed: torch.Tensor, packing: str, rows: int) -> torch.Tensor:
    """hqq's packed ``W_q`` -> integer codes ``[rows, cols]`` (int32), padding dropped."""
    per, bits = CODES_PER_ELEMENT[packing], BITS_PER_CODE[packing]
    value = packed.to(torch.int32)
    mask = (1 << bits) - 1
    parts = [(value >> (bits * (per - 1 - slot))) & mask for slot in range(per)]
    return torch.cat(parts, dim=0)[:rows]


# -- the per-layer state ------------------------------------------------------------------------
def encode_string(text: str, device=None) -> torch.Tensor:
    return torch.tensor([ord(c) for c in text], dtype=torch.uint8, device=device)


def decode_string(tensor: torch.Tensor) -> str:
    return "".join(chr(int(c)) for c in tensor.reshape(-1).tolist())


@dataclass
class HQQLayer:
    """One layer's decoded HQQ state, checked for consistency."""

    W_q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    nbits: int
    group_size: int
    axis: int
    shape: tuple[int, int]
    packing: str

    @property
    def grid(self) -> tuple[int, int]:
        """Rows and columns of the unpacked codes, as hqq groups the weight."""
        return group_grid(self.shape, self.group_size, self.axis)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        rows, _ = self.grid
        codes = unpack(self.W_q, self.packing, rows).to(torch.float32)
        weight = (codes - self.zero.to(torch.float32)) * self.scale.to(torch.float32)
        return weight.reshape(self.shape).to(dtype)


def _scalar(tensors: dict[str, torch.Tensor], key: str) -> int:
    value = tensors[key]
    if value.numel() != 1 or value.dtype.is_floating_point:
        raise ArtifactError(
            f"meta field {key!r} must be one integer, found {value.dtype} {tuple(value.shape)}"
        )
    return int(value.reshape(-1)[0])


def parse_layer(tensors: dict[str, torch.Tensor]) -> HQQLayer:
    """Decode and check one layer's tensors (keys without the module prefix). Raises
    ArtifactError saying what is wrong; callers add the layer's name."""
    missing = [key for key in REQUIRED_FIELDS if key not in tensors]
    if missing:
        raise ArtifactError(f"missing HQQ field(s) {', '.join(missing)}")
    nbits = _scalar(tensors, "nbits")
    if nbits not in BITS:
        raise ArtifactError(f"unsupported nbits {nbits} (qconv reads {', '.join(map(str, BITS))})")
    packing = decode_string(tensors["packing"])
    if packing != PACKING[nbits]:
        raise ArtifactError(
            f"packing {packing!r} does not hold {nbits}-bit codes (hqq uses {PACKING[nbits]!r})"
        )
    for key in ("quant_scale", "quant_zero", "offload_meta"):
        if key in tensors and _scalar(tensors, key):
            raise ArtifactError(
                f"{key} is set: quantized or offloaded scale/zero (deprecated in hqq) is not supported"
            )
    group_size = _scalar(tensors, "group_size")
    axis = _scalar(tensors, "axis")
    shape = tuple(int(d) for d in tensors["shape"].reshape(-1).tolist())
    if axis not in (0, 1):
        raise ArtifactError(f"axis {axis} is not 0 or 1")
    if len(shape) != 2 or min(shape) <= 0:
        raise ArtifactError(f"shape {list(shape)} is not a 2-D weight shape")
    if group_size <= 0 or (shape[0] * shape[1]) % group_size:
        raise ArtifactError(f"group_size {group_size} does not divide the {shape[0]}x{shape[1]} weight")
    W_q = tensors["W_q"]
    storage = STORAGE_DTYPE.get(packing, torch.uint8)
    if "view_as_float" in tensors and _scalar(tensors, "view_as_float") and W_q.dtype != storage:
        W_q = W_q.view(storage)  # hqq's view_as_float keeps the packed bytes in a float tensor
    layer = HQQLayer(W_q, tensors["scale"], tensors["zero"], nbits, group_size, axis, shape, packing)
    rows, cols = layer.grid
    expected = packed_shape(rows, cols, packing)
    if rows % CODES_PER_ELEMENT[packing] and packing != "3bit_32":
        raise ArtifactError(f"{rows} groups rows cannot be packed {CODES_PER_ELEMENT[packing]} an element")
    if W_q.dtype != storage or tuple(W_q.shape) != expected:
        raise ArtifactError(
            f"W_q is {str(W_q.dtype).removeprefix('torch.')} {list(W_q.shape)}, expected "
            f"{str(storage).removeprefix('torch.')} {list(expected)} for {nbits}-bit {list(shape)} group {group_size} axis {axis}"
        )
    groups = rows if axis == 1 else cols
    for key in ("scale", "zero"):
        value = tensors[key]
        if not value.dtype.is_floating_point or value.numel() != groups:
            raise ArtifactError(
                f"{key} is {str(value.dtype).removeprefix('torch.')} {list(value.shape)}, expected {groups} floats"
            )
    layer.scale = layer.scale.reshape((groups, 1) if axis == 1 else (1, groups))
    layer.zero = layer.zero.reshape(layer.scale.shape)
    return layer


def layer_tensors(
    codes: torch.Tensor | None,
    scale: torch.Tensor,
    zero: torch.Tensor,
    recipe: dict,
    shape: tuple[int, int],
    packed: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Everything ``HQQLinear.state_dict()`` holds for one layer, encoded as hqq encodes it
    (from the codes, or from codes ``packed`` already)."""
    return {
        "W_q": packed if packed is not None else pack(codes, packing_of(recipe)),
        "scale": scale.to(scale_dtype(recipe)),
        "zero": zero.to(scale_dtype(recipe)),
        **meta_fields(
            recipe["bits"],
            recipe["group_size"],
            recipe["axis"],
            recipe["round_zero"],
            recipe.get("dtype"),
            shape,
        ),
    }


def packing_of(recipe: dict) -> str:
    return PACKING[recipe["bits"]]


@functools.lru_cache(maxsize=256)
def _meta_fields(
    bits: int, group_size: int, axis: int, round_zero: bool, dtype: str | None, shape: tuple[int, int]
) -> dict[str, torch.Tensor]:
    packing = PACKING[bits]

    def flag(value: bool) -> torch.Tensor:
        return torch.tensor(int(value), dtype=torch.uint8)

    def integer(value: int) -> torch.Tensor:
        return torch.tensor(value, dtype=torch.int32)

    return {
        "nbits": integer(bits),
        "group_size": integer(group_size),
        "shape": torch.tensor(list(shape), dtype=torch.int64),
        "axis": integer(axis),
        "packing": encode_string(packing),
        "unpack_view_dtype": encode_string(str(STORAGE_DTYPE.get(packing, torch.uint8))),
        "compute_dtype": encode_string(f"torch.{dtype or 'float16'}"),
        "view_as_float": flag(False),
        "quant_scale": flag(False),
        "quant_zero": flag(False),
        "offload_meta": flag(False),
        "encoded_state_dict": flag(True),
        "stores_quant_config": flag(True),
        "channel_wise": flag(True),
        "optimize": flag(True),
        "round_zero": flag(round_zero),
    }


def meta_fields(
    bits: int, group_size: int, axis: int, round_zero: bool, dtype: str | None, shape: tuple[int, int]
) -> dict[str, torch.Tensor]:
    """The meta tensors of a layer, made on the host once per recipe and shape (each tiny tensor
    made on a GPU would be a synchronous copy, costlier than solving a small layer). Shared
    between layers: never modify them."""
    return dict(_meta_fields(bits, group_size, axis, bool(round_zero), dtype, tuple(shape)))


def scale_dtype(recipe: dict) -> torch.dtype:
    return torch.float32 if recipe.get("dtype") == "float32" else torch.float16


# -- the forms other tools leave on disk, read to import them -----------------------------------
QMODEL_NAME = "qmodel.pt"
#: the two forms, as the manifest's recipe names them (``imported_from``)
QMODEL = "hqq-qmodel.pt"
SAFETENSORS = "hqq-safetensors"
#: a layer's fields that are data, not meta: never read while planning
DATA_FIELDS = ("W_q", "scale", "zero", "bias")
KNOWN_FIELDS = {*REQUIRED_FIELDS, *INT_FIELDS, *STRING_FIELDS, *BOOL_FIELDS, "bias"}


def folder_form(folder: Path) -> str | None:
    """``hqq-qmodel.pt`` or ``hqq-safetensors`` for a folder already quantized with HQQ, else None
    (also for anything unreadable: the ordinary source reader then reports it)."""
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


def encode_meta_value(value: Any) -> torch.Tensor | None:
    """A meta value as hqq's ``encode_safetensor_type`` stores it; None for a missing value.
    Raises TypeError (the type's name) for anything that is neither a tensor nor a plain value."""
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


def flatten_qmodel(path: Path, state: Any) -> dict[str, torch.Tensor]:
    """``qmodel.pt``'s ``{module: state dict}`` as flat ``<module>.<field>`` tensors, meta values
    encoded as for safetensors. hqq sets ``encoded_state_dict=False`` before saving, so a layer's
    meta fields are Python objects (int, bool, str, torch.Size, torch.dtype); modules left in
    float (embeddings, norms, lm_head) hold ``{"weight": tensor, ...}``."""
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
                    tensor = encode_meta_value(value)
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


def parse_imported_layer(tensors: dict[str, torch.Tensor]) -> HQQLayer:
    """:func:`parse_layer`, refusing fields hqq's ``HQQLinear`` does not have as well."""
    layer = parse_layer(tensors)
    unknown = sorted(set(tensors) - KNOWN_FIELDS)
    if unknown:
        raise ArtifactError(f"unknown HQQ field(s) {', '.join(unknown)}")
    return layer


def layer_flag(tensors: dict[str, torch.Tensor], key: str, default: bool) -> bool:
    """A boolean meta field (``default`` when absent or not one value)."""
    value = tensors.get(key)
    return default if value is None or value.numel() != 1 else bool(int(value.reshape(-1)[0]))


def layer_round_zero(tensors: dict[str, torch.Tensor], nbits: int) -> bool:
    return layer_flag(tensors, "round_zero", nbits == 4)  # hqq's default: round the zero at 4 bits


def layer_compute_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype | None:
    value = tensors.get("compute_dtype")
    return None if value is None else DTYPES_BY_NAME.get(decode_string(value))


def layer_recipe(layer: HQQLayer, round_zero: bool, dtype: str) -> dict[str, Any]:
    """The recipe entries :func:`layer_tensors` and the format's ``output_specs`` read."""
    return {
        "bits": layer.nbits,
        "group_size": layer.group_size,
        "axis": layer.axis,
        "round_zero": round_zero,
        "dtype": dtype,
    }


def canonical_specs(layer: HQQLayer, dtype: str) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """``{suffix: (dtype, shape)}`` of what :func:`canonical_layer` returns, in its order."""
    rows, cols = layer.grid
    packing = PACKING[layer.nbits]
    side = tuple(layer.scale.shape)
    return {
        "W_q": (STORAGE_DTYPE.get(packing, torch.uint8), packed_shape(rows, cols, packing)),
        "scale": (layer.scale.dtype, side),
        "zero": (layer.zero.dtype, side),
        **{
            key: (value.dtype, tuple(value.shape))
            for key, value in meta_fields(
                layer.nbits, layer.group_size, layer.axis, False, dtype, layer.shape
            ).items()
        },
    }


def canonical_layer(layer: HQQLayer, tensors: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """The layer as ``qconv convert --method hqq`` writes it: codes re-packed (the same bytes;
    a 3-bit layer's padding rows become zero), scale and zero as found (values and dtype), meta
    fields canonical (``view_as_float`` off, ``compute_dtype`` the artifact's ``dtype``)."""
    recipe = layer_recipe(layer, layer_round_zero(tensors, layer.nbits), dtype)
    rows, _ = layer.grid
    out = layer_tensors(unpack(layer.W_q, layer.packing, rows), layer.scale, layer.zero, recipe, layer.shape)
    out["scale"], out["zero"] = layer.scale.contiguous(), layer.zero.contiguous()
    for key in ("channel_wise", "optimize"):  # how the layer was made, as the source says
        out[key] = torch.tensor(int(layer_flag(tensors, key, True)), dtype=torch.uint8)
    return out
