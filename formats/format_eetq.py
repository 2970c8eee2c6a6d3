"""EETQ: int8 weight-only, per output channel, in the layout of EETQ's GEMM kernels.

EETQ's wheel fits only an old CPython and torch, and transformers 5.x runs EETQ layers only with
a kernel fetched from the Hub at run time; qconv writes the format in pure torch
(``eetq_layout.py``: quantization and layout byte-exact with upstream, and the inverse) and
runs it offline with :class:`EETQLinear`.

On disk, per quantized ``nn.Linear`` (transformers' ``integrations/eetq.py`` ``EetqLinear``):
``L.weight`` int8 ``[in, out]`` holding the preprocessed bytes, ``L.weight_scales`` float16
``[out]`` and ``L.bias``. ``config.json``: ``quant_method: eetq``, ``weights: int8``,
``modules_to_not_convert`` (lm_head included). The layout depends on the GPU generation the
kernel runs on (``--arch``, recorded in the manifest's recipe): ``sm80`` for SM75 to SM89,
``sm70`` for Volta. Upstream has no layout for SM90 (H100) and later.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from qconv.errors import ArtifactError, SourceError, UsageError
from qconv.formats import eetq_layout
from qconv.formats.base import Option, QuantFormat, check_choice, register
from qconv.manifest import recipe_of
from qconv.modeling import load_with_runtime_modules

DEFAULT_ARCH = "sm80"
SUFFIXES = ["weight", "weight_scales"]
#: CPU calls with at most this many rows use torch._weight_int8pack_mm; more rows dequantize and
#: use the float matmul. Measured with torch 2.13 on 2 cores, [1536, 576]: int8pack 0.39 ms vs
#: 0.96 ms at 1 row, but 1.7 vs 0.4 ms at 4 rows and 800 vs 23 ms at 2048 rows.
INT8PACK_MAX_ROWS = 1


@functools.lru_cache(maxsize=1)
def _eetq_gemm():
    """Upstream's CUDA kernel (``from EETQ import w8_a16_gemm``, the extension ``pip install eetq``
    builds), or None. Not installable here: this path is untested (README)."""
    try:
        from EETQ import w8_a16_gemm  # type: ignore[import-not-found]
    except Exception:  # noqa: BLE001 - absent or built for another torch: use the torch path
        return None
    return w8_a16_gemm


def _device_arch(device: torch.device) -> str | None:
    """The EETQ layout a CUDA device's kernel reads, or None (upstream's getLayoutDetailsForTransform)."""
    major, minor = torch.cuda.get_device_capability(device)
    sm = 10 * major + minor
    if 70 <= sm < 75:
        return "sm70"
    if 75 <= sm < 90:
        return "sm80"
    return None


class EETQLinear(nn.Module):
    """A Linear holding EETQ's int8 weight un-preprocessed (``[out, in]`` row-major, done once at
    load) and its float16 scales. ``forward`` computes ``x @ (q * scale).T + bias``, weight-only:
    activations are never quantized, as in EETQ's W8A16 kernel.

    - EETQ's own kernel (``EETQ.w8_a16_gemm``) when that package imports, the input is float16 on
      a GPU whose layout is the artifact's: it reads the stored bytes (kept only in that case).
    - CPU, one row (decoding): ``torch._weight_int8pack_mm``, a weight-only int8 matmul (int8
      weight, per-channel scales, float activations), in float32.
    - Otherwise: dequantize to float32, round once to the input's dtype, and use the float matmul.
      On CUDA this beats torch's ``_weight_int8pack_mm`` (a one-thread-per-output fp32 kernel,
      aten/src/ATen/native/cuda/int8mm.cu). ``torch._int_mm`` is not used: it multiplies int8 by
      int8, so the activations would have to be quantized too (W8A8, like LLM.int8), which moves
      the outputs away from what EETQ computes.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        scales: torch.Tensor,
        bias: torch.Tensor | None,
        arch: str,
        kernel_weight: torch.Tensor | None = None,
    ):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.arch = arch
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scales", scales)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        # the stored bytes, for upstream's kernel only (not saved: state_dict keys stay transformers')
        self.register_buffer("kernel_weight", kernel_weight, persistent=False)
        self._gemm = _eetq_gemm() if kernel_weight is not None else None

    @classmethod
    def from_stored(
        cls, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None, arch: str
    ) -> EETQLinear:
        stored, scales = parse_layer(tensors)
        plain = eetq_layout.unpreprocess(stored, arch).t().contiguous()
        kernel_weight = stored if _eetq_gemm() is not None else None
        return cls(plain, scales, bias, arch, kernel_weight)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return eetq_layout.dequantize(self.weight, self.weight_scales).to(dtype)

    def _use_kernel(self, x: torch.Tensor) -> bool:
        return (
            self._gemm is not None
            and x.is_cuda
            and x.dtype == torch.float16
            and _device_arch(x.device) == self.arch
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_kernel(x):  # pragma: no cover - needs EETQ and a GPU
            out = self._gemm(x.contiguous(), self.kernel_weight, self.weight_scales)
            return out if self.bias is None else out + self.bias.to(out.dtype)
        rows = x.numel() // self.in_features
        if x.device.type == "cpu" and rows <= INT8PACK_MAX_ROWS and hasattr(torch, "_weight_int8pack_mm"):
            flat = x.reshape(rows, self.in_features).to(torch.float32).contiguous()
            out = torch._weight_int8pack_mm(flat, self.weight, self.weight_scales.to(torch.float32))
            out = out.reshape(*x.shape[:-1], self.out_features)
            if self.bias is not None:
                out = out + self.bias.to(torch.float32)
            return out.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self.dequantize(x.dtype), bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, arch={self.arch}, "
            f"bias={self.bias is not None}, eetq_kernel={self._gemm is not None}"
        )


def parse_layer(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(stored int8 ``[in, out]``, float16 scales ``[out]``) of one layer, checked. Raises
    ArtifactError saying what is wrong; callers add the layer's name."""
    missing = [key for key in SUFFIXES if key not in tensors]
    if missing:
        raise ArtifactError(f"missing EETQ tensor(s) {', '.join(missing)}")
    stored, scales = tensors["weight"], tensors["weight_scales"]
    if stored.dtype != torch.int8 or stored.dim() != 2:
        raise ArtifactError(
            f"weight is {str(stored.dtype).removeprefix('torch.')} {list(stored.shape)}, expected int8 [in, out]"
        )
    rows, cols = stored.shape
    if rows % eetq_layout.SHAPE_MULTIPLE or cols % eetq_layout.SHAPE_MULTIPLE:
        raise ArtifactError(f"weight [{rows}, {cols}] is not made of 64x64 tiles")
    if not scales.dtype.is_floating_point or tuple(scales.shape) != (cols,):
        raise ArtifactError(
            f"weight_scales is {str(scales.dtype).removeprefix('torch.')} {list(scales.shape)}, expected {cols} floats"
        )
    return stored, scales


def recipe_arch(recipe: dict) -> str:
    """The layout of a folder from its recipe (the manifest's), else sm80 (the layout of every
    GPU from SM75 to SM89: what a folder made elsewhere almost surely holds)."""
    arch = recipe.get("arch", DEFAULT_ARCH)
    if arch not in eetq_layout.ARCHS:
        raise ArtifactError(f"EETQ arch {arch!r} is not one of {', '.join(eetq_layout.ARCHS)}")
    return arch


class EETQFormat(QuantFormat):
    def __init__(self) -> None:
        super().__init__(
            name="eetq",
            description="EETQ int8 weight-only per channel, in the layout of its GEMM (sm70 or sm80)",
            libraries=("eetq",),
            quant_method="eetq",
            # transformers 5.x runs EETQ layers only with a kernel fetched from the Hub at run time
            stock_loader=None,
            # the format is pure torch here; `eetq` itself builds only for an old CPython and torch
            extra=None,
            options=(
                Option("bits", int, "bits a weight", default=8),
                Option(
                    "arch",
                    str,
                    "eetq: GPU layout, sm80 (SM75-SM89: T4, A100, A10, L4, RTX 30/40; default) or sm70 (V100)",
                    default=DEFAULT_ARCH,
                ),
            ),
        )

    def make_recipe(self, options: dict[str, Any]) -> dict[str, Any]:
        given = self.given_options(options)
        check_choice(self, "bits", given["bits"], (8,))
        note = "sm80 serves SM75-SM89; upstream EETQ has no layout for SM90 and later"
        check_choice(self, "arch", given["arch"], eetq_layout.ARCHS, note=note)
        return {"method": self.name, "bits": 8, "arch": given["arch"]}

    def label(self, recipe: dict) -> str:
        return f"eetq int8 {recipe['arch']}"

    def skip_reason(self, module_name: str, shape: tuple[int, ...], recipe: dict) -> str | None:
        multiple = eetq_layout.SHAPE_MULTIPLE
        if len(shape) != 2:
            return f"not a 2-D weight ({list(shape)})"
        out_features, in_features = shape
        if in_features % multiple or out_features % multiple:
            return (
                f"in_features {in_features} and out_features {out_features}: EETQ's kernel needs "
                f"multiples of {multiple}"
            )
        return None

    def output_specs(
        self, shape: tuple[int, ...], recipe: dict
    ) -> dict[str, tuple[torch.dtype, tuple] | None]:
        out_features, in_features = shape
        return {
            "weight": (torch.int8, (in_features, out_features)),
            "weight_scales": (torch.float16, (out_features,)),
        }

    def quantize(self, weight: torch.Tensor, recipe: dict, device: torch.device) -> dict[str, torch.Tensor]:
        if not torch.isfinite(weight).all():
            raise SourceError("the weight has NaN or infinite values")
        # Upstream quantizes the float16 weight (qlinear.py, transformers' EetqQuantize).
        half = weight.to(torch.float16)
        if not torch.isfinite(half).all():
            largest = weight.abs().max().item()
            raise UsageError(
                f"|w| reaches {largest:.6g}, beyond float16's 65504; EETQ quantizes from float16"
            )
        q, scales = eetq_layout.quantize(half)
        return {"weight": eetq_layout.preprocess(q.t().contiguous(), recipe["arch"]), "weight_scales": scales}

    def dequantize(self, tensors: dict[str, torch.Tensor], recipe: dict) -> torch.Tensor:
        stored, scales = parse_layer(tensors)
        plain = eetq_layout.unpreprocess(stored, recipe["arch"])
        return eetq_layout.dequantize(plain.t(), scales)

    def quantization_config(self, recipe: dict, plan: Any) -> dict[str, Any]:
        # transformers' EetqConfig.to_dict(); its EetqLinear replaces every nn.Linear not listed,
        # so lm_head must be named (the plan always lists it).
        return {"quant_method": "eetq", "weights": "int8", "modules_to_not_convert": sorted(plan.skipped)}

    marker_suffix = "weight_scales"

    def runtime_module(
        self, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None, recipe: dict
    ) -> nn.Module:
        return EETQLinear.from_stored(tensors, bias, recipe_arch(recipe))

    def load_pretrained(self, folder, device: torch.device, dtype: torch.dtype):

        return load_with_runtime_modules(folder, self, device, dtype, recipe_of(folder))


register(EETQFormat())
