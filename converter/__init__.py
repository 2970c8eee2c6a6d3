"""qconv: convert a language model into verified, recorded, shippable quantized artifacts."""

from qconv.version import __version__


def load_model(path, device: str = "auto", dtype=None):
    """Load a qconv artifact as a runnable transformers model (see :mod:`qconv.loader`)."""
    from qconv.loader import load_model as load

    return load(path, device=device, dtype=dtype)


__all__ = ["__version__", "load_model"]
