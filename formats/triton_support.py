"""Whether the fused GPU kernels can run: they are written in Triton, which only GPU machines have.

Solvers (aqlm_solver.py, hqq_solver.py) take their Triton path on CUDA tensors when this says so
and fall back to plain torch otherwise; the CPU paths never need it.
"""

from __future__ import annotations

import functools


@functools.cache
def triton_available() -> bool:
    """Whether Triton can be imported (checked once)."""
    try:
        import triton  # noqa: F401  (optional: only GPU installs have it)
    except ImportError:
        return False
    return True
