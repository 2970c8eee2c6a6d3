"""AQLM's bytes: how the solver's codes, codebooks and scales are stored in an artifact (aqlm's
``QuantizedLinear`` tensors) and read back, and the pure-torch dequantization of what is stored.

The numbers come from ``aqlm_solver.py`` (a :class:`LayerCodes`); this module never chooses them.
"""

from __future__ import annotations

import torch

from qconv.errors import ArtifactError
from qconv.formats.aqlm_solver import LayerCodes

OUT_GROUP_SIZE = 1


def codes_dtype(nbits: int) -> torch.dtype:
    return torch.int8 if nbits <= 8 else torch.int16


def wrap_codes(indices: torch.Tensor, nbits: int) -> torch.Tensor:
    """Unsigned indices -> the signed storage aqlm expects (aqlm.utils.pack_int_data)."""
    wrapped = indices.to(torch.int64)
    wrapped = torch.where(wrapped >= 2 ** (nbits - 1), wrapped - 2**nbits, wrapped)
    return wrapped.to(codes_dtype(nbits))


def unwrap_codes(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    return codes.to(torch.int64) % (2**nbits)


def stored_tensors(state: LayerCodes, nbits: int) -> dict[str, torch.Tensor]:
    """The solver's state (unsigned codes, ``[books, size, g]`` codebooks, ``[out]`` scales) as
    the artifact stores it: wrapped codes, float16 codebooks and scales in aqlm's shapes."""
    num_codebooks, size, group = state.codebooks.shape
    return {
        "codes": wrap_codes(state.codes, nbits),
        "codebooks": state.codebooks.half().reshape(num_codebooks, size, OUT_GROUP_SIZE, group),
        "scales": state.scales.half().reshape(-1, 1, 1, 1),
    }


def solver_state(tensors: dict[str, torch.Tensor], nbits: int) -> LayerCodes:
    """The inverse of :func:`stored_tensors` (float32 codebooks and scales)."""
    books = tensors["codebooks"].float()
    return LayerCodes(
        unwrap_codes(tensors["codes"], nbits),
        books.reshape(books.shape[0], books.shape[1], -1),
        tensors["scales"].float().reshape(-1),
    )


def dequantize_layer(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Pure torch: ``scales[o] * sum_c codebooks[c, codes[o, g, c]]`` laid out as ``[out, in]``."""
    if codes.dim() != 3 or codebooks.dim() != 4 or scales.dim() != 4:
        raise ArtifactError(
            f"codes {list(codes.shape)}, codebooks {list(codebooks.shape)} and scales {list(scales.shape)} "
            "are not AQLM's 3-D / 4-D / 4-D tensors"
        )
    num_codebooks, size, out_group, in_group = codebooks.shape
    out_groups, in_groups, codes_books = codes.shape
    nbits = size.bit_length() - 1
    if 2**nbits != size or codes_books != num_codebooks or scales.shape[0] != out_groups:
        raise ArtifactError(
            f"codes {list(codes.shape)}, codebooks {list(codebooks.shape)} and scales "
            f"{list(scales.shape)} do not fit together"
        )
    index = unwrap_codes(codes, nbits)  # [out_groups, in_groups, num_codebooks]
    books = codebooks.to(torch.float32)
    parts = books[torch.arange(num_codebooks, device=index.device), index]  # [og, ig, nc, out_g, in_g]
    blocks = parts.sum(2) * scales.to(torch.float32).reshape(out_groups, 1, 1, 1)  # [og, ig, out_g, in_g]
    return blocks.permute(0, 2, 1, 3).reshape(out_groups * out_group, in_groups * in_group)
