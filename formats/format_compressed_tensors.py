"""compressed-tensors: the checkpoints vLLM and SGLang serve, as llm-compressor writes them.

A scheme is named and defined as llm-compressor's presets define it (compressed_tensors'
``PRESET_SCHEMES``); ``ct_layout.py`` holds the schemes, llm-compressor's round-to-nearest
numbers and the bytes. On disk, per quantized ``nn.Linear`` ``L``:

- pack-quantized (W4A16, W4A16_ASYM, W8A16): ``L.weight_packed`` int32 ``[out, ceil(in * bits
  / 32)]``, ``L.weight_scale`` ``[out, in / group]`` in the model's dtype, ``L.weight_shape``
  int64 ``[2]``, and for W4A16_ASYM ``L.weight_zero_point`` int32 ``[ceil(out / 8), groups]``
  (the int8 zero points packed along the output dimension);
- int-quantized (W8A8): ``L.weight`` int8 ``[out, in]``, ``L.weight_scale`` ``[out, 1]``;
- float-quantized (FP8_DYNAMIC): ``L.weight`` float8_e4m3fn ``[out, in]``, ``L.weight_scale``
  ``[out, 1]``.

``config.json``'s ``quantization_config`` is compressed-tensors' ``QuantizationConfig`` as
llm-compressor saves it: one config group targeting ``Linear``, the format, ``ignore`` naming
every Linear left unquantized (lm_head included), ``quantization_status: compressed``.
Stock transformers with compressed-tensors installed loads the folder (decompressing on the CPU);
vLLM and SGLang serve it.

Solvers: ``rtn`` is llm-compressor's round to nearest, byte for byte; ``hqq`` (integer schemes
only, ``ct_solver.py``) searches the same grid, per group, for the lowest x^2-weighted error
(llama.cpp's data-free k-quant weighting, refitted with HQQ's half-quadratic step) in the same
bytes, keeping rtn's numbers wherever it finds nothing better and each layer's relative error at
most rtn's, and records rtn's error beside its own for every layer in the manifest
(``rtn_rel_error``).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch

from qconv.errors import ArtifactError, SourceError, UsageError
from qconv.formats import ct_layout, ct_solver, uniform_calibrated
from qconv.formats.base import Option, PrepareContext, Prepared, QuantFormat, check_choice, register
from qconv.formats.gptq import Grid, quantize_gptq

DEFAULT_SCHEME = "W4A16"
#: rtn: llm-compressor's round to nearest; hqq: ct_solver.py (integer schemes)
SOLVERS = ("rtn", "hqq")
#: the compressed-tensors release whose format this writes (config.json's ``version``)
FORMAT_VERSION = "0.20.1"
#: FP8's static activation scales come from calibration data, which this method does not run
NEEDS_CALIBRATION = {"FP8": "FP8_DYNAMIC"}


def _args(
    bits: int, kind: str, strategy: str, symmetric: bool, group_size: int | None, dynamic: bool
) -> dict:
    """compressed_tensors' ``QuantizationArgs`` as llm-compressor serializes them."""
    return {
        "actorder": None,
        "block_structure": None,
        "dynamic": dynamic,
        "group_size": group_size,
        "num_bits": bits,
        # llm-compressor's weight observer (its round to nearest); activations: none (dynamic)
        "observer": None if dynamic else "memoryless_minmax",
        "observer_kwargs": {},
        "scale_dtype": None,
        "strategy": strategy,
        "symmetric": symmetric,
        "type": kind,
        "zp_dtype": None if symmetric else "torch.int8",
    }


class CompressedTensorsFormat(QuantFormat):
    def __init__(self) -> None:
        super().__init__(
            name="compressed-tensors",
            description="compressed-tensors (llm-compressor's schemes): the checkpoints vLLM and SGLang serve",
            libraries=("compressed-tensors",),
            quant_method="compressed-tensors",
            stock_loader="transformers",
            extra="compressed-tensors",
            serving_engines=("vllm", "sglang"),
            options=(
                Option(
                    "scheme",
                    str,
                    f"compressed-tensors: llm-compressor's scheme, {', '.join(ct_layout.SCHEMES)} "
                    f"(default {DEFAULT_SCHEME})",
                    default=DEFAULT_SCHEME,
                ),
                Option(
                    "group_size", int, "compressed-tensors: inputs sharing a scale (default: the scheme's)"
                ),
                Option(
                    "solver",
                    str,
                    "compressed-tensors: 'rtn' (llm-compressor's round to nearest) or 'hqq' (a search "
                    "of the same grid for the lowest x^2-weighted error per group, refitted with HQQ's "
                    "step; each layer's error never above rtn's)",
                    default="rtn",
                ),
                *uniform_calibrated.calibration_options("compressed-tensors"),
            ),
        )
        #: the hqq solver's comparison with rtn for the layer ``quantize`` solved last (read by
        #: SolverComparison into the manifest; one conversion at a time per process)
        self.last_solver_stats: dict[str, Any] = {}

    def make_recipe(self, options: dict[str, Any]) -> dict[str, Any]:
        given = self.given_options(options)
        name = given["scheme"]
        if name in NEEDS_CALIBRATION:
            raise UsageError(
                "{method}: {option} {value} needs static activation scales from calibration data; "
                f"use {NEEDS_CALIBRATION[name]} (dynamic activation scales)",
                option="scheme",
                value=name,
                method=self.name,
            )
        check_choice(self, "scheme", name, tuple(ct_layout.SCHEMES))
        check_choice(self, "solver", given["solver"], SOLVERS)
        scheme = ct_layout.SCHEMES[name]
        if given["solver"] == "hqq" and scheme.weight_type != "int":
            raise UsageError(
                f"{{method}}: {{option}} {{value}} does not apply to {name}: FP8 has no integer grid to search",
                option="solver",
                value="hqq",
                method=self.name,
            )
        group_size = given["group_size"]
        if group_size is not None and scheme.strategy != "group":
            raise UsageError(
                "{method}: {option} does not apply to " + name + " (one scale per output channel)",
                option="group_size",
                method=self.name,
            )
        if group_size is not None and group_size < 1:
            raise UsageError("{option} {value}: give 1 or more", option="group_size", value=group_size)
        recipe = {
            "method": self.name,
            "scheme": name,
            "bits": scheme.bits,
            "group_size": group_size or scheme.group_size,
            "solver": given["solver"],
        }
        if given["solver"] == "hqq":
            recipe["hqq"] = ct_solver.solver_settings()  # what ran, for the manifest
        calibration = uniform_calibrated.calibration_recipe(given)
        if calibration is None:
            return recipe
        if scheme.weight_type != "int":
            raise UsageError(
                f"{{method}}: {{option}} does not apply to {name}: its weights are cast to FP8, "
                "no grid to fit",
                option="calibration",
                method=self.name,
            )
        if given["solver"] != "rtn":
            raise UsageError(
                "{method}: {option} {value} is data-free; with --calibration the solver is GPTQ",
                option="solver",
                value=given["solver"],
                method=self.name,
            )
        recipe.update(
            solver=uniform_calibrated.SOLVER,
            calibration=calibration,
            gptq=uniform_calibrated.solver_settings(),
        )
        return recipe

    def label(self, recipe: dict) -> str:
        scheme = ct_layout.SCHEMES[recipe["scheme"]]
        group = recipe["group_size"]
        suffix = f" g{group}" if group is not None and group != scheme.group_size else ""
        calibrated = " gptq" if recipe.get("calibration") else ""
        return f"compressed-tensors {recipe['scheme']}{suffix}{calibrated}"

    def skip_reason(self, module_name: str, shape: tuple[int, ...], recipe: dict) -> str | None:
        if len(shape) != 2:
            return f"not a 2-D weight ({list(shape)})"
        group = recipe["group_size"]
        if group is not None and shape[1] % group:
            # llm-compressor refuses such a layer ("tensor column shape must be divisible by the
            # given group_size"): it stays unquantized and is named in the ignore list
            return f"in_features {shape[1]} is not a multiple of the group size {group}"
        return None

    def output_specs(
        self, shape: tuple[int, ...], recipe: dict
    ) -> dict[str, tuple[torch.dtype, tuple] | None]:
        scheme = ct_layout.SCHEMES[recipe["scheme"]]
        out_features, in_features = shape
        dtype = _dtype(recipe)
        groups = 1 if scheme.strategy == "channel" else in_features // recipe["group_size"]
        if scheme.format == "pack-quantized":
            specs = {
                "weight_packed": (
                    torch.int32,
                    (out_features, ct_layout.packed_columns(in_features, scheme.bits)),
                ),
                "weight_scale": (dtype, (out_features, groups)),
                "weight_shape": (torch.int64, (2,)),
            }
            if not scheme.symmetric:
                rows = ct_layout.packed_columns(out_features, scheme.bits)
                specs["weight_zero_point"] = (torch.int32, (rows, groups))
            return specs
        code_dtype = ct_layout.FP8_DTYPE if scheme.weight_type == "float" else torch.int8
        return {
            "weight": (code_dtype, (out_features, in_features)),
            "weight_scale": (dtype, (out_features, 1)),
        }

    def prepare(self, context: PrepareContext) -> Prepared | None:
        if context.recipe.get("calibration"):
            return uniform_calibrated.prepare(context, self)
        # nothing to prepare: the hqq solver's comparison with rtn reaches the manifest through
        # Prepared.layer_stats, the pipeline's one hook for extra per-layer numbers
        if context.recipe["solver"] != "hqq":
            return None
        return SolverComparison(self)

    def quantize(self, weight: torch.Tensor, recipe: dict, device: torch.device) -> dict[str, torch.Tensor]:
        if not torch.isfinite(weight).all():
            raise SourceError("the weight has NaN or infinite values")
        scheme = ct_layout.SCHEMES[recipe["scheme"]]
        # llm-compressor computes in the model's dtype (the working dtype here); FP8 codes are
        # clipped to +-448 after scaling, as llm-compressor does: the per-channel scale maps the
        # largest magnitude to 448, so the clip only absorbs the rounding of that scale
        if recipe.get("solver") == "hqq":
            solved = ct_solver.quantize_hqq(weight.to(_dtype(recipe)), scheme, recipe["group_size"])
            self.last_solver_stats = {
                "rtn_rel_error": solved.rtn_rel_error,
                "hqq_groups": f"{solved.groups_improved}/{solved.groups}",
                "hqq_choice": solved.choice,
            }
            quantized = solved.quantized
        else:
            quantized = ct_layout.quantize_rtn(weight.to(_dtype(recipe)), scheme, recipe["group_size"])
        return _stored_tensors(quantized, scheme, weight)

    def gptq_layer(self, weight: torch.Tensor, xtx: torch.Tensor, recipe: dict) -> dict[str, torch.Tensor]:
        """GPTQ's numbers for one layer on the scheme's grid (formats/gptq.py): llm-compressor's
        code range, scales in the checkpoint's dtype, integer zero points (asymmetric), the
        range of a group always holding 0 as llm-compressor's ``calculate_qparams`` keeps it."""
        scheme = ct_layout.SCHEMES[recipe["scheme"]]
        q_min, q_max = (int(v) for v in ct_layout.code_range(scheme))
        size = weight.shape[1] if scheme.strategy == "channel" else recipe["group_size"]
        grid = Grid(
            q_min, q_max, scheme.symmetric, "int", _dtype(recipe), (q_max - q_min) / 2, holds_zero=True
        )
        result = quantize_gptq(weight, xtx, size, grid)
        quantized = ct_layout.Quantized(
            result.codes.to(torch.int8),
            result.scale.to(_dtype(recipe)),
            None if scheme.symmetric else result.zero.to(torch.int8),
        )
        return _stored_tensors(quantized, scheme, weight)

    def dequantize(self, tensors: dict[str, torch.Tensor], recipe: dict) -> torch.Tensor:
        scheme = ct_layout.SCHEMES[recipe["scheme"]]
        return ct_layout.dequantize(*parse_layer(tensors, scheme))

    def quantization_config(self, recipe: dict, plan: Any) -> dict[str, Any]:
        scheme = ct_layout.SCHEMES[recipe["scheme"]]
        weights = _args(
            scheme.bits, scheme.weight_type, scheme.strategy, scheme.symmetric, recipe["group_size"], False
        )
        activations = None
        if scheme.activations is not None:
            bits, kind = scheme.activations
            activations = _args(bits, kind, "token", True, None, True)
        return {
            "config_groups": {
                "group_0": {
                    "format": scheme.format,
                    "input_activations": activations,
                    "output_activations": None,
                    "targets": ["Linear"],
                    "weights": weights,
                }
            },
            "format": scheme.format,
            "global_compression_ratio": None,
            # the Linear modules left unquantized, by name, in the model's module order as
            # llm-compressor lists them (tests/test_format_compressed_tensors.py compares)
            "ignore": plan.in_model_order(plan.skipped),
            "kv_cache_scheme": None,
            "quant_method": "compressed-tensors",
            "quantization_status": "compressed",
            "sparsity_config": {},
            "transform_config": {},
            "version": FORMAT_VERSION,
        }

    def load_pretrained(self, folder, device: torch.device, dtype: torch.dtype):
        """Stock transformers (with compressed-tensors installed), from config.json alone.

        A folder with zero points (W4A16_ASYM) loads with ``dequantize=True``: transformers 5.24
        lays the compressed modules out with compressed-tensors' ``compress_model`` on the meta
        device, whose pack-quantized branch leaves ``weight_zero_point`` unpacked (``[out,
        groups]``) while llm-compressor writes it packed (``[out / 8, groups]``, as vLLM reads
        it), so the compressed load refuses llm-compressor's own W4A16_ASYM folders; decompressing
        at load reads them. (transformers 5.17 loaded them compressed.)"""
        from transformers import AutoModelForCausalLM, CompressedTensorsConfig  # heavy: only loading needs it

        kwargs = {}
        if _has_zero_points(folder):
            kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
        return AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=dtype, device_map=str(device), **kwargs
        )

    def input_quantizer(self, recipe: dict):
        scheme = ct_layout.SCHEMES.get(recipe.get("scheme"))
        if scheme is None or scheme.activations is None:
            return None
        return functools.partial(ct_layout.quantize_activations, activations=scheme.activations)

    def loader_tolerance(self, recipe: dict) -> float:
        # Loaded compressed (W4A16, W8A16, and W8A8 / FP8_DYNAMIC whose inputs qconv's reference
        # quantizes as compressed-tensors does: input_quantizer): compressed-tensors' forward
        # decompresses the same bytes exactly (in float32 here), so only the matmul's order
        # differs (an activation code may still flip where that order moves a value across a
        # rounding boundary). W4A16_ASYM, loaded with dequantize=True: the weights are
        # decompressed in the checkpoint's dtype, i.e. qconv's exact values rounded once to
        # bfloat16 (measured 0.17% of the logits' norm on the tiny test Llama, 0.48% on SmolLM2).
        scheme = ct_layout.SCHEMES[recipe["scheme"]]
        return 1e-3 if scheme.symmetric else 1e-2


class SolverComparison(Prepared):
    """What ``--solver hqq`` adds to each layer's manifest entry: ``rtn_rel_error``, rtn's
    relative error on the same weight (measured as the entry's own ``rel_error``),
    ``hqq_groups``, how many groups left rtn's numbers, and ``hqq_choice``, which of the solver's
    choices the layer kept (``ct_solver.Solved.choice``). The pipeline calls ``packed`` (None:
    quantize as usual), then the format's ``quantize``, then ``layer_stats``, one layer at a
    time, so the stats of the layer just quantized are the format's ``last_solver_stats``."""

    def __init__(self, fmt: CompressedTensorsFormat):
        self._fmt = fmt

    def packed(self, module: str) -> dict[str, torch.Tensor] | None:
        self._fmt.last_solver_stats = {}
        return None

    def layer_stats(self, module: str) -> dict[str, Any]:
        stats, self._fmt.last_solver_stats = self._fmt.last_solver_stats, {}
        return stats


def _stored_tensors(
    quantized: ct_layout.Quantized, scheme: ct_layout.Scheme, weight: torch.Tensor
) -> dict[str, torch.Tensor]:
    """One layer's numbers as the scheme's compressor stores them."""
    if scheme.format != "pack-quantized":
        return {"weight": quantized.codes, "weight_scale": quantized.scale}
    out = {
        "weight_packed": ct_layout.pack_int32(quantized.codes, scheme.bits),
        "weight_scale": quantized.scale,
        "weight_shape": torch.tensor(list(weight.shape), dtype=torch.int64, device=weight.device),
    }
    if quantized.zero_point is not None:
        out["weight_zero_point"] = ct_layout.pack_int32(quantized.zero_point, scheme.bits, packed_dim=0)
    return out


def _has_zero_points(folder) -> bool:
    config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    groups = config.get("quantization_config", {}).get("config_groups", {})
    return any(not (group.get("weights") or {}).get("symmetric", True) for group in groups.values())


def _dtype(recipe: dict) -> torch.dtype:
    """The dtype llm-compressor would compute in: the model's (the recipe's working dtype)."""
    return getattr(torch, recipe.get("dtype", "bfloat16"))


def parse_layer(
    tensors: dict[str, torch.Tensor], scheme: ct_layout.Scheme
) -> tuple[ct_layout.Quantized, int]:
    """(the numbers, in_features) of one stored layer, checked. Raises ArtifactError saying what
    is wrong; callers add the layer's name."""
    names = (
        ["weight_packed", "weight_scale", "weight_shape"]
        if scheme.format == "pack-quantized"
        else ["weight", "weight_scale"]
    )
    if scheme.format == "pack-quantized" and not scheme.symmetric:
        names.append("weight_zero_point")
    missing = [name for name in names if name not in tensors]
    if missing:
        raise ArtifactError(f"missing compressed-tensors tensor(s) {', '.join(missing)}")
    scale = tensors["weight_scale"]
    if not scale.dtype.is_floating_point or scale.dim() != 2:
        raise ArtifactError(f"weight_scale is {_describe(scale)}, expected a 2-D float tensor")
    if scheme.format != "pack-quantized":
        codes = tensors["weight"]
        expected = ct_layout.FP8_DTYPE if scheme.weight_type == "float" else torch.int8
        if codes.dtype != expected or codes.dim() != 2 or tuple(scale.shape) != (codes.shape[0], 1):
            raise ArtifactError(f"weight is {_describe(codes)} with weight_scale {_describe(scale)}")
        return ct_layout.Quantized(codes, scale, None), codes.shape[1]
    shape = tensors["weight_shape"].tolist()
    packed = tensors["weight_packed"]
    if len(shape) != 2 or packed.dtype != torch.int32 or packed.dim() != 2:
        raise ArtifactError(f"weight_packed is {_describe(packed)} for weight_shape {shape}")
    out_features, in_features = shape
    if tuple(packed.shape) != (out_features, ct_layout.packed_columns(in_features, scheme.bits)):
        raise ArtifactError(f"weight_packed is {_describe(packed)}, expected for weight_shape {shape}")
    groups = scale.shape[1]
    if scale.shape[0] != out_features or in_features % groups:
        raise ArtifactError(f"weight_scale is {_describe(scale)} for weight_shape {shape}")
    codes = ct_layout.unpack_int32(packed, scheme.bits, in_features)
    zero = None
    if not scheme.symmetric:
        packed_zero = tensors["weight_zero_point"]
        rows = ct_layout.packed_columns(out_features, scheme.bits)
        if packed_zero.dtype != torch.int32 or tuple(packed_zero.shape) != (rows, groups):
            raise ArtifactError(
                f"weight_zero_point is {_describe(packed_zero)}, expected int32 [{rows}, {groups}]"
            )
        zero = ct_layout.unpack_int32(packed_zero, scheme.bits, out_features, packed_dim=0)
    return ct_layout.Quantized(codes, scale, zero), in_features


def _describe(tensor: torch.Tensor) -> str:
    return f"{str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)}"


register(CompressedTensorsFormat())
