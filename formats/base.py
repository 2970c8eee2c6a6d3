"""The one small interface every quantization method implements, and the table of methods.

A method is one module under ``formats/`` that defines a :class:`QuantFormat` subclass and calls
:func:`register` on an instance. Everything qconv knows about a method is declared there: its
options, the ``quant_method`` its ``config.json`` carries, how users load it, its pip extra.
The converter never asks "which method is this?" in an if-chain: it looks the method up here.

Names used throughout:
- *module name*: the dotted name of an ``nn.Linear`` (``model.layers.0.self_attn.q_proj``);
- *suffix*: a key after the module name (``weight``, ``weight.absmax``, ``SCB``);
- *recipe*: a plain JSON-able dict, every option of the method with defaults filled in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from qconv.errors import UsageError


@dataclass(frozen=True)
class Option:
    """A method option; the CLI turns each into a click option (``quant_type`` -> ``--quant-type``).

    ``choices`` limits the values; ``flag`` makes an on/off pair (``--double-quant/--no-double-quant``).
    ``default`` fills the recipe when the option is not given (None: the method's ``make_recipe``
    decides, e.g. from other options). ``applies_when``: ``(other option, value)``: the option
    exists only when the other one has that value (bnb's ``quant_type`` only with ``bits`` 4), so
    giving it otherwise is refused.

    Two methods may declare one name (``bits``) only with the same ``type``, ``choices`` and
    ``flag``: the CLI has one ``--bits`` for all of them (:func:`register` refuses a conflict).
    ``help`` and ``default`` may differ; the CLI joins the methods' helps.
    """

    name: str
    type: type = str
    help: str = ""
    choices: tuple[Any, ...] | None = None
    flag: bool = False
    default: Any = None
    applies_when: tuple[str, Any] | None = None

    @property
    def cli_name(self) -> str:
        return "--" + self.name.replace("_", "-")

    def declaration(self) -> tuple[type, tuple[Any, ...] | None, bool]:
        """What must agree between methods declaring this name (one CLI option serves them all)."""
        return (self.type, self.choices, self.flag)


@dataclass
class PrepareContext:
    """What ``QuantFormat.prepare`` gets. ``checkpoint``: a folder of its own, kept across an
    interrupted run; ``resume``: continue from what it holds instead of starting over.
    ``block_types``: for a container that chooses a block type per tensor (GGUF), what its writer
    planned: module -> (type name, source tensor name) of each weight it stores in a block type
    and whose bytes can be computed in the source's layout (None for safetensors methods)."""

    source: Any
    plan: Any
    recipe: dict
    device: torch.device
    checkpoint: Path
    resume: bool
    progress: Any
    block_types: dict[str, tuple[str, str]] | None = None


class Prepared:
    """The result of a preparation stage (interface; formats/blockwise.py implements it for the calibrated methods)."""

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


#: the weight shape :meth:`QuantFormat.output_suffixes` asks ``output_specs`` about: every
#: method takes it (its keys must not depend on the shape)
_ANY_SHAPE = (4096, 4096)


@dataclass
class QuantFormat:
    """Base class of a quantization method. Subclasses set the declarations and override the
    hooks below; everything else here is derived from them."""

    # -- declarations -------------------------------------------------------------------------
    name: str = ""
    description: str = ""
    #: distribution names whose versions are recorded in the manifest
    libraries: tuple[str, ...] = ()
    options: tuple[Option, ...] = field(default_factory=tuple)
    #: ``quantization_config.quant_method`` in the ``config.json`` of this method's folders
    #: (how ``qconv.load_model`` recognises a folder without ``qconv.json``)
    quant_method: str = ""
    #: the stock library users load the folder with (``"transformers"``), or None when only
    #: ``qconv.load_model`` can (the model card says which)
    stock_loader: str | None = None
    #: the pip extra of pyproject.toml that installs what running the folder needs, or None
    #: when qconv needs nothing more (the model card names it)
    extra: str | None = None
    #: serving engines that read this method's folders as they are (``"vllm"``, ``"sglang"``):
    #: the model card shows how to serve the folder with each
    serving_engines: tuple[str, ...] = ()
    #: the key after a module name that marks the module as quantized in a folder of this format
    #: (used by qconv's own loader, for formats without a stock one)
    marker_suffix: ClassVar[str] = "weight"
    #: the loader that swaps in only modules whose type is exactly ``nn.Linear`` (a model's
    #: subclass keeps its float weight there, so the planner leaves it unquantized, naming this),
    #: or None when every ``nn.Linear`` can be stored quantized
    exact_linear_loader: ClassVar[str | None] = None
    #: what the artifact's weights are stored in: ``"safetensors"`` (a Hugging Face folder, the
    #: pipeline's streaming shard writer) or ``"gguf"`` (one llama.cpp file, written by
    #: ``qconv.gguf_export``, with its own names, metadata and per-tensor types)
    container: ClassVar[str] = "safetensors"

    # -- recipe -------------------------------------------------------------------------------
    def make_recipe(self, options: dict[str, Any]) -> dict[str, Any]:
        """Validate the options given (None = not given) and return the complete recipe.
        Implementations start with :meth:`given_options`."""
        raise NotImplementedError

    def given_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """``options`` checked against :attr:`options`, with declared defaults filled in.
        Refuses an option the method does not take, one that does not apply with the others
        (``applies_when``) and a value outside ``choices``."""
        declared = {option.name: option for option in self.options}
        foreign = [k for k, v in options.items() if v is not None and k not in declared]
        if foreign:
            raise UsageError(
                "{option} does not apply to {method}", option=tuple(sorted(foreign)), method=self.name
            )
        given = {name: options.get(name) for name in declared}
        for option in self.options:
            if given[option.name] is None and option.default is not None and _applies(option, given):
                given[option.name] = option.default
        inapplicable = sorted(
            k for k, v in given.items() if v is not None and not _applies(declared[k], given)
        )
        if inapplicable:
            raise UsageError(
                "{option} does not apply to {method}", option=tuple(inapplicable), method=self.name
            )
        for option in self.options:
            if option.choices and given[option.name] is not None:
                check_choice(self, option.name, given[option.name], option.choices, option.applies_when)
        return given

    def label(self, recipe: dict) -> str:
        """A short human name of the recipe, e.g. ``bnb nf4+dq``."""
        return self.name

    # -- planning -----------------------------------------------------------------------------
    def skip_reason(self, module_name: str, shape: tuple[int, ...], recipe: dict) -> str | None:
        """Why this weight cannot take the format (None: it can). Such layers stay unquantized."""
        return None

    def output_specs(
        self, shape: tuple[int, ...], recipe: dict
    ) -> dict[str, tuple[torch.dtype, tuple[int, ...]] | None]:
        """``{suffix: (dtype, shape)}`` of every tensor ``quantize`` returns for a weight of
        ``shape``, in the order it returns them; None where the size is only known after
        quantizing. Known specs let the writer lay out shards before the first byte and hash them
        as they are written; unknown ones go in a last small shard. The keys depend on the recipe
        only, never on the shape."""
        raise NotImplementedError

    def output_suffixes(self, recipe: dict) -> list[str]:
        """Every key ``quantize`` returns, in order (the keys of :meth:`output_specs`)."""
        return list(self.output_specs(_ANY_SHAPE, recipe))

    # -- the numbers --------------------------------------------------------------------------
    def prepare(self, context: PrepareContext) -> Prepared | None:
        """A stage before the streaming pass, for methods that need the model's activations
        (calibration data run block by block). Returns None (the default: nothing to prepare)
        or a :class:`Prepared` the writer then reads instead of calling ``quantize``."""
        return None

    def quantize(self, weight: torch.Tensor, recipe: dict, device: torch.device) -> dict[str, torch.Tensor]:
        """Quantize one ``[out, in]`` weight already on ``device``; return packed tensors by suffix.
        A weight with NaN or infinite values is a broken source: raise ``SourceError``."""
        raise NotImplementedError

    def dequantize(self, tensors: dict[str, torch.Tensor], recipe: dict) -> torch.Tensor:
        """Pure-torch inverse of the packed layout (float32), independent of the method's library."""
        raise NotImplementedError

    # -- the folder ---------------------------------------------------------------------------
    def quantization_config(self, recipe: dict, plan: Any) -> dict[str, Any]:
        """The ``quantization_config`` entry of ``config.json`` the real loader expects.
        ``plan``: what the planner decided (``qconv.plan.Plan``): ``plan.skipped`` maps the
        Linear modules left unquantized to the reason, ``plan.embeddings`` names the model's
        embedding weights."""
        raise NotImplementedError

    def load_pretrained(self, folder, device: torch.device, dtype: torch.dtype):
        """Load an artifact with the loader users would use (default: stock transformers, no
        quantization config passed: the folder's own config.json must be enough)."""
        from transformers import AutoModelForCausalLM  # heavy: only loading needs it

        return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, device_map=str(device))

    def runtime_module(
        self, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None, recipe: dict
    ) -> torch.nn.Module:
        """A runnable module for one quantized layer, from its tensors (suffix -> tensor, bias
        apart) and the folder's recipe (``{}`` for a folder qconv did not make). Only formats
        that load through ``qconv.load_model`` (``stock_loader`` None) implement it."""
        raise NotImplementedError

    def input_quantizer(self, recipe: dict) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """What the method's runtime does to a quantized layer's input before its matmul (the
        dynamic activation quantization of W8A8 schemes), so that qconv's reference does the
        same; None (the default): the input is used as it is."""
        return None

    def loader_tolerance(self, recipe: dict) -> float:
        """Largest relative logits difference allowed between the real loader's model and
        qconv's dequantized reference (the two read the same bytes, so only arithmetic differs)."""
        return 1e-3


def _applies(option: Option, given: dict[str, Any]) -> bool:
    if option.applies_when is None:
        return True
    other, value = option.applies_when
    return given.get(other) == value


_FORMATS: dict[str, QuantFormat] = {}
#: every registered method's options by name, merged (what the CLI turns into click options)
_OPTIONS: dict[str, Option] = {}


def register(fmt: QuantFormat) -> QuantFormat:
    """Add a method to the table. Its options join those of the methods registered before: a
    name already declared must have the same type, choices and flag (one CLI option serves
    both), else this raises, so that no method's option is silently overridden."""
    if fmt.name in _FORMATS:
        raise RuntimeError(f"quantization method {fmt.name!r} registered twice")
    for option in fmt.options:
        known = _OPTIONS.get(option.name)
        if known is not None and known.declaration() != option.declaration():
            owners = sorted(
                name for name, other in _FORMATS.items() if option.name in {o.name for o in other.options}
            )
            raise RuntimeError(
                f"method {fmt.name!r} declares option {option.name!r} as {_describe(option)}, but "
                f"{', '.join(owners)} declared it as {_describe(known)}: one CLI option serves both"
            )
    _FORMATS[fmt.name] = fmt
    for option in fmt.options:
        _OPTIONS.setdefault(option.name, option)
    return fmt


def _describe(option: Option) -> str:
    kind = "a flag" if option.flag else option.type.__name__
    return kind + (f" with choices {list(option.choices)}" if option.choices else "")


def get_format(name: str) -> QuantFormat:
    try:
        return _FORMATS[name]
    except KeyError:
        raise UsageError(f"unknown method {name!r}; valid methods: {', '.join(sorted(_FORMATS))}") from None


def all_formats() -> dict[str, QuantFormat]:
    return dict(_FORMATS)


def all_options() -> dict[str, Option]:
    """Every registered method's options, one per name, in registration order."""
    return dict(_OPTIONS)


def format_of_quant_method(quant_method: str) -> QuantFormat | None:
    """The method whose folders carry this ``quantization_config.quant_method``, or None."""
    return next((fmt for fmt in _FORMATS.values() if fmt.quant_method == quant_method), None)


def check_choice(
    fmt: QuantFormat,
    option: str,
    value: Any,
    valid: tuple[Any, ...],
    condition: tuple[str, Any] | None = None,
    note: str = "",
) -> None:
    """Refuse ``value`` of ``option`` unless it is in ``valid``. ``condition``: the other option
    and value under which the choice is limited (bnb's blocksizes with ``("bits", 4)``);
    ``note``: a sentence in parentheses after the choices."""
    if value in valid:
        return
    shown = ", ".join(str(v) for v in valid)
    where = " {condition}" if condition else ""
    after = f" ({note})" if note else ""
    raise UsageError(
        "{method}" + where + ": {option} {value} is not supported; choose from " + shown + after,
        option=option,
        value=value,
        method=fmt.name,
        condition=condition,
    )
