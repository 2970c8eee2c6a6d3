"""A local Hugging Face folder (one ``model.safetensors`` or an index of shards) as a source:
each tensor read with one ``preadv`` into (pinned) memory, the files hashed from the same bytes."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from qconv.errors import SourceError
from qconv.files import SAFETENSORS_DTYPES, hash_file
from qconv.fingerprints import remember, taken_before_hashing

# Files in a model folder that are weights in some other framework or ours to rewrite.
from qconv.sources.base import (
    SequentialFileHash,
    Source,
    TensorInfo,
    copy_support_files,
    read_card_license,
    read_folder_config,
    read_safetensors_header,
    support_file_names,
)


class HFFolderSource(Source):
    """A local Hugging Face model folder with ``config.json`` and safetensors weights."""

    kind = "hf"

    def __init__(self, folder: Path):
        self.folder = folder
        self.ref = str(folder)
        self._config = read_folder_config(folder)
        self.license = read_card_license(folder / "README.md")
        self.weight_files = self._find_weight_files()
        self._infos: list[TensorInfo] = []
        self._file_of: dict[str, Path] = {}
        self._offsets: dict[str, tuple[int, int]] = {}  # absolute byte range of each tensor
        self._data_start: dict[Path, int] = {}
        self._stream_hashes: dict[Path, SequentialFileHash] = {}
        for path in self.weight_files:
            header, data_start = read_safetensors_header(path)
            entries = sorted(
                ((k, v) for k, v in header.items() if k != "__metadata__"),
                key=lambda kv: kv[1]["data_offsets"][0],
            )
            for name, entry in entries:
                if name in self._file_of:
                    raise SourceError(f"{path}: tensor {name!r} also stored in {self._file_of[name].name}")
                self._file_of[name] = path
                self._data_start[path] = data_start
                start, stop = entry["data_offsets"]
                self._offsets[name] = (data_start + start, data_start + stop)
                self._infos.append(
                    TensorInfo(name, tuple(entry["shape"]), SAFETENSORS_DTYPES[entry["dtype"]])
                )
        if not self._infos:
            raise SourceError(f"{folder}: the safetensors files hold no tensors")
        self._info_of = {info.name: info for info in self._infos}
        self._fds: dict[Path, int] = {}

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

    def location(self, name: str) -> str:
        return str(self._file_of[name])

    def read(self, name: str, pin_memory: bool = False) -> torch.Tensor:
        """One tensor by a plain positioned read (not mmap): the bytes land in memory the tensor
        owns, so the process holds only the tensors alive, not every page of the file it touched.
        ``pin_memory`` reads straight into page-locked memory for an asynchronous copy to a GPU."""
        path = self._file_of[name]
        start, stop = self._offsets[name]
        info = self._info_of[name]
        nbytes = stop - start
        try:
            fd = self._fds.get(path)
            if fd is None:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            raw = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin_memory)
            view = memoryview(raw.numpy()) if nbytes else memoryview(b"")
            done = 0
            while done < nbytes:
                n = os.preadv(fd, [view[done:]], start + done)
                if n == 0:
                    raise SourceError(f"{path}: truncated while reading tensor {name!r}")
                done += n
        except OSError as exc:
            raise SourceError(f"{path}: cannot read tensor {name!r}: {exc.strerror or exc}") from exc
        stream_hash = self._stream_hashes.get(path)
        if stream_hash is not None and nbytes:
            stream_hash.feed(start, view)
        return (
            raw.view(info.dtype).reshape(info.shape) if nbytes else torch.empty(info.shape, dtype=info.dtype)
        )

    def start_hashing(self) -> None:
        """Weight files are hashed from the bytes ``read`` reads (tensors come in file order, and
        safetensors leaves no gaps); the small files beside them from disk."""
        if getattr(self, "_hashes", None) is not None:
            return
        self._stat_before_hashing = taken_before_hashing(self.hashed_files())
        self._stream_hashes = {
            path: SequentialFileHash(path, self._data_start[path]) for path in self.weight_files
        }
        others = [p for p in self.hashed_files() if p not in self._stream_hashes]
        self._hash_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="qconv-hash")
        self._hashes = {p.name: self._hash_pool.submit(hash_file, p) for p in others}

    def file_hashes(self) -> dict[str, dict]:
        self.start_hashing()
        result = {name: future.result() for name, future in self._hashes.items()}
        for path, stream_hash in self._stream_hashes.items():
            # a file not read whole and in order (e.g. a tensor skipped) is hashed from disk
            result[path.name] = stream_hash.result() or hash_file(path)
        self._hash_pool.shutdown()
        remember(self._stat_before_hashing, result)  # for release --dry-run (qconv.fingerprints)
        return dict(sorted(result.items()))

    def hashed_files(self) -> list[Path]:
        files = [self.folder / "config.json", *self.weight_files]
        index_path = self.folder / "model.safetensors.index.json"
        if index_path.is_file():
            files.append(index_path)
        return files + [self.folder / n for n in support_file_names(self.folder)]

    def write_support_files(self, dest: Path) -> list[str]:
        return copy_support_files(self.folder, dest)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
