"""``qconv.load_model``: a runnable transformers model from any artifact folder qconv makes.

Formats with a stock loader (bitsandbytes) load through transformers itself. Formats without
one (HQQ: transformers 5.x would silently fill its layers with random weights; EETQ: it needs a
kernel fetched from the Hub at run time) are built here:
the architecture from ``config.json`` with parameters on the meta device, each quantized
module swapped for the format's runnable module, and every other tensor read from the
safetensors files and assigned in place. Nothing is initialised twice and no full-precision
copy of a quantized weight is ever made, so loading needs about the artifact's size in memory.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn

from qconv.errors import ArtifactError, UsageError
from qconv.formats.base import format_of_quant_method


def folder_method(folder: Path) -> tuple[str | None, dict]:
    """(qconv method name or None for an unquantized model, recipe or {}) of a model folder."""
    manifest = folder / "qconv.json"
    if manifest.is_file():
        from qconv.artifact import Artifact

        artifact = Artifact(folder)
        return artifact.recipe["method"], artifact.recipe
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ArtifactError(f"{folder}: no config.json (not a model folder)")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{config_path}: not valid JSON") from exc
    quant = config.get("quantization_config")
    if not quant:
        return None, {}
    quant_method = quant.get("quant_method")
    # each method declares the quant_method its folders carry (formats/base.py)
    fmt = format_of_quant_method(quant_method) if isinstance(quant_method, str) else None
    if fmt is None:
        raise ArtifactError(f"{config_path}: quant_method {quant_method!r} is not one qconv loads")
    return fmt.name, {}


def load_model(path: str | Path, device: str = "auto", dtype: torch.dtype | str | None = None):
    """Load a qconv artifact (or another HQQ / bitsandbytes / EETQ folder) as a transformers model.

    ``device``: ``auto`` (first GPU, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
    ``dtype``: of activations and unquantized weights (default: the artifact's working dtype,
    else the config's, else float32). Returns the model in eval mode.
    """
    from qconv.environment import resolve_device
    from qconv.formats import get_format

    folder = Path(path)
    if not folder.is_dir():
        raise ArtifactError(f"{path}: no such model folder")
    method, recipe = folder_method(folder)
    target = resolve_device(device)
    dtype = _resolve_dtype(dtype, recipe, folder)
    if method is None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, device_map=str(target))
    else:
        model = get_format(method).load_pretrained(folder, target, dtype)
    return model.eval()


def _resolve_dtype(dtype, recipe: dict, folder: Path) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype or recipe.get("dtype")
    if name is None:
        try:
            config = json.loads((folder / "config.json").read_text())
            name = config.get("dtype") or config.get("torch_dtype") or "float32"
        except (OSError, json.JSONDecodeError):
            name = "float32"
    resolved = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise UsageError(f"dtype {name!r} is not a floating-point torch dtype")
    return resolved


# -- building a model with swapped-in modules ---------------------------------------------------
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


class SafetensorsFolder:
    """The tensors of a model folder (one file or an index of shards), read one at a time."""

    def __init__(self, folder: Path):
        from safetensors import SafetensorError, safe_open

        self.folder = folder
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = dict(json.loads(index.read_text())["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ArtifactError(f"{index}: not a valid safetensors index") from exc
        elif (folder / "model.safetensors").is_file():
            weight_map = None
        else:
            raise ArtifactError(f"{folder}: no model.safetensors or model.safetensors.index.json")
        self._handles = {}
        self.file_of: dict[str, str] = {}
        names = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        for name in names:
            try:
                handle = safe_open(str(folder / name), framework="pt")
            except (SafetensorError, OSError) as exc:
                raise ArtifactError(f"{folder / name}: cannot open: {exc}") from exc
            self._handles[name] = handle
            for key in handle.keys():
                self.file_of[key] = name
        if weight_map:
            absent = sorted(k for k, f in weight_map.items() if self.file_of.get(k) != f)
            if absent:
                raise ArtifactError(
                    f"{folder}: tensor {absent[0]!r} listed in the index is not in {weight_map[absent[0]]}"
                )

    def keys(self) -> list[str]:
        return list(self.file_of)

    def read(self, key: str) -> torch.Tensor:
        from safetensors import SafetensorError

        try:
            return self._handles[self.file_of[key]].get_tensor(key)
        except (SafetensorError, OSError, KeyError) as exc:
            raise ArtifactError(f"{self.folder}: cannot read tensor {key!r}: {exc}") from exc


def load_with_runtime_modules(folder: str | Path, fmt, device: torch.device, dtype: torch.dtype):
    """Build the model of ``folder`` with ``fmt.runtime_module`` for every quantized module, given
    the folder's recipe (``{}`` without a manifest: EETQ's layout, say, is then its default). A
    module is quantized when it has a tensor ending in ``fmt.marker_suffix``."""
    _method, recipe = folder_method(Path(folder))
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
