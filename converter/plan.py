"""Decide, tensor by tensor, what happens to a source model: quantize with the method, or copy.

The architecture is instantiated on the meta device (no memory) to learn which tensors are
``nn.Linear`` weights. Those are quantized unless they are the output embeddings (lm_head,
kept by default as every serving stack expects), match a ``--skip`` pattern, or have a shape
the method cannot take. Everything else (embeddings, norms, biases) is copied.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

import torch

from qconv.errors import ArtifactError, SourceError, UsageError
from qconv.files import FLOAT_DTYPES
from qconv.formats.base import QuantFormat
from qconv.sources import PackedLayer, Source, TensorInfo


@dataclass(frozen=True)
class TensorPlan:
    info: TensorInfo
    #: "quantize", "copy", or "packed" (a layer the source holds quantized already: written as is)
    action: str
    module: str | None = None  # the nn.Linear's name, for quantized weights and skipped ones

    @property
    def name(self) -> str:
        return self.info.name


@dataclass
class Plan:
    tensors: list[TensorPlan]
    #: Linear modules left unquantized, with the reason (goes to the manifest and the skip list)
    skipped: dict[str, str] = field(default_factory=dict)
    architecture: str = ""
    #: weight names of the model's nn.Embedding modules (some formats list them in their config)
    embeddings: list[str] = field(default_factory=list)
    #: the layers the source holds quantized already (source.packed_layers())
    packed: dict[str, PackedLayer] = field(default_factory=dict)
    #: the architecture's Linear modules in the model's module order (``named_modules``)
    linear_order: list[str] = field(default_factory=list)

    def in_model_order(self, modules) -> list[str]:
        """``modules`` (Linear names) in the model's module order, as llm-compressor lists them."""
        rank = {name: i for i, name in enumerate(self.linear_order)}
        return sorted(modules, key=lambda name: (rank.get(name, len(rank)), name))

    @property
    def quantized(self) -> list[TensorPlan]:
        return [t for t in self.tensors if t.action in ("quantize", "packed")]


def compile_skip_patterns(patterns: tuple[str, ...] | list[str]) -> list[re.Pattern]:
    """``--skip`` takes shell-style globs on module names (``*.mlp.down_proj``) or ``re:REGEX``."""
    compiled = []
    for pattern in patterns:
        try:
            if pattern.startswith("re:"):
                compiled.append(re.compile(pattern[3:]))
            else:
                compiled.append(re.compile(fnmatch.translate(pattern)))
        except re.error as exc:
            detail = str(exc).replace("{", "{{").replace("}", "}}")  # the message is a template
            raise UsageError(
                "{option} {value!r} is not a valid pattern: " + detail, option="skip", value=pattern
            ) from None
    return compiled


def matches_skip(module: str, patterns: list[re.Pattern]) -> bool:
    # a glob without dots matches any module whose last part it names: --skip down_proj
    return any(p.fullmatch(module) or p.fullmatch(module.rsplit(".", 1)[-1]) for p in patterns)


@dataclass
class Architecture:
    """What planning needs to know of the source's architecture, from a meta-device instance."""

    name: str  # the model class
    linears: dict[str, tuple[int, int]]  # nn.Linear modules and their [out, in]
    classes: dict[str, type]  # each Linear's class (some models subclass nn.Linear)
    outputs: set[str]  # the output-embedding modules
    embeddings: list[str]  # weights of the nn.Embedding modules
    parameters: dict[str, tuple[int, ...]]  # every parameter's shape, tied ones under each name
    tied: list[set[str]]  # names that share one parameter


def linear_modules(source: Source) -> Architecture:
    """The source's architecture instantiated on the meta device (no memory): its Linear
    modules, output embeddings, embeddings and parameter shapes."""
    import transformers

    config = source.hf_config()
    architectures = getattr(config, "architectures", None) or []
    model = None
    with torch.device("meta"):
        for arch in architectures:
            cls = getattr(transformers, arch, None)
            if cls is not None:
                try:
                    model = cls(config)
                    break
                # only transformers' code runs here: a class named in config.json that does not
                # fit the config raises one of these (a missing attribute, a wrong value...);
                # fall back to the Auto classes below
                except (AttributeError, TypeError, ValueError, KeyError, RuntimeError):
                    model = None
        if model is None:
            for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
                try:
                    model = auto.from_config(config)
                    break
                except (ValueError, KeyError):
                    continue
    if model is None:
        raise SourceError(f"{source.ref}: transformers cannot build architecture {config.model_type!r}")
    linears = {
        name: (module.out_features, module.in_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
    outputs = set()
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if output_embeddings is not None and module is output_embeddings:
            outputs.add(name)
    embeddings = [f"{name}.weight" for name, m in model.named_modules() if isinstance(m, torch.nn.Embedding)]
    classes = {name: type(module) for name, module in model.named_modules() if name in linears}
    parameters: dict[str, tuple[int, ...]] = {}
    sharing: dict[int, set[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        parameters[name] = tuple(param.shape)
        sharing.setdefault(id(param), set()).add(name)
    tied = [names for names in sharing.values() if len(names) > 1]
    return Architecture(type(model).__name__, linears, classes, outputs, embeddings, parameters, tied)


def make_plan(source: Source, fmt: QuantFormat, recipe: dict, skip: list[str]) -> Plan:
    arch = linear_modules(source)
    linears, outputs, classes = arch.linears, arch.outputs, arch.classes
    packed = source.packed_layers()
    check_packed_layers(packed, arch)
    check_tensors_fit(source, arch)
    patterns = compile_skip_patterns(skip)
    plan = Plan(
        tensors=[],
        architecture=arch.name,
        embeddings=arch.embeddings,
        packed=packed,
        linear_order=list(linears),
    )
    for info in source.tensors():
        module = info.name[: -len(".weight")] if info.name.endswith(".weight") else None
        if module in packed:
            plan.tensors.append(TensorPlan(info, "packed", module))
            continue
        if module not in linears:
            plan.tensors.append(TensorPlan(info, "copy"))
            continue
        reason = None
        if packed:  # a model quantized already: what it left in float stays so
            reason = ("output embeddings, " if module in outputs else "") + "not quantized in the source"
        elif module in outputs:
            reason = "output embeddings stay unquantized"
        elif matches_skip(module, patterns):
            reason = "matches --skip"
        elif info.dtype not in FLOAT_DTYPES:
            reason = f"dtype {info.dtype} is not a float"
        elif fmt.exact_linear_loader and classes[module] is not torch.nn.Linear:
            reason = (
                f"a {classes[module].__name__} (subclass of nn.Linear), which {fmt.exact_linear_loader} "
                "leaves unquantized"
            )
        else:  # its shape is the Linear's: check_tensors_fit refused any other
            reason = fmt.skip_reason(module, tuple(info.shape), recipe)
        if reason:
            plan.skipped[module] = reason
            plan.tensors.append(TensorPlan(info, "copy", module))
        else:
            plan.tensors.append(TensorPlan(info, "quantize", module))
    # Output embeddings absent from the source (tied to the input embeddings) must still be named
    # in the skip list, or a loader would build a quantized lm_head and tie nothing to it.
    for module in sorted(outputs - set(plan.skipped)):
        if not any(t.module == module for t in plan.tensors):
            plan.skipped[module] = (
                "output embeddings, not quantized in the source"
                if packed
                else "output embeddings (tied to the input embeddings)"
            )
    if packed:
        plan.skipped = dict(sorted(plan.skipped.items()))
    if not plan.quantized:
        if not set(linears) - outputs:
            example = "; the architecture has no nn.Linear besides the output embeddings (Conv1D layers, as in GPT-2, are not supported)"
        else:  # name one reason (not the output embeddings', which are always kept)
            why = next(((m, r) for m, r in plan.skipped.items() if m not in outputs), None)
            example = f"; {why[0]}: {why[1]}" if why else ""
        raise UsageError(f"{source.ref}: no layer to quantize (every Linear is skipped or absent){example}")
    return plan


def check_packed_layers(packed: dict[str, PackedLayer], arch: Architecture) -> None:
    """Each layer a source holds quantized already is a Linear of the architecture, of its shape."""
    for module, layer in packed.items():
        if module not in arch.linears:
            raise ArtifactError(f"{layer.where}: not a Linear module of {arch.name}")
        if tuple(layer.shape) != arch.linears[module]:
            raise ArtifactError(
                f"{layer.where}: shape {list(layer.shape)} is not the Linear's [out, in] {list(arch.linears[module])}"
            )


def check_tensors_fit(source: Source, arch: Architecture) -> None:
    """Refuse, before anything is written, a source whose tensors cannot be the architecture's: a
    tensor of a parameter's name with another shape, or (where the checkpoint names every tensor
    as the model does) a parameter with no tensor. Checkpoints laid out as an earlier transformers
    saved them (GPT-NeoX's embed_out, Mixtral's Linear per expert) are mapped by transformers
    while loading; their missing tensors are left to verify, which loads them that way."""
    infos = list(source.tensors())
    for info in infos:
        expected = arch.parameters.get(info.name)
        if expected is not None and tuple(info.shape) != expected:
            raise SourceError(
                f"{source.ref}: tensor {info.name!r} has shape {list(info.shape)}, the architecture "
                f"({arch.name}) expects {list(expected)}"
            )
    names = {info.name for info in infos}
    if not names <= set(arch.parameters):
        return
    present = set(names)
    for group in arch.tied:  # one tensor serves every name of a tied parameter
        if group & names:
            present |= group
    missing = sorted(set(arch.parameters) - present)
    if missing:
        raise SourceError(
            f"{source.ref}: the source lacks tensor {missing[0]!r} the architecture ({arch.name}) needs"
        )
