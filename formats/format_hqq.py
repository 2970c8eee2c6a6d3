"""HQQ (half-quadratic quantization), 1/2/3/4/5/6/8 bits, in hqq's own ``HQQLinear`` layout.

On disk, per quantized ``nn.Linear``, the tensors of hqq's ``HQQLinear.state_dict()`` as
transformers 4.x flattened them into safetensors (``<module>.W_q``, ``.scale``, ``.zero`` and
the meta fields ``.nbits``, ``.group_size``, ``.shape``, ``.axis``, ``.packing`` ... encoded
as hqq's ``encode_safetensor_type`` does: bools uint8, ints int32, strings as uint8 codes);
the codec is formats/hqq_layout.py, the numbers formats/hqq_solver.py.
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

import math
from typing import Any

import torch
from torch import nn

from qconv.errors import SourceError, UsageError
from qconv.formats import uniform_calibrated
from qconv.formats.base import Option, PrepareContext, Prepared, QuantFormat, check_choice, register
from qconv.formats.gptq import Grid, quantize_gptq
from qconv.formats.hqq_layout import (
    BITS,
    BOOL_FIELDS,
    CODES_PER_ELEMENT,
    PACKING,
    STORAGE_DTYPE,
    HQQLayer,
    group_grid,
    layer_tensors,
    packed_shape,
    parse_layer,
    scale_dtype,
)
from qconv.formats.hqq_solver import (
    BETA,
    ITERS,
    KAPPA,
    LP_NORM,
    SolverParams,
    quantize_fast,
    quantize_reference,
)
from qconv.manifest import recipe_of
from qconv.modeling import load_with_runtime_modules

SOLVERS = ("qconv", "hqq")


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
                    # no choices here: compressed-tensors declares --solver too (rtn, hqq);
                    # make_recipe checks the value with the same message
                ),
                *uniform_calibrated.calibration_options("hqq"),
            ),
        )

    def make_recipe(self, options: dict[str, Any]) -> dict[str, Any]:
        given = self.given_options(options)
        calibration = uniform_calibrated.calibration_recipe(given)
        bits = given["bits"] or 4
        check_choice(self, "bits", bits, BITS)
        group_size = given["group_size"] or 64
        if group_size % 8:
            # hqq's BaseQuantizeConfig refuses these (hqq/core/quantize.py hqq_base_quant_config).
            raise UsageError(
                "{method}: {option} {value} must be a multiple of 8",
                option="group_size",
                value=group_size,
                method=self.name,
            )
        axis = 1 if given["axis"] is None else given["axis"]
        if given["solver"] is not None:
            check_choice(self, "solver", given["solver"], SOLVERS)
        recipe = {
            "method": self.name,
            "bits": bits,
            "group_size": group_size,
            "axis": axis,
            "solver": given["solver"] or "qconv",
            # hqq's defaults (hqq_base_quant_config and optimize_weights_proximal_legacy)
            "round_zero": bits == 4,
            "optimize": True,
            "lp_norm": LP_NORM,
            "beta": BETA,
            "kappa": KAPPA,
            "iters": ITERS,
        }
        if calibration is None:
            return recipe
        if given["solver"] is not None:
            raise UsageError(
                "{method}: {option} {value} is data-free; with --calibration the solver is GPTQ",
                option="solver",
                value=given["solver"],
                method=self.name,
            )
        if axis != 1:
            # GPTQ walks the input columns; axis-0 groups run along the outputs of a column set
            # that depends on the layer's shape, so their scales could not follow the walk
            raise UsageError(
                "{method}: {option} {value} cannot be calibrated (GPTQ needs groups along the inputs, "
                "axis 1)",
                option="axis",
                value=axis,
                method=self.name,
            )
        # a calibrated zero is any float (hqq stores it so): not rounded, whatever the bits
        recipe.update(
            solver=uniform_calibrated.SOLVER,
            round_zero=False,
            calibration=calibration,
            gptq=uniform_calibrated.solver_settings(),
        )
        return recipe

    def label(self, recipe: dict) -> str:
        axis = "" if recipe["axis"] == 1 else " axis0"
        calibrated = " gptq" if recipe.get("calibration") else ""
        return f"hqq {recipe['bits']}-bit g{recipe['group_size']}{axis}{calibrated}"

    def skip_reason(self, module_name: str, shape: tuple[int, ...], recipe: dict) -> str | None:
        group = recipe["group_size"]
        if len(shape) != 2:
            return f"not a 2-D weight ({list(shape)})"
        if math.prod(shape) % group:
            return f"{shape[0]}x{shape[1]} weights do not split into groups of {group}"
        rows, _ = group_grid(shape, recipe["group_size"], recipe["axis"])
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
        rows, cols = group_grid(shape, recipe["group_size"], recipe["axis"])
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

    def prepare(self, context: PrepareContext) -> Prepared | None:
        if not context.recipe.get("calibration"):
            return None
        return uniform_calibrated.prepare(context, self)

    def gptq_layer(
        self, weight: torch.Tensor, xtx: torch.Tensor, recipe: dict
    ) -> dict[str, torch.Tensor] | None:
        """GPTQ's numbers for one layer in hqq's layout (formats/gptq.py): codes 0..2^bits-1, a
        float zero and a scale per group, both as stored; None when the groups would span
        output rows (the group size does not divide the inputs)."""
        out_features, in_features = weight.shape
        group = recipe["group_size"]
        if in_features % group:
            return None
        grid = Grid(0, 2 ** recipe["bits"] - 1, False, "float", scale_dtype(recipe))
        result = quantize_gptq(weight, xtx, group, grid)
        codes = result.codes.to(torch.uint8).reshape(-1, group)
        scale, zero = result.scale.reshape(-1, 1), result.zero.reshape(-1, 1)
        return layer_tensors(codes, scale, zero, recipe, (out_features, in_features))

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

        return load_with_runtime_modules(folder, self, device, dtype, recipe_of(folder))


register(HQQFormat())
