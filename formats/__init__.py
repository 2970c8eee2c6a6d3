"""Quantization methods, one module each, registered by name (see ``base.py``).

To add a method: write ``format_<name>.py`` with a :class:`~qconv.formats.base.QuantFormat`
subclass, call ``register`` at import, add the import below, and add its tests (README.md,
"Adding a method").
"""

from qconv.formats import (
    format_aqlm,  # noqa: F401  (registers "aqlm")
    format_bnb,  # noqa: F401  (registers "bnb")
    format_compressed_tensors,  # noqa: F401  (registers "compressed-tensors")
    format_eetq,  # noqa: F401  (registers "eetq")
    format_gguf,  # noqa: F401  (registers "gguf")
    format_hqq,  # noqa: F401  (registers "hqq")
)
from qconv.formats.base import (
    Option,
    QuantFormat,
    all_formats,
    all_options,
    format_of_quant_method,
    get_format,
    register,
)

__all__ = [
    "Option",
    "QuantFormat",
    "all_formats",
    "all_options",
    "format_of_quant_method",
    "get_format",
    "register",
]
