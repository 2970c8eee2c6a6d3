"""The one small interface every quantization method implements, and the table of methods.

A method is one module under ``formats/`` that defines a :class:`QuantFormat` subclass and calls
:func:`register` on an instance. The converter never asks "which method is this?" in an if-chain:
it looks the method up here by name.

Names used throughout:
- *module name*: the dotted name of an ``nn.Linear`` (``model.layers.0.self_attn.q_proj``);
- *suffix*: a key after the module name (``weight``, ``weight.absmax``, ``SCB``);
- *recipe*: a plain JSON-able dict, every option of the method with defaults filled in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from qconv.errors import UsageError


@dataclass(frozen=True)
class Option:
    """A method option; the CLI turns each into a click option (``quant_type`` -> ``--quant-type``).

    ``choices`` limits the values; ``flag`` makes an on/off pair (``--double-quant/--no-double-quant``).
    The default lives in the method's ``make_recipe`` so that it can depend on other options.
    """

    name: str
    type: type = str
    help: str = ""
    choices: tuple[Any, ...] | None = None
    flag: bool = False

    @property
    def cli_name(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass
class PrepareContext:
    """What ``QuantFormat.prepare`` gets. ``checkpoint``: a folder of its own, kept across an
    interrupted run; ``resume``: continue from what it holds instead of starting over."""

    source: Any
    plan: Any
    recipe: dict
    device: torch.device
    checkpoint: Path
    resume: bool
    progress: Any


class Prepared:
    """The result of a preparation stage (interface; formats/aqlm_calibrated.py implements it)."""

    #: recorded in the manifest's ``calibration`` (which text, its sha256, how many tokens...)
    calibration: dict[str, Any] | None = None

    def packed(self, module: str) -> dict[str, torch.Tensor] | None:
        """The stored tensors of a quantized module (None: quantize it the usual way)."""
        raise NotImplementedError

    def replacement(self, name: str) -> torch.Tensor | None:
        """A new value for a copied tensor (a fine-tuned norm), or None to copy the source's."""
        return None

    def layer_stats(self, module: str) -> dict[str, Any]:
        """Extra per-layer numbers for the manifest (e.g. the output error it was fitted to)."""
        return {}


@dataclass
class QuantFormat:
    """Base class of a quantization method. Subclasses override the methods below."""

    name: str = ""
    description: str = ""
    #: distribution names whose versions are recorded in the manifest
    libraries: tuple[str, ...] = ()
    options: tuple[Option, ...] = field(default_factory=tuple)

    # -- recipe -------------------------------------------------------------------------------
    def make_recipe(self, options: dict[str, Any]) -> dict[str, Any]:
        """Validate the options given (None = not given) and return the complete recipe."""
        raise NotImplementedError

    # -- planning -----------------------------------------------------------------------------
    def skip_reason(self, module_name: str, shape: tuple[int, ...], recipe: dict) -> str | None:
        """Why this weight cannot take the format (None: it can). Such layers stay unquantized."""
        return None

    def class_skip_reason(self, module_class: type) -> str | None:
        """Why a Linear of this class (a model may subclass nn.Linear) cannot be stored quantized,
        because the format's loader would not replace it (None: it can)."""
        return None

    def output_suffixes(self, recipe: dict) -> list[str]:
        """Every key ``quantize`` returns, in the order it returns them."""
        raise NotImplementedError

    def output_specs(
        self, shape: tuple[int, ...], recipe: dict
    ) -> dict[str, tuple[torch.dtype, tuple[int, ...]] | None]:
        """``{suffix: (dtype, shape)}`` of what ``quantize`` returns for a weight of ``shape``, or
        None where the size is only known after quantizing. Known specs let the writer lay out
        shards before the first byte and hash them as they are written; unknown ones go in a last
        small shard. The default knows nothing."""
        return dict.fromkeys(self.output_suffixes(recipe))

    # -- the numbers --------------------------------------------------------------------------
    def prepare(self, context: PrepareContext) -> Prepared | None:
        """A stage before the streaming pass, for methods that need the model's activations
        (calibration data run block by block). Returns None (the default: nothing to prepare)
        or a :class:`Prepared` the writer then reads instead of calling ``quantize``."""
        return None

    def quantize(self, weight: torch.Tensor, recipe: dict, device: torch.device) -> dict[str, torch.Tensor]:
        """Quantize one ``[out, in]`` weight already on ``device``; return packed tensors by suffix."""
        raise NotImplementedError

    def dequantize(self, tensors: dict[str, torch.Tensor], recipe: dict) -> torch.Tensor:
        """Pure-torch inverse of the packed layout (float32), independent of the method's library."""
        raise NotImplementedError

    # -- the folder ---------------------------------------------------------------------------
    def quantization_config(
        self, recipe: dict, skipped_modules: list[str], embeddings: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        """The ``quantization_config`` entry of ``config.json`` the real loader expects.
        ``skipped_modules``: Linear modules left unquantized; ``embeddings``: the model's
        embedding weight names, for formats whose config lists them."""
        raise NotImplementedError

    def load_pretrained(self, folder, device: torch.device, dtype: torch.dtype):
        """Load an artifact with the loader users would use (default: stock transformers, no
        quantization config passed: the folder's own config.json must be enough)."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, device_map=str(device))

    #: the key after a module name that marks the module as quantized in a folder of this format
    #: (used by qconv's own loader, for formats without a stock one)
    marker_suffix: ClassVar[str] = "weight"

    def runtime_module(self, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None) -> torch.nn.Module:
        """A runnable module for one quantized layer, from its tensors (suffix -> tensor, bias
        apart). Only formats that load through ``qconv.load_model`` implement it."""
        raise NotImplementedError

    def loader_tolerance(self, recipe: dict) -> float:
        """Largest relative logits difference allowed between the real loader's model and
        qconv's dequantized reference (the two read the same bytes, so only arithmetic differs)."""
        return 1e-3

    def label(self, recipe: dict) -> str:
        """A short human name of the recipe, e.g. ``bnb nf4+dq``."""
        return self.name


_TRITON: bool | None = None


def triton_available() -> bool:
    """Whether Triton can be imported (the fused GPU kernels need it; CPU paths do not)."""
    global _TRITON
    if _TRITON is None:
        try:
            import triton  # noqa: F401

            _TRITON = True
        except ImportError:
            _TRITON = False
    return _TRITON


_FORMATS: dict[str, QuantFormat] = {}


def register(fmt: QuantFormat) -> QuantFormat:
    if fmt.name in _FORMATS:
        raise RuntimeError(f"quantization method {fmt.name!r} registered twice")
    _FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str) -> QuantFormat:
    try:
        return _FORMATS[name]
    except KeyError:
        raise UsageError(f"unknown method {name!r}; valid methods: {', '.join(sorted(_FORMATS))}") from None


def all_formats() -> dict[str, QuantFormat]:
    return dict(_FORMATS)


def reject_foreign_options(fmt: QuantFormat, options: dict[str, Any], allowed: set[str]) -> None:
    """Refuse options given on the command line that this method does not take."""
    foreign = sorted(k for k, v in options.items() if v is not None and k not in allowed)
    if foreign:
        flags = ", ".join("--" + k.replace("_", "-") for k in foreign)
        raise UsageError(f"{flags} does not apply to --method {fmt.name}")


def check_choice(
    fmt: QuantFormat, option: str, value: Any, valid: tuple[Any, ...], context: str = ""
) -> None:
    if value not in valid:
        shown = ", ".join(str(v) for v in valid)
        where = f" {context}" if context else ""
        raise UsageError(
            f"--method {fmt.name}{where}: --{option.replace('_', '-')} {value} is not supported; choose from {shown}"
        )
