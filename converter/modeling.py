"""Models on the meta device: build an architecture without allocating it, put tensors into it
one at a time, and swap quantized layers in.

Part of the core: it imports nothing of qconv but ``errors`` and ``files``. What it needs of a
source of weights is :class:`ModelSource`, so the readers above (``qconv.sources``)
need not be imported here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from qconv.errors import ArtifactError, SourceError
from qconv.files import SafetensorsFolder


class ModelSource(Protocol):
    """What the core reads of a model's source (``qconv.sources.Source`` implements it)."""

    ref: str

    def hf_config(self) -> Any: ...

    def tensors(self) -> Iterable[Any]: ...  # items with .name, .shape, .dtype

    def read(self, name: str, pin_memory: bool = False) -> torch.Tensor: ...

    def write_support_files(self, folder: Path) -> list[str]: ...


@contextlib.contextmanager
def parameters_on_meta():
    """Create parameters on the meta device while leaving buffers real: modules compute their
    non-persistent buffers (rotary frequencies) in ``__init__``, and those are not in the files."""
    original = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        original(module, name, param)
        if param is not None:
            kind = type(module._parameters[name])
            module._parameters[name] = kind(
                module._parameters[name].to("meta"), requires_grad=param.requires_grad
            )

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def assign_parameter(root: nn.Module, key: str, value: torch.Tensor) -> None:
    """Put ``value`` in place of the parameter ``key`` (a dotted name under ``root``), frozen."""
    module_name, _, attr = key.rpartition(".")
    owner = root.get_submodule(module_name) if module_name else root
    setattr(owner, attr, nn.Parameter(value, requires_grad=False))


def load_with_runtime_modules(
    folder: str | Path, fmt, device: torch.device, dtype: torch.dtype, recipe: dict[str, Any]
):
    """Build the model of ``folder`` with ``fmt.runtime_module(tensors, bias, recipe)`` for every
    quantized module (``recipe``: the folder's, ``{}`` for a folder without a manifest, whose
    layout is then the method's default). A module is quantized when it has a tensor ending in
    ``fmt.marker_suffix``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    tensors = SafetensorsFolder(folder)
    marker = "." + fmt.marker_suffix
    quantized = sorted(key[: -len(marker)] for key in tensors.keys() if key.endswith(marker))
    try:
        config = AutoConfig.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001 - any unreadable config is the folder's fault
        raise ArtifactError(
            f"{folder}/config.json: cannot build a config: {str(exc).splitlines()[0]}"
        ) from exc
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the layers are swapped in below, not by transformers
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)

    modules = dict(model.named_modules())
    layers: dict[str, nn.Module] = {}
    used: set[str] = set()
    for name in quantized:
        if not isinstance(modules.get(name), nn.Linear):
            raise ArtifactError(
                f"{folder}: quantized layer {name} is not a Linear module of {config.model_type}"
            )
        prefix = name + "."
        own = {
            key[len(prefix) :]: key
            for key in tensors.keys()
            if key.startswith(prefix) and "." not in key[len(prefix) :]
        }
        bias_key = own.pop("bias", None)
        layer_tensors = {suffix: tensors.read(key) for suffix, key in own.items()}
        bias = tensors.read(bias_key).to(dtype) if bias_key else None
        try:
            layers[name] = fmt.runtime_module(layer_tensors, bias, recipe)
        except ArtifactError as exc:
            raise ArtifactError(f"{folder}: layer {name}: {exc}") from None
        used.update(own.values())
        if bias_key:
            used.add(bias_key)

    parameters = {key for key, _ in model.named_parameters(remove_duplicate=False)}
    # The checkpoint may name (or split) tensors as an earlier transformers did, which the current
    # one renames and fuses while loading (GPT-NeoX's embed_out, Mixtral's Linear per expert): only
    # transformers' loader knows where they go. It then loads the unquantized tensors; the
    # quantized layers it builds in full precision are swapped out below.
    renamed = not set(tensors.keys()) - used <= parameters
    if renamed:
        model = _load_renamed_checkpoint(folder, config, dtype, used)
    for name, module in layers.items():
        model.set_submodule(name, module)
    if renamed:  # every other tensor is in place
        return model.to(device).eval()

    missing = []
    for key, param in list(model.named_parameters(remove_duplicate=False)):
        if not param.is_meta:
            continue
        if key not in tensors.file_of:
            missing.append(key)
            continue
        value = tensors.read(key)
        if tuple(value.shape) != tuple(param.shape):
            raise ArtifactError(
                f"{folder}: tensor {key!r} is {list(value.shape)}, the model expects {list(param.shape)}"
            )
        if value.dtype.is_floating_point:
            value = value.to(dtype)
        assign_parameter(model, key, value)
        used.add(key)
    if missing:
        model.tie_weights()  # a tied lm_head is not in the files; it shares the embedding
        still = [key for key, p in model.named_parameters(remove_duplicate=False) if p.is_meta]
        if still:
            raise ArtifactError(f"{folder}: tensor {still[0]!r} is missing")
    unused = sorted(set(tensors.keys()) - used)
    if unused:
        raise ArtifactError(f"{folder}: tensor {unused[0]!r} belongs to no module of the model")
    return model.to(device).eval()


def _load_renamed_checkpoint(folder: Path, config, dtype: torch.dtype, quantized_keys: set[str]):
    """The model of ``folder`` loaded by transformers (its key renaming and fusing included), the
    quantized layers' own tensors left out (they are swapped in by the caller)."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        str(folder),
        config=config,
        dtype=dtype,
        output_loading_info=True,
        ignore_mismatched_sizes=True,
        use_safetensors=True,
    )
    for key, found, expected in info.get("mismatched_keys", ()):
        if key not in quantized_keys:  # a quantized layer's weight (EETQ's int8) is not the Linear's
            raise ArtifactError(
                f"{folder}: tensor {key!r} is {list(found)}, the model expects {list(expected)}"
            )
    quantized_layers = {key.rsplit(".", 1)[0] for key in quantized_keys}
    unexpected = sorted(k for k in info.get("unexpected_keys", ()) if k not in quantized_keys)
    if unexpected:
        raise ArtifactError(f"{folder}: tensor {unexpected[0]!r} belongs to no module of the model")
    missing = sorted(k for k in info.get("missing_keys", ()) if k.rsplit(".", 1)[0] not in quantized_layers)
    if missing:
        raise ArtifactError(f"{folder}: tensor {missing[0]!r} is missing")
    return model


def reference_model(source: ModelSource, device: torch.device, working_dtype: torch.dtype):
    """The source model computing in float32, its weights rounded to the working dtype first
    (what the artifact's unquantized tensors hold, and what the quantizer was fed).

    A model folder is read by transformers itself: checkpoints keep names and layouts of earlier
    releases (GPT-NeoX's ``embed_out``, Mixtral's one Linear per expert) that transformers renames
    and fuses while loading, so that only its loader knows where each tensor goes. Other sources
    (a gguf) are filled from the same reader the converter read, one tensor at a time."""
    from transformers import AutoModelForCausalLM

    folder = getattr(source, "folder", None)
    if folder is not None and (Path(folder) / "config.json").is_file():
        # mismatched sizes are let through, to be named below (transformers raises a generic error)
        model, info = AutoModelForCausalLM.from_pretrained(
            str(folder),
            dtype=torch.float32,
            output_loading_info=True,
            ignore_mismatched_sizes=True,
            use_safetensors=True,  # never a pickle file beside them
        )
        for key, found, expected in info.get("mismatched_keys", ()):
            raise SourceError(
                f"{source.ref}: tensor {key!r} has shape {list(found)}, the architecture expects {list(expected)}"
            )
        missing = [k for k in info.get("missing_keys", ()) if not _is_tied(model, k)]
        if missing:
            raise SourceError(
                f"{source.ref}: the source lacks tensor {sorted(missing)[0]!r} the architecture needs"
            )
        with torch.no_grad():
            for tensor in model.state_dict().values():
                if tensor.is_floating_point():
                    tensor.copy_(tensor.to(working_dtype))
        return model.to(device).eval()
    return _reference_model_streamed(source, device, working_dtype)


def _reference_model_streamed(source: ModelSource, device: torch.device, working_dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    config = source.hf_config()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # The model's own tensors, filled one source tensor at a time: a state dict built first would
    # hold a second float32 copy of the whole model.
    targets = model.state_dict()
    filled = set()
    with torch.no_grad():
        for info in source.tensors():
            target = targets.get(info.name)
            if target is None:  # a tensor the architecture does not use (as strict=False skipped)
                continue
            tensor = source.read(info.name)
            if tensor.is_floating_point():
                tensor = tensor.to(working_dtype)
            if tuple(tensor.shape) != tuple(target.shape):
                raise SourceError(
                    f"{source.ref}: tensor {info.name!r} has shape {list(tensor.shape)}, the "
                    f"architecture expects {list(target.shape)}"
                )
            target.copy_(tensor)
            filled.add(info.name)
    model.tie_weights()
    # persistent buffers (rare in decoders) are the model's own, made by its constructor
    known = filled | {name for name, _ in model.named_buffers()}
    missing = [k for k in targets if k not in known and not _is_tied(model, k)]
    if missing:
        raise SourceError(f"{source.ref}: the source lacks tensor {missing[0]!r} the architecture needs")
    return model.to(device).eval()


def _is_tied(model, key: str) -> bool:
    output = model.get_output_embeddings()
    return (
        output is not None
        and key.startswith("lm_head")
        and output.weight is model.get_input_embeddings().weight
    )


# config attributes that bound the positions a model can attend to, by architecture family
CONTEXT_LENGTH_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def context_length(config) -> int | None:
    """The most positions the architecture takes (None where its config does not say), from a
    transformers config or a config.json's dict: calibration and ``qconv eval`` both ask here."""
    for key in CONTEXT_LENGTH_KEYS:
        value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
        if isinstance(value, int) and value > 1:
            return value
    return None
