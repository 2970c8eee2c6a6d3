"""Source readers: a model's tensors, one at a time, plus its config and tokenizer files.

:func:`open_source` picks the reader: a Hugging Face folder (``hf_folder``: single or sharded
safetensors), the same quantized with HQQ already (``hqq``: its layers arrive packed), a ``.gguf``
file (``gguf``) or a Hub repo (``hub``: downloaded into the Hugging Face cache, then read as a
folder). Every reader yields tensors under Hugging Face names, in the order they lie on disk, so
reading stays sequential and memory stays at one tensor. :mod:`qconv.sources.base` says what a
reader offers.
"""

from __future__ import annotations

from pathlib import Path

from qconv.errors import SourceError, SourceNotFoundError
from qconv.sources.base import (
    MAX_HEADER_BYTES,
    NOT_SUPPORT_FILES,
    WEIGHT_SUFFIXES,
    PackedLayer,
    SequentialFileHash,
    Source,
    TensorInfo,
    copy_support_files,
    read_card_license,
    read_folder_config,
    read_safetensors_header,
    support_file_names,
)
from qconv.sources.gguf import GGUFSource
from qconv.sources.hf_folder import HFFolderSource
from qconv.sources.hqq import HQQSource, hqq_form, imported_method
from qconv.sources.hub import HubSource, parse_hub_ref


def open_source(ref: str | Path) -> Source:
    """Open a source by reference: a model folder (float, or quantized with HQQ already), a
    ``.gguf`` file, or a Hub repo ``ORG/NAME[@REVISION]`` (when no such path exists here)."""
    path = Path(ref).expanduser()
    if not path.exists():
        hub_ref = parse_hub_ref(str(ref))
        if hub_ref is not None:
            return HubSource(*hub_ref)
    if path.is_dir():
        form = hqq_form(path)
        return HQQSource(path, form) if form is not None else HFFolderSource(path)
    if path.is_file():
        if path.suffix == ".gguf":
            return GGUFSource(path)
        raise SourceError(f"{path}: not a model folder or a .gguf file")
    raise SourceNotFoundError(f"{ref}: no such file or folder")


__all__ = [
    "MAX_HEADER_BYTES",
    "NOT_SUPPORT_FILES",
    "WEIGHT_SUFFIXES",
    "GGUFSource",
    "HFFolderSource",
    "HQQSource",
    "HubSource",
    "PackedLayer",
    "SequentialFileHash",
    "Source",
    "TensorInfo",
    "copy_support_files",
    "hqq_form",
    "imported_method",
    "open_source",
    "parse_hub_ref",
    "read_card_license",
    "read_folder_config",
    "read_safetensors_header",
    "support_file_names",
]
