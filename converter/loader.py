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

import json
from pathlib import Path

import torch

from qconv.environment import resolve_device
from qconv.errors import ArtifactError, UsageError
from qconv.formats import get_format
from qconv.formats.base import format_of_quant_method
from qconv.manifest import is_artifact, read_manifest


def folder_method(folder: Path) -> tuple[str | None, dict]:
    """(qconv method name or None for an unquantized model, recipe or {}) of a model folder."""
    if is_artifact(folder):
        recipe = read_manifest(folder)["recipe"]
        return recipe["method"], recipe
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
