"""llama.cpp's own quantizer, for tests: ggml's ``ggml_quantize_chunk`` from the libggml that
llama-cpp-python installs (the library llama.cpp's ``llama_model_quantize`` calls per tensor).

Tests compare qconv's GGUF bytes with what this returns for the same float32 rows. It is a
reference, never used by qconv itself. ``available()`` is False without the ``llama`` extra;
tests that need it skip with :data:`MISSING` (``make test`` installs the extra, so there they run).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
from pathlib import Path

import numpy as np

MISSING = "needs llama-cpp-python (pip install -e '.[llama]'; make test installs it)"


def _lib_folder() -> Path | None:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "lib"
    return folder if folder.is_dir() else None


def available() -> bool:
    return _lib_folder() is not None


@functools.cache
def _ggml() -> ctypes.CDLL:
    folder = _lib_folder()
    if folder is None:
        raise RuntimeError(MISSING)
    # ggml_quantize_chunk lives in ggml-base; load the CPU backend too, as llama does, so that
    # every symbol the base library resolves at first use is there
    for name in sorted(folder.glob("libggml*.so*")):
        ctypes.CDLL(str(name), mode=ctypes.RTLD_GLOBAL)
    candidates = sorted(folder.glob("libggml-base.so*")) or sorted(folder.glob("libggml.so*"))
    lib = ctypes.CDLL(str(candidates[0]), mode=ctypes.RTLD_GLOBAL)
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,  # enum ggml_type
        ctypes.c_void_p,  # const float * src
        ctypes.c_void_p,  # void * dst
        ctypes.c_int64,  # start (element index of the first row)
        ctypes.c_int64,  # nrows
        ctypes.c_int64,  # n_per_row
        ctypes.c_void_p,  # const float * imatrix (NULL: none)
    ]
    return lib


def ggml_quantize(rows: np.ndarray, type_name: str, imatrix: np.ndarray | None = None) -> np.ndarray:
    """llama.cpp's bytes for float32 ``rows`` [nrows, n_per_row] in GGML type ``type_name``
    (``"Q4_K"``): uint8 [nrows, bytes per row]. ``imatrix``: per-column importance (n_per_row)."""
    import gguf  # the type numbers and block sizes, as llama.cpp's own Python package states them

    qtype = gguf.GGMLQuantizationType[type_name]
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    nrows, n_per_row = rows.shape
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if n_per_row % block:
        raise ValueError(f"{type_name}: rows of {n_per_row} are not a multiple of its block of {block}")
    out = np.zeros((nrows, n_per_row // block * type_size), dtype=np.uint8)
    weights = None
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        weights = imatrix.ctypes.data
    written = _ggml().ggml_quantize_chunk(
        int(qtype), rows.ctypes.data, out.ctypes.data, 0, nrows, n_per_row, weights
    )
    if written != out.size:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {out.size}")
    return out


def llama_model_quantize(source, dest, file_type: int, nthread: int = 2) -> None:
    """llama.cpp's own whole-file quantizer (``llama-quantize``), default parameters but the file
    type (``general.file_type`` number, gguf_mix.FILE_TYPES[...].ftype)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = file_type
    params.nthread = nthread
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(dest).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc}) on {source}")


def tensors_of(path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """Every tensor of a GGUF file: name -> (GGML type name, shape as GGUF lists it, data bytes)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {
        t.name: (t.tensor_type.name, tuple(int(d) for d in t.shape), bytes(np.asarray(t.data).tobytes()))
        for t in reader.tensors
    }
