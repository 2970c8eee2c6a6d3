"""A qconv artifact folder joined to its format: the manifest, the recipe, and each quantized
layer's packed tensors and their dequantized weight.

Reading the files is :class:`qconv.files.SafetensorsFolder`'s job and reading the manifest
:mod:`qconv.manifest`'s; this class adds what needs the method (it sits above ``formats/``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qconv.errors import ArtifactError
from qconv.files import SafetensorsFolder
from qconv.formats import get_format
from qconv.formats.base import QuantFormat
from qconv.manifest import Manifest, read_manifest


class Artifact:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.manifest: Manifest = read_manifest(self.folder)
        self.recipe: dict[str, Any] = self.manifest["recipe"]
        self.format: QuantFormat = get_format(self.recipe["method"])
        self._tensors: SafetensorsFolder | None = None

    @property
    def layers(self) -> dict[str, dict]:
        return self.manifest.get("layers", {})

    @property
    def tensors(self) -> SafetensorsFolder:
        if self._tensors is None:  # opened on first use: checks of the manifest alone need no weights
            self._tensors = SafetensorsFolder(self.folder)
        return self._tensors

    @property
    def gguf_file(self) -> Path:
        """A GGUF artifact's file llama.cpp opens: the only .gguf, or the first of its parts."""
        names = sorted(name for name in self.manifest.get("files", {}) if name.endswith(".gguf"))
        if not names:
            raise ArtifactError(f"{self.folder}: its manifest lists no .gguf file")
        return self.folder / names[0]

    def unquantized_keys(self) -> set[str]:
        """Tensors stored as plain values (everything but the quantized layers' own tensors)."""
        prefixes = tuple(f"{module}." for module in self.layers)
        return {key for key in self.tensors.keys() if not key.startswith(prefixes)}

    def read(self, key: str) -> torch.Tensor:
        return self.tensors.read(key)

    def layer_tensors(self, module: str) -> dict[str, torch.Tensor]:
        return {
            suffix: self.read(f"{module}.{suffix}") for suffix in self.format.output_suffixes(self.recipe)
        }

    def dequantize(self, module: str) -> torch.Tensor:
        return self.format.dequantize(self.layer_tensors(module), self.recipe)

    def close(self) -> None:
        if self._tensors is not None:
            self._tensors.close()
