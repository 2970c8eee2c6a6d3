"""Files on disk: hashing, flushing, sizes, dtype names, and the one reader of safetensors folders.

Part of the core: it imports nothing of qconv but ``errors``. Every artifact folder (verify, the
loader, push) is read through :class:`SafetensorsFolder`; only the streaming source reader
(``qconv.sources``) keeps its own ``preadv`` path, because it hashes the files from the bytes it reads.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from qconv.errors import ArtifactError

HASH_CHUNK = 16 * 1024 * 1024

# safetensors dtype names <-> torch dtypes (the subset model checkpoints use)
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
# what artifacts may hold: the same, and compressed-tensors' FP8 weights. Sources still refuse
# F8_E4M3: a checkpoint's FP8 weights need scales no reader here applies.
TORCH_TO_SAFETENSORS = {
    **{dtype: name for name, dtype in SAFETENSORS_DTYPES.items()},
    torch.float8_e4m3fn: "F8_E4M3",
}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# the working dtypes a user may name (``--dtype``), by the name torch gives them
WORKING_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``bfloat16`` (the name config.json and the recipe use)."""
    return str(dtype).removeprefix("torch.")


def parse_size(text: str | int) -> int:
    """``5GB`` -> 5_000_000_000 (decimal units, as transformers' max_shard_size); ``512MiB`` binary."""
    if isinstance(text, int):
        return text
    units = {
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "B": 1,
    }
    cleaned = text.strip().upper()
    unit = next((u for u in units if cleaned.endswith(u)), "")
    number, factor = cleaned[: len(cleaned) - len(unit)].strip(), units.get(unit, 1)
    try:
        value = int(float(number) * factor)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (use e.g. 5GB or 500MB)") from None
    if value <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return value


def fsync_path(path: Path) -> None:
    """Flush a file's (or a folder's) written data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_file(path: Path) -> dict:
    """``{"sha256", "size"}`` of a file, as manifests list files (sha256 = the Hub's LFS oid)."""
    return {"sha256": sha256_file(path), "size": path.stat().st_size}


class SafetensorsFolder:
    """The tensors of a model folder (one ``model.safetensors`` or an index of shards), read one
    at a time. Every fault of the files (no weights, a broken index, an unreadable shard, a tensor
    the index lists but its shard lacks) is an :class:`ArtifactError` naming the file."""

    def __init__(self, folder: str | Path):
        from safetensors import SafetensorError, safe_open

        self.folder = folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = dict(json.loads(index.read_text())["weight_map"])
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
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

    def __contains__(self, key: str) -> bool:
        return key in self.file_of

    def read(self, key: str) -> torch.Tensor:
        from safetensors import SafetensorError

        file_name = self.file_of.get(key)
        if file_name is None:
            raise ArtifactError(f"{self.folder}: tensor {key!r} is missing")
        try:
            return self._handles[file_name].get_tensor(key)
        except (SafetensorError, OSError) as exc:
            raise ArtifactError(f"{self.folder / file_name}: cannot read tensor {key!r}: {exc}") from exc

    def close(self) -> None:
        self._handles.clear()
