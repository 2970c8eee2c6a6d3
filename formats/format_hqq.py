"""HQQ (half-quadratic quantization), 1/2/3/4/5/6/8 bits, in hqq's own ``HQQLinear`` layout.

On disk, per quantized ``nn.Linear``, the tensors of hqq's ``HQQLinear.state_dict()`` as
transformers 4.x flattened them into safetensors (``<module>.W_q``, ``.scale``, ``.zero`` and
the meta fields ``.nbits``, ``.group_size``, ``.shape``, ``.axis``, ``.packing`` ... encoded
as hqq's ``encode_safetensor_type`` does: bools uint8, ints int32, strings as uint8 codes).
hqq's ``HQQLinear(None, cfg, initialize=False).load_state_dict`` reads it back
(tests/test_format_hqq.py). ``config.json`` carries transformers' ``HqqConfig`` dict.

Deliberate differences from what transformers 4.x wrote: ``scale`` and ``zero`` are stored in
float16 (float32 for float32 models) rather than in the model's dtype: in bfloat16 the 8-bit
scale alone would cost half a quantization step at the ends of a group. hqq casts them to its
compute dtype on load, so its readers are unaffected.

transformers 5.x can neither quantize nor load HQQ (it silently leaves random weights:
FORMATS.md); ``qconv.load_model`` runs these folders with :class:`HQQDequantLinear`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qconv.errors import ArtifactError, SourceError, UsageError
from qconv.formats.base import Option, QuantFormat, check_choice, register, reject_foreign_options
from qconv.formats.hqq_solver import (
    BETA,
    ITERS,
    KAPPA,
    LP_NORM,
    SolverParams,
    quantize_fast,
    quantize_reference,
)

BITS = (1, 2, 3, 4, 5, 6, 8)
# hqq 0.2.8 core/quantize.py Quantizer.bit_to_packing: 5 and 6 bits are stored one a byte.
PACKING = {8: "8bit_u8", 6: "8bit_u8", 5: "8bit_u8", 4: "4bit_u8", 3: "3bit_32", 2: "2bit_u8", 1: "1bit_u8"}
# Codes in one storage element: the first rows of W_q go to the highest bits (hqq BitPack).
CODES_PER_ELEMENT = {"8bit_u8": 1, "4bit_u8": 2, "2bit_u8": 4, "1bit_u8": 8, "3bit_32": 10}
BITS_PER_CODE = {"8bit_u8": 8, "4bit_u8": 4, "2bit_u8": 2, "1bit_u8": 1, "3bit_32": 3}
STORAGE_DTYPE = {"3bit_32": torch.int32}  # the others: uint8
SOLVERS = ("qconv", "hqq")

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
        numel = self.shape[0] * self.shape[1]
        if self.axis == 1:
            return (numel // self.group_size, self.group_size)
        return (self.group_size, numel // self.group_size)

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


# -- the runnable module ------------------------------------------------------------------------
class HQQDequantLinear(nn.Module):
    """A Linear whose weight is kept in hqq's packed layout and dequantized at each call (or
    once, with ``cache=True``), in the input's dtype. Works on any device torch does."""

    def __init__(self, layer: HQQLayer, bias: torch.Tensor | None, cache: bool = False):
        super().__init__()
        self.out_features, self.in_features = layer.shape
        self.nbits, self.group_size, self.axis, self.packing = (
            layer.nbits,
            layer.group_size,
            layer.axis,
            layer.packing,
        )
        self.register_buffer("W_q", layer.W_q)
        self.register_buffer("scale", layer.scale)
        self.register_buffer("zero", layer.zero)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.cache = cache
        self._weight: torch.Tensor | None = None

    def layer(self) -> HQQLayer:
        return HQQLayer(
            self.W_q,
            self.scale,
            self.zero,
            self.nbits,
            self.group_size,
            self.axis,
            (self.out_features, self.in_features),
            self.packing,
        )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.layer().dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self._weight
        if weight is None or weight.dtype != x.dtype or weight.device != x.device:
            weight = self.dequantize(x.dtype)
            if self.cache:
                self._weight = weight
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, nbits={self.nbits}, "
            f"group_size={self.group_size}, axis={self.axis}, bias={self.bias is not None}"
        )


# -- the format ---------------------------------------------------------------------------------
class HQQFormat(QuantFormat):
    def __init__(self) -> None:
        super().__init__(
            name="hqq",
            description="HQQ 1/2/3/4/5/6/8-bit, calibration-free, hqq's HQQLinear layout",
            libraries=("hqq",),
            quant_method="hqq",
            stock_loader=None,  # transformers 5.x fills HQQ layers with random weights
            extra="hqq",
            options=(
                Option("bits", int, "bits a weight"),
                Option("group_size", int, "hqq: weights sharing one scale and zero (default 64)"),
                Option(
                    "axis",
                    int,
                    "hqq: 1 groups along input features (default), 0 along outputs",
                    choices=(0, 1),
                ),
                Option(
                    "solver",
                    str,
                    "hqq: 'qconv' (default: each group keeps its best iterate, fused GPU kernel) or "
                    "'hqq' (hqq's own algorithm, reproduced exactly)",
                    choices=SOLVERS,
                ),
            ),
        )

    def make_recipe(self, options: dict[str, Any]) -> dict[str, Any]:
        reject_foreign_options(self, options, {"bits", "group_size", "axis", "solver"})
        bits = options.get("bits") or 4
        check_choice(self, "bits", bits, BITS)
        group_size = options.get("group_size") or 64
        if group_size % 8:
            # hqq's BaseQuantizeConfig refuses these (hqq/core/quantize.py hqq_base_quant_config).
            raise UsageError(f"--method hqq: --group-size {group_size} must be a multiple of 8")
        axis = 1 if options.get("axis") is None else options["axis"]
        check_choice(self, "axis", axis, (0, 1))
        return {
            "method": self.name,
            "bits": bits,
            "group_size": group_size,
            "axis": axis,
            "solver": options.get("solver") or "qconv",
            # hqq's defaults (hqq_base_quant_config and optimize_weights_proximal_legacy)
            "round_zero": bits == 4,
            "optimize": True,
            "lp_norm": LP_NORM,
            "beta": BETA,
            "kappa": KAPPA,
            "iters": ITERS,
        }

    def label(self, recipe: dict) -> str:
        axis = "" if recipe["axis"] == 1 else " axis0"
        return f"hqq {recipe['bits']}-bit g{recipe['group_size']}{axis}"

    def _grid(self, shape: tuple[int, ...], recipe: dict) -> tuple[int, int]:
        numel = math.prod(shape)
        if recipe["axis"] == 1:
            return (numel // recipe["group_size"], recipe["group_size"])
        return (recipe["group_size"], numel // recipe["group_size"])

    def skip_reason(self, module_name: str, shape: tuple[int, ...], recipe: dict) -> str | None:
        group = recipe["group_size"]
        if len(shape) != 2:
            return f"not a 2-D weight ({list(shape)})"
        if math.prod(shape) % group:
            return f"{shape[0]}x{shape[1]} weights do not split into groups of {group}"
        rows, _ = self._grid(shape, recipe)
        per = CODES_PER_ELEMENT[PACKING[recipe["bits"]]]
        if PACKING[recipe["bits"]] != "3bit_32" and rows % per:
            return f"{rows} group rows cannot be packed {per} a byte for {recipe['bits']}-bit"
        return None

    def output_suffixes(self, recipe: dict) -> list[str]:
        return [
            "W_q",
            "scale",
            "zero",
            "nbits",
            "group_size",
            "shape",
            "axis",
            "packing",
            "unpack_view_dtype",
            "compute_dtype",
            *BOOL_FIELDS,
        ]

    def output_specs(
        self, shape: tuple[int, ...], recipe: dict
    ) -> dict[str, tuple[torch.dtype, tuple] | None]:
        packing = PACKING[recipe["bits"]]
        rows, cols = self._grid(shape, recipe)
        groups = rows if recipe["axis"] == 1 else cols
        side = (groups, 1) if recipe["axis"] == 1 else (1, groups)
        storage = scale_dtype(recipe)
        specs: dict[str, tuple[torch.dtype, tuple] | None] = {
            "W_q": (STORAGE_DTYPE.get(packing, torch.uint8), packed_shape(rows, cols, packing)),
            "scale": (storage, side),
            "zero": (storage, side),
            "nbits": (torch.int32, ()),
            "group_size": (torch.int32, ()),
            "shape": (torch.int64, (2,)),
            "axis": (torch.int32, ()),
            "packing": (torch.uint8, (len(packing),)),
            "unpack_view_dtype": (torch.uint8, (len(str(STORAGE_DTYPE.get(packing, torch.uint8))),)),
            "compute_dtype": (torch.uint8, (len(f"torch.{recipe.get('dtype', 'float16')}"),)),
        }
        specs.update({key: (torch.uint8, ()) for key in BOOL_FIELDS})
        return specs

    def solver_params(self, recipe: dict) -> SolverParams:
        return SolverParams(
            bits=recipe["bits"],
            group_size=recipe["group_size"],
            axis=recipe["axis"],
            round_zero=recipe["round_zero"],
            lp_norm=recipe["lp_norm"],
            beta=recipe["beta"],
            iters=recipe["iters"],
        )

    def quantize(self, weight: torch.Tensor, recipe: dict, device: torch.device) -> dict[str, torch.Tensor]:
        params = self.solver_params(recipe)
        try:
            if recipe["solver"] == "hqq":
                if not torch.isfinite(weight).all():
                    raise ValueError("the weight has NaN or infinite values")
                result = quantize_reference(weight, params)
            else:
                result = quantize_fast(weight, params, PACKING[recipe["bits"]], scale_dtype(recipe))
        except ValueError as exc:
            raise SourceError(str(exc)) from None
        return layer_tensors(
            result.codes, result.scale, result.zero, recipe, tuple(weight.shape), result.packed
        )

    def dequantize(self, tensors: dict[str, torch.Tensor], recipe: dict) -> torch.Tensor:
        return parse_layer(tensors).dequantize()

    def quantization_config(self, recipe: dict, plan: Any) -> dict[str, Any]:
        # transformers' HqqConfig.to_dict(): hqq's BaseQuantizeConfig under "quant_config".
        return {
            "quant_method": "hqq",
            "quant_config": {
                "weight_quant_params": {
                    "nbits": recipe["bits"],
                    "channel_wise": True,
                    "group_size": recipe["group_size"],
                    "optimize": True,
                    "round_zero": recipe["round_zero"],
                    "axis": recipe["axis"],
                    "view_as_float": False,
                },
                "scale_quant_params": None,
                "zero_quant_params": None,
                "offload_meta": False,
            },
            "skip_modules": sorted(plan.skipped),
        }

    marker_suffix = "W_q"

    def runtime_module(
        self, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None, recipe: dict
    ) -> nn.Module:
        return HQQDequantLinear(parse_layer(tensors), bias)

    def load_pretrained(self, folder, device: torch.device, dtype: torch.dtype):
        from qconv.loader import load_with_runtime_modules

        return load_with_runtime_modules(folder, self, device, dtype)


register(HQQFormat())
