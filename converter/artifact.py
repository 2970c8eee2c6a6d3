"""Read a qconv artifact folder: its manifest, config and packed tensors by module."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from qconv.errors import ArtifactError
from qconv.formats import get_format
from qconv.formats.base import QuantFormat

MANIFEST_NAME = "qconv.json"


class Artifact:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ArtifactError(f"{folder}: no such artifact folder")
        manifest_path = self.folder / MANIFEST_NAME
        if not manifest_path.is_file():
            raise ArtifactError(f"{folder}: no {MANIFEST_NAME} (not a qconv artifact)")
        try:
            self.manifest: dict[str, Any] = json.loads(manifest_path.read_text())
            self.recipe: dict[str, Any] = self.manifest["recipe"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise ArtifactError(f"{manifest_path}: not a valid qconv manifest") from exc
        self.format: QuantFormat = get_format(self.recipe["method"])
        self._file_of: dict[str, str] | None = None
        self._handles: dict[str, Any] = {}

    @property
    def layers(self) -> dict[str, dict]:
        return self.manifest.get("layers", {})

    def _key_files(self) -> dict[str, str]:
        if self._file_of is None:
            index = self.folder / "model.safetensors.index.json"
            if index.is_file():
                try:
                    self._file_of = dict(json.loads(index.read_text())["weight_map"])
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise ArtifactError(f"{index}: not a valid safetensors index") from exc
            elif (self.folder / "model.safetensors").is_file():
                from safetensors import safe_open

                with safe_open(str(self.folder / "model.safetensors"), framework="pt") as f:
                    self._file_of = {k: "model.safetensors" for k in f.keys()}
            else:
                raise ArtifactError(f"{self.folder}: no safetensors weights")
        return self._file_of

    def unquantized_keys(self) -> set[str]:
        """Tensors stored as plain values (everything but the quantized layers' own tensors)."""
        prefixes = tuple(f"{module}." for module in self.layers)
        return {key for key in self._key_files() if not key.startswith(prefixes)}

    def read(self, key: str) -> torch.Tensor:
        from safetensors import SafetensorError, safe_open

        file_name = self._key_files().get(key)
        if file_name is None:
            raise ArtifactError(f"{self.folder}: tensor {key!r} is missing")
        try:
            handle = self._handles.get(file_name)
            if handle is None:
                handle = self._handles[file_name] = safe_open(str(self.folder / file_name), framework="pt")
            return handle.get_tensor(key)
        except (SafetensorError, OSError) as exc:
            raise ArtifactError(f"{self.folder / file_name}: cannot read tensor {key!r}: {exc}") from exc

    def layer_tensors(self, module: str) -> dict[str, torch.Tensor]:
        return {
            suffix: self.read(f"{module}.{suffix}") for suffix in self.format.output_suffixes(self.recipe)
        }

    def dequantize(self, module: str) -> torch.Tensor:
        return self.format.dequantize(self.layer_tensors(module), self.recipe)

    def close(self) -> None:
        self._handles.clear()
