"""Source readers: a model's tensors, one at a time, plus its config and tokenizer files.

``open_source(ref)`` picks the reader: a Hugging Face folder (single or sharded safetensors), or a
``.gguf`` file (``source_gguf.py``). Every reader yields tensors under Hugging Face names, in the
order they lie on disk, so reading stays sequential and memory stays at one tensor.
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from qconv.errors import SourceError, SourceNotFoundError

# safetensors dtype names -> torch dtypes (the subset model checkpoints use)
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Files in a model folder that are weights in some other framework or ours to rewrite.
NOT_SUPPORT_FILES = {"config.json", "qconv.json", "README.md", "model.safetensors.index.json"}
WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".onnx",
    ".gguf",
    ".npz",
)
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors crate's own limit


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # the dtype ``read`` returns

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class Source:
    """What every reader offers. ``kind`` is ``hf``, ``gguf`` or (later) ``hub``."""

    kind: str = ""
    ref: str = ""
    revision: str | None = None

    def config_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def hf_config(self):
        """A transformers ``PretrainedConfig`` of the architecture (raises SourceError if unknown)."""
        from transformers import AutoConfig

        config = dict(self.config_dict())
        model_type = config.pop("model_type", None)
        if not model_type:
            raise SourceError(f"{self.ref}: config has no model_type")
        try:
            return AutoConfig.for_model(model_type, **config)
        except (KeyError, ValueError) as exc:
            raise SourceError(
                f"{self.ref}: architecture {model_type!r} is not known to transformers"
            ) from exc

    def tensors(self) -> list[TensorInfo]:
        raise NotImplementedError

    def read(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def hashed_files(self) -> list[Path]:
        """Files whose sha256 the manifest records (weights, config, tokenizer)."""
        raise NotImplementedError

    def write_support_files(self, dest: Path) -> list[str]:
        """Write tokenizer and generation config into ``dest``; return the file names written."""
        raise NotImplementedError

    def default_dtype(self) -> torch.dtype:
        """The dtype unquantized float tensors keep when --dtype is auto."""
        floats = [t.dtype for t in self.tensors() if t.dtype in FLOAT_DTYPES]
        return max(set(floats), key=floats.count) if floats else torch.bfloat16

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """Parse and check a safetensors header without reading the data (names the file on error)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise SourceError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise SourceError(
                    f"{path}: corrupt safetensors header (length {header_len} for a {size}-byte file)"
                )
            raw = f.read(header_len)
    except OSError as exc:
        raise SourceError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"{path}: corrupt safetensors header (not JSON)") from exc
    if not isinstance(header, dict):
        raise SourceError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_len = size - 8 - header_len
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = entry["data_offsets"]
            dtype, shape = entry["dtype"], entry["shape"]
        except (KeyError, TypeError, ValueError) as exc:
            raise SourceError(f"{path}: corrupt safetensors header entry for tensor {name!r}") from exc
        if stop > data_len:
            raise SourceError(
                f"{path}: truncated: tensor {name!r} ends at byte {stop} of the data but the file holds {data_len}"
            )
        if dtype not in SAFETENSORS_DTYPES:
            raise SourceError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        itemsize = torch.empty((), dtype=SAFETENSORS_DTYPES[dtype]).element_size()
        numel = 1
        for d in shape:
            numel *= d
        if stop - start != numel * itemsize:
            raise SourceError(
                f"{path}: corrupt safetensors header: tensor {name!r} size does not match its shape"
            )
        end = max(end, stop)
    if end != data_len:
        raise SourceError(f"{path}: corrupt safetensors file: {data_len - end} bytes after the last tensor")
    return header


class HFFolderSource(Source):
    """A local Hugging Face model folder with ``config.json`` and safetensors weights."""

    kind = "hf"

    def __init__(self, folder: Path):
        self.folder = folder
        self.ref = str(folder)
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise SourceError(f"{folder}: no config.json (not a Hugging Face model folder)")
        try:
            self._config = json.loads(config_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SourceError(f"{config_path}: not valid JSON") from exc
        self.weight_files = self._find_weight_files()
        self._infos: list[TensorInfo] = []
        self._file_of: dict[str, Path] = {}
        for path in self.weight_files:
            header = read_safetensors_header(path)
            entries = sorted(
                ((k, v) for k, v in header.items() if k != "__metadata__"),
                key=lambda kv: kv[1]["data_offsets"][0],
            )
            for name, entry in entries:
                if name in self._file_of:
                    raise SourceError(f"{path}: tensor {name!r} also stored in {self._file_of[name].name}")
                self._file_of[name] = path
                self._infos.append(
                    TensorInfo(name, tuple(entry["shape"]), SAFETENSORS_DTYPES[entry["dtype"]])
                )
        if not self._infos:
            raise SourceError(f"{folder}: the safetensors files hold no tensors")
        self._handles: dict[Path, Any] = {}

    def _find_weight_files(self) -> list[Path]:
        folder = self.folder
        index_path = folder / "model.safetensors.index.json"
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
                raise SourceError(f"{index_path}: not a valid safetensors index") from exc
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise SourceError(f"{index_path}: lists {missing[0]}, which is missing")
            return [folder / n for n in names]
        if (folder / "model.safetensors").is_file():
            return [folder / "model.safetensors"]
        files = sorted(folder.glob("*.safetensors"))
        if files:
            return files
        if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth")):
            raise SourceError(
                f"{folder}: only pickle weights (.bin/.pt); qconv reads safetensors only (no pickle)"
            )
        raise SourceError(f"{folder}: no safetensors weights found")

    def config_dict(self) -> dict[str, Any]:
        return dict(self._config)

    def tensors(self) -> list[TensorInfo]:
        return list(self._infos)

    def read(self, name: str) -> torch.Tensor:
        from safetensors import SafetensorError, safe_open

        path = self._file_of[name]
        try:
            handle = self._handles.get(path)
            if handle is None:
                handle = self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
            return handle.get_tensor(name)
        except (SafetensorError, OSError) as exc:
            raise SourceError(f"{path}: cannot read tensor {name!r}: {exc}") from exc

    def hashed_files(self) -> list[Path]:
        files = [self.folder / "config.json", *self.weight_files]
        index_path = self.folder / "model.safetensors.index.json"
        if index_path.is_file():
            files.append(index_path)
        return files + [self.folder / n for n in self._support_file_names()]

    def _support_file_names(self) -> list[str]:
        return sorted(
            p.name
            for p in self.folder.iterdir()
            if p.is_file()
            and p.name not in NOT_SUPPORT_FILES
            and not p.name.endswith(WEIGHT_SUFFIXES)
            and not p.name.startswith(".")
        )

    def write_support_files(self, dest: Path) -> list[str]:
        names = self._support_file_names()
        for name in names:
            shutil.copyfile(self.folder / name, dest / name)
        return names

    def close(self) -> None:
        self._handles.clear()


def open_source(ref: str | Path) -> Source:
    """Open a source by reference: a model folder or a ``.gguf`` file."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return HFFolderSource(path)
    if path.is_file():
        if path.suffix == ".gguf":
            from qconv.source_gguf import GGUFSource

            return GGUFSource(path)
        raise SourceError(f"{path}: not a model folder or a .gguf file")
    raise SourceNotFoundError(f"{ref}: no such file or folder")
