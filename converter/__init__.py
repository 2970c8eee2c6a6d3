"""qconv: convert a language model into verified, recorded, shippable quantized artifacts.

The library surface is :class:`qconv.Qconv` (``from qconv import Qconv``, see :mod:`qconv.api`).
``qconv.convert``, ``qconv.verify``, ``qconv.evaluate``, ``qconv.push``, ``qconv.release``,
``qconv.load_model`` and ``qconv.open_registry`` call the methods of one default instance
(``$QCONV_HOME``, device auto), made on first use.

Three of those names are also modules (``qconv/verify.py``, ``evaluate.py``, ``release.py``): the
package attribute stays the function, the module is imported by its full name
(``from qconv.verify import run_verify``; ``import qconv.verify as x`` would give the function).
"""

from __future__ import annotations

import sys
import types

from qconv.version import __version__

ALIASES = ("convert", "verify", "evaluate", "push", "release", "load_model", "open_registry")
_default = None


def default_api():
    """The :class:`Qconv` behind the module-level functions."""
    global _default
    if _default is None:
        # qconv.api pulls in torch and transformers; `import qconv` stays light, and qconv.cli can
        # set their logging environment before they are imported
        from qconv.api import Qconv as api_class

        _default = api_class()
    return _default


def convert(source, output, method=None, options=None, **kwargs):
    """:meth:`Qconv.convert` of the default instance."""
    return default_api().convert(source, output, method, options, **kwargs)


def verify(ref, **kwargs):
    """:meth:`Qconv.verify` of the default instance."""
    return default_api().verify(ref, **kwargs)


def evaluate(ref, **kwargs):
    """:meth:`Qconv.evaluate` of the default instance."""
    return default_api().evaluate(ref, **kwargs)


def push(ref, repo, **kwargs):
    """:meth:`Qconv.push` of the default instance."""
    return default_api().push(ref, repo, **kwargs)


def release(plan, **kwargs):
    """:meth:`Qconv.release` of the default instance."""
    return default_api().release(plan, **kwargs)


def load_model(ref, device: str | None = None, dtype=None):
    """Load an artifact (id, id prefix or folder) as a runnable transformers model:
    :meth:`Qconv.load_model` of the default instance (see :mod:`qconv.loader`)."""
    return default_api().load_model(ref, device=device, dtype=dtype)


def open_registry():
    """:meth:`Qconv.open_registry` of the default instance: a connection for the caller to close."""
    return default_api().open_registry()


def __getattr__(name: str):
    if name == "Qconv":  # imported on first use, for the reason default_api gives
        from qconv.api import Qconv as api_class

        return api_class
    raise AttributeError(f"module 'qconv' has no attribute {name!r}")


class _Package(types.ModuleType):
    """The import system binds each submodule on its package once it is loaded; for the names
    that are both a module and a function above, the function keeps the name."""

    def __setattr__(self, name: str, value) -> None:
        if name in ALIASES and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = ["__version__", "Qconv", "default_api", *ALIASES]
