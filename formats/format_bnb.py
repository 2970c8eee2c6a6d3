"""bitsandbytes: 4-bit NF4/FP4 (optionally double-quantized) and 8-bit LLM.int8 row-wise.

Quantization calls bitsandbytes' own functions on the chosen device, so the packed bytes are
exactly what bitsandbytes produces there (CPU and GPU bytes differ slightly: FORMATS.md). The
dequantizer below is pure torch and reads only the stored tensors, so ``qconv verify`` does not
trust the library it checks. The on-disk keys are those transformers writes and reads
(pinned by tests/test_format_bnb.py).
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch

from qconv.errors import MissingDependencyError, SourceError, UsageError
from qconv.formats.base import Option, QuantFormat, check_choice, register

BLOCKSIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes.functional.quantize_4bit
NESTED_BLOCKSIZE = 256  # bitsandbytes quantizes the absmax statistics in blocks of 256
INT8_THRESHOLD = 6.0  # LLM.int8 outlier threshold transformers writes; acts at run time only


def _bnb():
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError as exc:  # pragma: no cover - bitsandbytes is a dependency
        raise MissingDependencyError(f"the bnb method needs bitsandbytes: {exc}") from exc
    return bnb_functional


class BitsAndBytesFormat(QuantFormat):
    # transformers' replace_with_bnb_linear (integrations/bitsandbytes.py) replaces modules whose
    # type is exactly nn.Linear (or Conv1D): a subclass such as Falcon's FalconLinear keeps its
    # float weight, and the stock loader refuses the packed one stored under its name.
    exact_linear_loader = "transformers' bitsandbytes loading"

    def __init__(self) -> None:
        four_bit = ("bits", 4)
        super().__init__(
            name="bnb",
            description="bitsandbytes 4-bit nf4/fp4 (+double quant) and 8-bit LLM.int8",
            libraries=("bitsandbytes",),
            quant_method="bitsandbytes",
            stock_loader="transformers",
            extra=None,  # bitsandbytes is a dependency of qconv itself
            options=(
                Option("bits", int, "bits a weight: 4 or 8 (bnb), or the method's own widths", default=4),
                Option(
                    "quant_type",
                    str,
                    "bnb 4-bit code table",
                    choices=("nf4", "fp4"),
                    default="nf4",
                    applies_when=four_bit,
                ),
                Option(
                    "double_quant",
                    bool,
                    "bnb 4-bit: quantize the absmax statistics too (default on)",
                    flag=True,
                    default=True,
                    applies_when=four_bit,
                ),
                Option(
                    "blocksize",
                    int,
                    "bnb 4-bit: weights per absmax block (default 64)",
                    default=64,
                    applies_when=four_bit,
                ),
            ),
        )

    def make_recipe(self, options: dict[str, Any]) -> dict[str, Any]:
        given = self.given_options(options)
        check_choice(self, "bits", given["bits"], (4, 8))
        if given["bits"] == 8:
            return {"method": self.name, "bits": 8, "threshold": INT8_THRESHOLD}
        check_choice(self, "blocksize", given["blocksize"], BLOCKSIZES_4BIT, ("bits", 4))
        return {
            "method": self.name,
            "bits": 4,
            "quant_type": given["quant_type"],
            "double_quant": bool(given["double_quant"]),
            "blocksize": given["blocksize"],
        }

    def label(self, recipe: dict) -> str:
        if recipe["bits"] == 8:
            return "bnb int8"
        return f"bnb {recipe['quant_type']}" + ("+dq" if recipe["double_quant"] else "")

    def output_specs(
        self, shape: tuple[int, ...], recipe: dict
    ) -> dict[str, tuple[torch.dtype, tuple] | None]:
        out_features = shape[0]
        numel = math.prod(shape)
        if recipe["bits"] == 8:
            return {
                "weight": (torch.int8, tuple(shape)),
                "SCB": (torch.float32, (out_features,)),
                "weight_format": (torch.uint8, ()),
            }
        blocks = -(-numel // recipe["blocksize"])
        specs: dict[str, tuple[torch.dtype, tuple] | None] = {
            "weight": (torch.uint8, (-(-numel // 2), 1)),
            "weight.absmax": (torch.uint8 if recipe["double_quant"] else torch.float32, (blocks,)),
            "weight.quant_map": (torch.float32, (16,)),
        }
        if recipe["double_quant"]:
            specs["weight.nested_absmax"] = (torch.float32, (-(-blocks // NESTED_BLOCKSIZE),))
            specs["weight.nested_quant_map"] = (torch.float32, (256,))
        # JSON whose length depends on the quantized values (nested_offset): sized afterwards.
        specs[f"weight.quant_state.bitsandbytes__{recipe['quant_type']}"] = None
        return specs

    # -- quantize -----------------------------------------------------------------------------
    def quantize(self, weight: torch.Tensor, recipe: dict, device: torch.device) -> dict[str, torch.Tensor]:
        # bitsandbytes quantizes NaN and inf without complaint (a NaN block's absmax is NaN): the
        # artifact would load and compute NaN, so the source is refused as the other formats do
        if not torch.isfinite(weight).all():
            raise SourceError("the weight has NaN or infinite values")
        if recipe["bits"] == 8:
            return self._quantize_int8(weight)
        return self._quantize_4bit(weight, recipe)

    def _quantize_4bit(self, weight: torch.Tensor, recipe: dict) -> dict[str, torch.Tensor]:
        functional = _bnb()
        packed, state = functional.quantize_4bit(
            weight.contiguous(),
            blocksize=recipe["blocksize"],
            compress_statistics=recipe["double_quant"],
            quant_type=recipe["quant_type"],
            quant_storage=torch.uint8,
        )
        # QuantState.as_dict(packed=True) is exactly what transformers stores after the weight:
        # absmax, quant_map, nested_* and the JSON-in-uint8 quant_state entry.
        out = {"weight": packed}
        out.update({f"weight.{key}": value for key, value in state.as_dict(packed=True).items()})
        return out

    def _quantize_int8(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        functional = _bnb()
        # transformers' Int8Params casts to fp16 before bitsandbytes' row-wise quantization.
        half = weight.contiguous().to(torch.float16)
        if not torch.isfinite(half).all():
            raise UsageError("a weight overflows float16, which bnb int8 quantizes from")
        int8, row_absmax, _ = functional.int8_vectorwise_quant(half)
        return {
            "weight": int8,
            "SCB": row_absmax,
            # 0 = "row" in bitsandbytes' LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING; older loaders read it.
            "weight_format": torch.tensor(0, dtype=torch.uint8, device=int8.device),
        }

    # -- dequantize (pure torch) --------------------------------------------------------------
    def dequantize(self, tensors: dict[str, torch.Tensor], recipe: dict) -> torch.Tensor:
        if recipe["bits"] == 8:
            return dequantize_int8(tensors["weight"], tensors["SCB"])
        return dequantize_4bit(tensors)

    def load_pretrained(self, folder, device: torch.device, dtype: torch.dtype):
        """Stock transformers + bitsandbytes, as users load it. For the comparison with qconv's
        reference the run-time precision is then raised to ``dtype`` (bnb keeps the stored dtype
        otherwise): the 4-bit layers dequantize and compute in it and the unquantized tensors are
        cast, so only the stored bytes decide whether the two agree. Nothing on disk changes."""
        model = super().load_pretrained(folder, device, dtype)
        for module in model.modules():
            if type(module).__name__ == "Linear4bit":
                module.compute_dtype = dtype
                module.weight.quant_state.dtype = dtype
                # bnb's AVX512-BF16 CPU path repacks the weight and computes in bf16; the plain
                # path dequantizes exactly, which is what this comparison needs.
                module.support_avx512bf16_for_cpu = False
        for param in model.parameters():
            if param.dtype in (torch.float16, torch.bfloat16, torch.float32):
                param.data = param.data.to(dtype)
        return model

    def input_quantizer(self, recipe: dict):
        # LLM.int8 quantizes each layer's input at run time too (int8_inputs): the reference does
        # the same, so the comparison measures the stored bytes, not the activation rounding
        return int8_inputs if recipe["bits"] == 8 else None

    def loader_tolerance(self, recipe: dict) -> float:
        # int8: the reference quantizes each layer's input as bnb does (one layer fed the same
        # input agrees to ~2e-5, tests/test_format_bnb.py), but bnb sums integer products and
        # rescales once while the reference multiplies floats, and every later layer rounds its
        # input to 1/127 of the row's absmax again: a 1e-5 difference that moves a value across a
        # rounding boundary becomes a whole step, and the steps compound over the blocks.
        # Measured on SmolLM2-135M on the CPU: 5.2e-2 at the logits (6.7e-2 without the input
        # quantization); a wrong byte layout gives ~1.
        return 1e-1 if recipe["bits"] == 8 else 1e-3

    def quantization_config(self, recipe: dict, plan: Any) -> dict[str, Any]:
        four = recipe["bits"] == 4
        config = {
            "quant_method": "bitsandbytes",
            "load_in_4bit": four,
            "load_in_8bit": not four,
            "llm_int8_threshold": INT8_THRESHOLD,
            # transformers needs lm_head named explicitly once a skip list is given (FORMATS.md).
            "llm_int8_skip_modules": sorted(plan.skipped),
            "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False,
            "bnb_4bit_quant_type": recipe.get("quant_type", "nf4"),
            "bnb_4bit_use_double_quant": bool(recipe.get("double_quant", False)),
            "bnb_4bit_compute_dtype": recipe.get("dtype", "bfloat16"),
            "bnb_4bit_quant_storage": "uint8",
        }
        return config


def unpack_4bit_codes(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Codes of a ``[numel/2, 1]`` uint8 tensor: element 2k sits in the HIGH nibble of byte k."""
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 0x0F], dim=1).reshape(-1)
    return codes[:numel]


def dequantize_blockwise(
    codes: torch.Tensor, code_map: torch.Tensor, absmax: torch.Tensor, blocksize: int
) -> torch.Tensor:
    """``code_map[code] * absmax[block]`` over a flat tensor cut in blocks (last block may be short)."""
    values = code_map.to(torch.float32)[codes.reshape(-1).to(torch.int64)]
    numel = values.numel()
    scales = absmax.to(device=values.device, dtype=torch.float32).reshape(-1)
    full = numel // blocksize * blocksize
    out = torch.empty_like(values)
    out[:full] = (values[:full].view(-1, blocksize) * scales[: full // blocksize, None]).view(-1)
    if full < numel:
        out[full:] = values[full:] * scales[-1]
    return out


def dequantize_4bit(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    state_key = next(k for k in tensors if k.startswith("weight.quant_state.bitsandbytes__"))
    state = json.loads(bytes(tensors[state_key].cpu().numpy().tobytes()).decode("utf-8"))
    shape = tuple(state["shape"])
    numel = 1
    for dim in shape:
        numel *= dim
    absmax = tensors["weight.absmax"]
    if "weight.nested_absmax" in tensors:
        # Double quant: absmax was stored as 8-bit codes of (absmax - offset), blocks of 256.
        absmax = dequantize_blockwise(
            absmax,
            tensors["weight.nested_quant_map"],
            tensors["weight.nested_absmax"],
            state["nested_blocksize"],
        ) + float(state["nested_offset"])
    codes = unpack_4bit_codes(tensors["weight"], numel)
    values = dequantize_blockwise(codes, tensors["weight.quant_map"], absmax, state["blocksize"])
    return values.reshape(shape)


def dequantize_int8(int8: torch.Tensor, row_absmax: torch.Tensor) -> torch.Tensor:
    """LLM.int8 row-wise: ``w = q * absmax_row / 127``."""
    return int8.to(torch.float32) * (row_absmax.to(torch.float32).reshape(-1, 1) / 127.0)


register(BitsAndBytesFormat())


def int8_inputs(x: torch.Tensor, threshold: float = INT8_THRESHOLD) -> torch.Tensor:
    """The input a bnb int8 layer effectively multiplies, as bitsandbytes' inference path makes
    it (autograd/_functions.py MatMul8bitLt with the default backend's int8_vectorwise_quant and
    int8_mixed_scaled_mm): the tokens flattened to rows and cast to float16; every column holding
    an element of magnitude >= ``threshold`` is an outlier column, multiplied in the input's own
    precision; the rest is quantized per row to int8 with ``absmax / 127`` (the row's absmax over
    its non-outlier elements) and used as ``codes * absmax / 127``."""
    shape = x.shape
    rows = x.reshape(-1, shape[-1])
    half = rows.to(torch.float16)
    outliers = half.abs() >= threshold if threshold > 0 else torch.zeros_like(half, dtype=torch.bool)
    half = half.masked_fill(outliers, 0)
    absmax = half.abs().amax(dim=1).float().unsqueeze(-1)
    codes = torch.round(half * (127.0 / absmax))  # float16 * float32: computed in float32, as bnb
    codes = torch.nan_to_num(codes, nan=0.0)  # an all-zero row: 0 * inf
    values = codes * (absmax / 127.0)
    columns = outliers.any(dim=0)
    values[:, columns] = rows[:, columns].to(values.dtype)
    return values.to(x.dtype).reshape(shape)
