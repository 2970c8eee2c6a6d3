"""What every source reader offers (:class:`Source`, :class:`TensorInfo`, :class:`PackedLayer`),
the sha256 of a file fed by its reader, and the helpers for a model folder's config, support
files and safetensors headers."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qconv.errors import SourceError
from qconv.files import FLOAT_DTYPES, SAFETENSORS_DTYPES, hash_file
from qconv.fingerprints import remember, taken_before_hashing
from qconv.manifest import MANIFEST_NAME, BaseModelEntry, hub_cache_repo

# Files in a model folder that are weights in some other framework or ours to rewrite.
# Files in a model folder that are weights in some other framework or ours to rewrite.
NOT_SUPPORT_FILES = {"config.json", MANIFEST_NAME, "README.md", "model.safetensors.index.json"}
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


class SequentialFileHash:
    """sha256 of a file fed with its bytes in file order as a reader reads them, so the file is
    read once for both. Updates run in their own thread (hashlib releases the GIL) and at most
    ``max_pending`` buffers wait, which bounds the memory a slow hash can hold. A read out of
    order spoils it, and the file is then hashed from disk instead."""

    def __init__(self, path: Path, prefix_len: int, max_pending: int = 8):
        self.path = path
        self._digest = hashlib.sha256()
        with open(path, "rb") as f:
            self._digest.update(f.read(prefix_len))
        self._next = prefix_len
        self._size = path.stat().st_size
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qconv-hash")
        self._slots = threading.Semaphore(max_pending)
        self.spoiled = False

    def feed(self, offset: int, data) -> None:
        if self.spoiled or offset != self._next:
            self.spoiled = True
            return
        self._next = offset + len(data)
        self._slots.acquire()
        self._pool.submit(self._update, data)

    def _update(self, data) -> None:
        try:
            self._digest.update(data)
        finally:
            self._slots.release()

    def result(self) -> dict | None:
        """The hash, or None when the bytes did not all arrive in order."""
        self._pool.shutdown(wait=True)
        if self.spoiled or self._next != self._size:
            return None
        return {"sha256": self._digest.hexdigest(), "size": self._size}


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


@dataclass(frozen=True)
class PackedLayer:
    """A Linear a source holds quantized already: written as it is, never re-quantized."""

    shape: tuple[int, int]  # the Linear's [out, in]
    label: str  # its format, for the manifest's layer entry
    where: str  # the file and the layer, to prefix a complaint about it


class Source:
    """What every reader offers. ``kind`` is ``hf``, ``gguf`` or (later) ``hub``.

    A source another tool quantized already (``imported_from`` set, e.g. ``hqq-qmodel.pt``)
    lists each quantized Linear as ``<module>.weight`` in ``tensors()`` and describes it in
    ``packed_layers()``; the pipeline takes its stored tensors from ``packed()`` instead of
    reading and quantizing the weight, and its recipe from ``imported_recipe()``."""

    kind: str = ""
    ref: str = ""
    revision: str | None = None
    license: str | None = None  # from the model card's front matter, when it has one
    #: the form of a model quantized already, recorded as the recipe's ``imported_from``
    imported_from: str | None = None

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

    def base_model(self) -> BaseModelEntry | None:
        """The Hub model this source is, when the source says so (None otherwise): a folder of
        the Hugging Face cache (``models--ORG--NAME/snapshots/<commit>``), or a file in one, is
        that repo at that commit. Readers that know more (a Hub repo, GGUF metadata) override it."""
        path = Path(self.ref)
        cached = hub_cache_repo(path.parent if path.is_file() else path)
        if cached is None:
            return None
        return {"repo_id": cached[0], "revision": cached[1], "origin": "hub-cache"}

    def read(self, name: str, pin_memory: bool = False) -> torch.Tensor:
        """One tensor, on the CPU (in page-locked memory when ``pin_memory`` and the reader can)."""
        raise NotImplementedError

    def location(self, name: str) -> str:
        """Where tensor ``name`` lies (its file), to name in a complaint."""
        return self.ref

    # -- a model quantized already ----------------------------------------------------------------
    def packed_layers(self) -> dict[str, PackedLayer]:
        """The Linear modules stored quantized already, by module name (none for a float model)."""
        return {}

    def packed_specs(self, module: str, dtype: str) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """``{suffix: (dtype, shape)}`` of what ``packed(module, dtype)`` returns, in its order."""
        raise NotImplementedError

    def packed(self, module: str, dtype: str) -> dict[str, torch.Tensor]:
        """A packed layer's tensors by suffix, as the artifact stores them (``dtype``: the
        artifact's working dtype name)."""
        raise NotImplementedError

    def imported_recipe(self, dtype: str) -> dict[str, Any]:
        """The recipe a model quantized already was made with, ``dtype`` its working dtype name."""
        raise NotImplementedError

    def hashed_files(self) -> list[Path]:
        """Files whose sha256 the manifest records (weights, config, tokenizer)."""
        raise NotImplementedError

    def start_hashing(self) -> None:
        """Begin hashing ``hashed_files()`` in the background (one thread a file, so a sharded
        source hashes in parallel). Readers that see every byte anyway override this to hash
        what they read instead of reading it twice."""
        if getattr(self, "_hashes", None) is None:
            files = self.hashed_files()
            self._stat_before_hashing = taken_before_hashing(files)
            self._hash_pool = ThreadPoolExecutor(
                max_workers=max(1, min(8, len(files))), thread_name_prefix="qconv-hash"
            )
            self._hashes = {p.name: self._hash_pool.submit(hash_file, p) for p in files}

    def file_hashes(self) -> dict[str, dict]:
        """``{file name: {"sha256", "size"}}`` of ``hashed_files()``, waiting for the hashing."""
        self.start_hashing()
        result = {name: future.result() for name, future in self._hashes.items()}
        self._hash_pool.shutdown()
        remember(self._stat_before_hashing, result)  # for release --dry-run (qconv.fingerprints)
        return result

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


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """Parse and check a safetensors header without reading the data (names the file on error).
    Returns the header and the byte where the data starts."""
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
    return header, 8 + header_len


def read_folder_config(folder: Path) -> dict[str, Any]:
    """A model folder's ``config.json``, as a dict (SourceError naming the file otherwise)."""
    path = folder / "config.json"
    if not path.is_file():
        raise SourceError(f"{folder}: no config.json (not a Hugging Face model folder)")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"{path}: not valid JSON") from exc
    if not isinstance(config, dict):
        raise SourceError(f"{path}: not a JSON object")
    return config


def support_file_names(folder: Path) -> list[str]:
    """Tokenizer and generation files beside the weights, carried into the artifact."""
    return sorted(
        p.name
        for p in folder.iterdir()
        if p.is_file()
        and p.name not in NOT_SUPPORT_FILES
        and not p.name.endswith(WEIGHT_SUFFIXES)
        and not p.name.startswith(".")
    )


def copy_support_files(folder: Path, dest: Path) -> list[str]:
    """Copy ``support_file_names(folder)`` into ``dest``; returns the names."""
    names = support_file_names(folder)
    for name in names:
        shutil.copyfile(folder / name, dest / name)
    return names


def read_card_license(readme: Path) -> str | None:
    """``license:`` from a model card's YAML front matter (None when absent or unreadable)."""
    try:
        text = readme.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    if not text.startswith("---"):
        return None
    for line in text.split("\n---", 1)[0].splitlines()[1:]:
        key, _, value = line.partition(":")
        if key.strip() == "license" and value.strip():
            return value.strip().strip("'\"")
    return None
