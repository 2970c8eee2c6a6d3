"""Streaming safetensors shard writer.

Tensors go to disk as they arrive, so converting holds a few tensors in memory whatever the model
size. A safetensors file starts with a header that lists every tensor's offset, and its sha256
(the Hub's LFS oid) must be computed from the first byte on. So the layout is planned before the
first byte: every tensor whose dtype and shape the method can tell in advance is assigned to a
shard, each shard's header is written first, and each shard is hashed and flushed to disk while
it is written, overlapped with the reading of the next tensors. The few tensors whose size is only
known after quantizing (bitsandbytes' JSON quant_state) are kept in memory and go into one small
last shard. Shards are written under temporary names in the caller's temporary folder and renamed
to ``model-0000i-of-0000n.safetensors`` (or ``model.safetensors``) at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import struct
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from qconv.files import TORCH_TO_SAFETENSORS, sha256_file

FLUSH_EVERY = 512 * 2**20  # start writeback this often, so the disk writes while we still read


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's raw little-endian bytes, without copying a contiguous CPU tensor."""
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor the writer will receive: its dtype and shape when known before quantizing."""

    name: str
    dtype: torch.dtype | None = None
    shape: tuple[int, ...] | None = None

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=self.dtype).element_size()
        for d in self.shape:
            n *= d
        return n


def safetensors_header(entries: list[tuple[str, torch.dtype, tuple[int, ...], int]]) -> bytes:
    """The 8-byte length and the JSON header for ``(name, dtype, shape, nbytes)`` in data order,
    padded with spaces so that the data starts 8-byte aligned, as safetensors itself aligns it."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {
            "dtype": TORCH_TO_SAFETENSORS[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw


class _ShardFile:
    """One shard being written: header first, then data in order; hashed as written (in a thread
    of its own, at most a few buffers behind) and flushed to disk every FLUSH_EVERY bytes."""

    def __init__(self, path: Path, header: bytes, pool: ThreadPoolExecutor):
        self.path = path
        self.file = open(path, "wb")
        self._digest = hashlib.sha256()
        self._hashing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qconv-hash")
        self._slots = threading.Semaphore(8)
        self._pool = pool
        self._flushes: list[Future] = []
        self._unflushed = 0
        self.size = 0
        self.write(header)

    def write(self, data) -> None:
        self.file.write(data)
        self.size += len(data)
        self._slots.acquire()
        self._hashing.submit(self._update, data)
        self._unflushed += len(data)
        if self._unflushed >= FLUSH_EVERY:
            self.file.flush()
            self._flushes.append(self._pool.submit(os.fdatasync, self.file.fileno()))
            self._unflushed = 0

    def _update(self, data) -> None:
        try:
            self._digest.update(data)
        finally:
            self._slots.release()

    def close(self) -> Future:
        """Finish in the background: the last flush and the hash; the future gives the sha256."""
        self.file.flush()

        def finish() -> str:
            for flushed in self._flushes:
                flushed.result()
            os.fsync(self.file.fileno())
            self.file.close()
            self._hashing.shutdown(wait=True)
            return self._digest.hexdigest()

        return self._pool.submit(finish)


class SafetensorsShardWriter:
    """Write the planned tensors into shards of at most ``max_shard_bytes``, in a background thread.

    ``planned`` lists every tensor in the order ``add`` will receive them. ``add`` hands a tensor
    to the writer thread and returns at once (the queue is bounded, so a slow disk slows the
    producer instead of filling memory). ``close`` returns ``{file name: {"sha256", "size"}}``
    for the shards and the index (written when there are several shards).
    """

    def __init__(
        self,
        folder: Path,
        planned: list[PlannedTensor],
        max_shard_bytes: int,
        queue_size: int = 4,
        on_written=None,
    ):
        self.folder = folder
        self._on_written = on_written  # called with the byte count of each tensor written
        self._expected: dict[str, PlannedTensor] = {p.name: p for p in planned}
        if len(self._expected) != len(planned):
            raise ValueError("planned tensor names repeat")
        # Shards of the tensors known in advance, in arrival order; the rest go last.
        self._layout: list[list[PlannedTensor]] = []
        size = 0
        for p in planned:
            if p.dtype is None:
                continue
            if not self._layout or (self._layout[-1] and p.nbytes and size + p.nbytes > max_shard_bytes):
                self._layout.append([])
                size = 0
            self._layout[-1].append(p)
            size += p.nbytes
        self._late = [p.name for p in planned if p.dtype is None]
        count = len(self._layout) + (1 if self._late else 0)
        self.file_names = (
            ["model.safetensors"]
            if count == 1
            else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        self._order = [p.name for shard in self._layout for p in shard]
        self._shard_of = {p.name: i for i, shard in enumerate(self._layout) for p in shard}
        self._late_tensors: dict[str, torch.Tensor] = {}
        self._received = 0
        self._current: _ShardFile | None = None
        self._finished: list[tuple[_ShardFile, Future]] = []
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="qconv-flush")
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
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
        if self._error is None and (
            self._received != len(self._order) or len(self._late_tensors) != len(self._late)
        ):
            self._error = RuntimeError("the writer did not receive every planned tensor")
        if self._error is not None:
            self._abort_files()
            raise self._error
        return self._finish_files()

    def abort(self) -> None:
        """Stop the thread after a failure elsewhere; the caller removes the folder."""
        self._queue.put(None)
        self._thread.join()
        self._abort_files()

    # -- writer thread ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while (item := self._queue.get()) is not None:
                name, tensor, ready = item
                if ready is not None:
                    ready.synchronize()
                self._write(name, tensor)
        except BaseException as exc:  # re-raised in the producer thread
            self._error = exc
            while self._queue.get() is not None:  # drain so that a blocked producer wakes up
                pass

    def _write(self, name: str, tensor: torch.Tensor) -> None:
        planned = self._expected.get(name)
        if planned is None:
            raise RuntimeError(f"tensor {name!r} was not planned")
        nbytes = tensor.numel() * tensor.element_size()
        self.bytes_written += nbytes
        if self._on_written is not None:
            self._on_written(nbytes)
        if planned.dtype is None:
            self._late_tensors[name] = tensor
            return
        if tensor.dtype != planned.dtype or tuple(tensor.shape) != tuple(planned.shape):
            raise RuntimeError(
                f"tensor {name!r} is {tensor.dtype} {list(tensor.shape)}, planned {planned.dtype} {list(planned.shape)}"
            )
        if self._order[self._received] != name:
            raise RuntimeError(
                f"tensor {name!r} arrived out of order (expected {self._order[self._received]!r})"
            )
        index = self._shard_of[name]
        if self._current is None:
            shard = self._layout[index]
            header = safetensors_header([(p.name, p.dtype, p.shape, p.nbytes) for p in shard])
            self._current = _ShardFile(self.folder / f".shard-{index + 1:05d}.tmp", header, self._pool)
        self._current.write(tensor_bytes(tensor))
        self._received += 1
        if self._received == len(self._order) or self._shard_of[self._order[self._received]] != index:
            self._finished.append((self._current, self._current.close()))
            self._current = None

    # -- at close -----------------------------------------------------------------------------
    def _finish_files(self) -> dict[str, dict]:
        shards = list(self._finished)
        weight_map = {name: self.file_names[i] for name, i in self._shard_of.items()}
        if self._late:
            tensors = [(n, self._late_tensors[n]) for n in self._late]
            header = safetensors_header(
                [(n, t.dtype, tuple(t.shape), t.numel() * t.element_size()) for n, t in tensors]
            )
            last = _ShardFile(self.folder / ".shard-late.tmp", header, self._pool)
            for _, tensor in tensors:
                last.write(tensor_bytes(tensor))
            shards.append((last, last.close()))
            weight_map.update({n: self.file_names[-1] for n in self._late})
        files: dict[str, dict] = {}
        for (shard, digest), name in zip(shards, self.file_names, strict=True):
            sha256 = digest.result()
            os.replace(shard.path, self.folder / name)
            files[name] = {"sha256": sha256, "size": shard.size}
        self._pool.shutdown(wait=True)
        if len(self.file_names) > 1:
            index = {
                "metadata": {"total_size": self.bytes_written},
                "weight_map": dict(sorted(weight_map.items())),
            }
            index_path = self.folder / "model.safetensors.index.json"
            index_path.write_text(json.dumps(index, indent=2) + "\n")
            files[index_path.name] = {"sha256": sha256_file(index_path), "size": index_path.stat().st_size}
        return files

    def _abort_files(self) -> None:
        if self._current is not None:
            self._current.file.close()
        for _, future in self._finished:
            try:
                future.result()
            except Exception:  # noqa: BLE001 - the folder is being removed anyway
                pass
        self._pool.shutdown(wait=True)
