"""llama.cpp through llama-cpp-python: the real loader of GGUF artifacts (verify, eval).

One place opens a model, so that every caller gets the same settings:
- ggml's extra CPU buffer types off: their AMX matrix product crashes (SIGSEGV in
  ``ggml_backend_amx_mul_mat``, llama-cpp-python 0.3.36) on CPUs that report AMX inside some
  virtual machines, as this project's; the ordinary CPU kernels compute the same products
  (the extra types only repack weights for speed);
- a float32 KV cache: llama.cpp's default float16 cache alone moves logits by ~5e-4 relative,
  which would hide in the comparison what the weights do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

MISSING = "llama-cpp-python is not installed (pip install 'qconv[llama]'; it builds llama.cpp from source)"


def version() -> str | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp.__version__


@contextlib.contextmanager
def open_llama(path: str | Path, n_ctx: int = 512, logits_all: bool = True, **kwargs) -> Iterator:
    """A ``llama_cpp.Llama`` over the GGUF at ``path`` (the first part of a split file), closed
    on exit. ImportError with the install hint when llama-cpp-python is missing."""
    try:
        import llama_cpp
        import llama_cpp.llama as llama_module
    except ImportError:
        raise ImportError(MISSING) from None
    api = llama_module.llama_cpp
    defaults = api.llama_model_default_params

    def without_extra_buffer_types():
        params = defaults()
        params.use_extra_bufts = False
        return params

    kwargs.setdefault("type_k", llama_cpp.GGML_TYPE_F32)
    kwargs.setdefault("type_v", llama_cpp.GGML_TYPE_F32)
    api.llama_model_default_params = without_extra_buffer_types
    try:
        llm = llama_module.Llama(
            model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=logits_all, verbose=False, **kwargs
        )
    finally:
        api.llama_model_default_params = defaults
    try:
        yield llm
    finally:
        llm.close()


def logits(llm, ids: list[int]) -> np.ndarray:
    """float32 logits [len(ids), vocab] of one sequence from an empty context."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)
