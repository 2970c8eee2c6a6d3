"""Streaming safetensors shard writer.

Tensors are written to disk as they arrive, so converting holds about one tensor in memory
whatever the model size. A safetensors file starts with its header, which lists every tensor's
offsets; since offsets are only known once tensors arrive, each shard reserves room for the
largest header it could need (bounded from the names still to come) and writes the header at
the end, padded with spaces as the safetensors format allows. Shards are written under
temporary names inside the caller's temporary folder and renamed to
``model-0000i-of-0000n.safetensors`` (or ``model.safetensors``) when the count is known.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import struct
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

TORCH_TO_SAFETENSORS = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
# Upper bound of one header entry beyond its name: {"dtype":"BF16","shape":[...],"data_offsets":[a,b]}
# with up to 4 dimensions and offsets of up to 20 digits each.
HEADER_ENTRY_OVERHEAD = 200
HASH_CHUNK = 16 * 1024 * 1024


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


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's raw little-endian bytes, without copying a contiguous CPU tensor."""
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


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


class _Shard:
    def __init__(self, path: Path, reserved_header: int):
        self.path = path
        self.file = open(path, "wb")
        # data starts 8-byte aligned, as the safetensors writer aligns it
        self.reserved = (reserved_header + 7) // 8 * 8
        self.file.seek(8 + self.reserved)
        self.entries: dict[str, dict] = {}
        self.data_size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        data = tensor_bytes(tensor)
        self.file.write(data)
        self.entries[name] = {
            "dtype": TORCH_TO_SAFETENSORS[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self.data_size, self.data_size + data.nbytes],
        }
        self.data_size += data.nbytes

    def finish(self, metadata: dict[str, str]) -> None:
        header = json.dumps({"__metadata__": metadata, **self.entries}, separators=(",", ":")).encode()
        if len(header) > self.reserved:  # the bound is computed from the names: a bug if it fails
            raise RuntimeError(
                f"safetensors header of {len(header)} bytes exceeds the {self.reserved} reserved"
            )
        self.file.seek(0)
        self.file.write(struct.pack("<Q", self.reserved))
        self.file.write(header + b" " * (self.reserved - len(header)))
        self.file.close()


class SafetensorsShardWriter:
    """Write named tensors into shards of at most ``max_shard_bytes`` in a background thread.

    ``planned_names`` lists every name that will be added (order free); it bounds the headers.
    ``add`` hands the tensor to the writer thread and returns at once (the queue is bounded,
    so a slow disk slows the producer instead of filling memory). ``close`` returns
    ``{file name: {"sha256", "size"}}`` for the shards and writes the index when there are several.
    """

    def __init__(self, folder: Path, planned_names: list[str], max_shard_bytes: int, queue_size: int = 4):
        self.folder = folder
        self.max_shard_bytes = max_shard_bytes
        self._remaining_bound = sum(len(n.encode()) + HEADER_ENTRY_OVERHEAD for n in planned_names) + 64
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._shards: list[_Shard] = []
        self._weight_map: dict[str, int] = {}
        self._hashes: list[Future] = []
        self._hasher = ThreadPoolExecutor(max_workers=4, thread_name_prefix="qconv-hash")
        self._syncs: list[Future] = []
        self._error: BaseException | None = None
        self.bytes_written = 0
        self._thread = threading.Thread(target=self._run, name="qconv-writer", daemon=True)
        self._thread.start()

    # -- producer side ------------------------------------------------------------------------
    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._error is not None:
            raise self._error
        ready = None
        if tensor.device.type == "cuda":
            # Copy to page-locked memory without waiting; the writer thread waits for the copy.
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            host.copy_(tensor, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            tensor = host
        elif tensor.device.type != "cpu":
            tensor = tensor.to("cpu")
        self._queue.put((name, tensor, ready))

    def close(self) -> dict[str, dict]:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            self._hasher.shutdown(wait=True)
            raise self._error
        files = self._rename_and_index()
        self._hasher.shutdown(wait=True)
        return files

    def abort(self) -> None:
        """Stop the thread after a failure elsewhere; the caller removes the folder."""
        self._queue.put(None)
        self._thread.join()
        self._hasher.shutdown(wait=True)

    # -- writer thread ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while (item := self._queue.get()) is not None:
                name, tensor, ready = item
                if ready is not None:
                    ready.synchronize()
                self._write(name, tensor)
            if self._shards:
                self._finish_current()
        except BaseException as exc:  # re-raised in the producer thread
            self._error = exc
            # drain so that a blocked producer wakes up
            while self._queue.get() is not None:
                pass

    def _write(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        current = self._shards[-1] if self._shards and not self._shards[-1].file.closed else None
        if (
            current is not None
            and current.entries
            and nbytes
            and current.data_size + nbytes > self.max_shard_bytes
        ):
            self._finish_current()
            current = None
        if current is None:
            path = self.folder / f".shard-{len(self._shards) + 1:05d}.tmp"
            current = _Shard(path, self._remaining_bound)
            self._shards.append(current)
        current.add(name, tensor)
        self._weight_map[name] = len(self._shards) - 1
        self._remaining_bound -= len(name.encode()) + HEADER_ENTRY_OVERHEAD
        self.bytes_written += nbytes

    def _finish_current(self) -> None:
        shard = self._shards[-1]
        shard.finish({"format": "pt"})
        # Hash from the page cache, and flush to disk, while the next shard is written: a
        # finished artifact is on disk before it is renamed into place.
        self._hashes.append(self._hasher.submit(sha256_file, shard.path))
        self._syncs.append(self._hasher.submit(fsync_path, shard.path))

    # -- at close -----------------------------------------------------------------------------
    def _rename_and_index(self) -> dict[str, dict]:
        count = len(self._shards)
        names = (
            ["model.safetensors"]
            if count == 1
            else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        files: dict[str, dict] = {}
        for shard, name, digest, synced in zip(self._shards, names, self._hashes, self._syncs, strict=True):
            sha256 = digest.result()  # before the rename: the hasher reads the temporary name
            synced.result()
            final = self.folder / name
            os.replace(shard.path, final)
            files[name] = {"sha256": sha256, "size": final.stat().st_size}
        if count > 1:
            index = {
                "metadata": {"total_size": sum(s.data_size for s in self._shards)},
                "weight_map": {key: names[i] for key, i in sorted(self._weight_map.items())},
            }
            index_path = self.folder / "model.safetensors.index.json"
            index_path.write_text(json.dumps(index, indent=2) + "\n")
            files[index_path.name] = {"sha256": sha256_file(index_path), "size": index_path.stat().st_size}
        return files
