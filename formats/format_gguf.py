"""GGUF: one ``.gguf`` file that llama.cpp (and so Ollama, LM Studio, llama-cpp-python) loads.

Unlike the other methods, a GGUF artifact is not a Hugging Face folder of safetensors: the
folder holds ``NAME-TYPE.gguf`` (or its ``-0000i-of-0000n.gguf`` parts, split as llama.cpp's
gguf-split splits them) beside qconv's manifest and model card. Every tensor is in it, renamed
to llama.cpp's names and transformed as llama.cpp's converter does (``gguf_metadata.py``), with
the type llama.cpp's own quantizer would give it for the chosen file type (``gguf_mix.py``).
The numbers come from one of two solvers, in the very same bytes per block:

- ``llama``: llama.cpp's reference quantizers (ggml-quants.c, no importance matrix), byte for
  byte for the legacy types, as close as float arithmetic allows for the k-quants;
- ``qconv`` (default): a search of each block's scale (and min) that keeps, block by block,
  whichever of its candidates and llama.cpp's own choice has the lower error, so it is never
  worse than llama.cpp on any block (``gguf_quants.py``, ``gguf_kquants.py``).

With ``--calibration FILE|wikitext2`` the Linears of the decoder blocks are quantized by GPTQ
into the same bytes instead (``gguf_calibrated.py``, ``gguf_gptq.py``); the token embeddings
and the output head stay with the data-free solver.

The conversion itself is :mod:`qconv.gguf_export` (the pipeline hands GGUF methods to it).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from qconv.errors import ArtifactError, SourceError, UsageError
from qconv.formats import gguf_calibrated, gguf_kquants, gguf_quants, uniform_calibrated
from qconv.formats.base import Option, PrepareContext, Prepared, QuantFormat, check_choice, register
from qconv.formats.gguf_mix import FILE_TYPES

DEFAULT_TYPE = "Q4_K_M"
SOLVERS = ("qconv", "llama")
#: every GGML type qconv writes, with its quantizer ``(weight float32 [rows, n], solver) -> uint8``
QUANTIZERS = {**gguf_quants.QUANTIZERS, **gguf_kquants.QUANTIZERS}
#: the types stored as plain floats (no block scale: nothing for a solver to choose)
FLOAT_TYPES = ("F32", "F16", "BF16")


class GGUFFormat(QuantFormat):
    #: the artifact is a .gguf file written by qconv.gguf_export, not safetensors shards
    container: ClassVar[str] = "gguf"

    def __init__(self) -> None:
        super().__init__(
            name="gguf",
            description="GGUF for llama.cpp (Ollama, LM Studio, llama-cpp-python), llama.cpp's type mixes",
            libraries=("gguf", "llama-cpp-python"),
            quant_method="gguf",
            stock_loader="llama.cpp",
            extra="llama",
            options=(
                Option(
                    "type",
                    str,
                    f"gguf: llama.cpp's file type, {', '.join(FILE_TYPES)} (default {DEFAULT_TYPE})",
                    default=DEFAULT_TYPE,
                ),
                Option(
                    "solver",
                    str,
                    "gguf: 'qconv' (default: each block's scale searched, never worse than llama.cpp's) "
                    "or 'llama' (llama.cpp's own reference quantization)",
                    default="qconv",
                ),
                *uniform_calibrated.calibration_options("gguf"),
            ),
        )

    def make_recipe(self, options: dict[str, Any]) -> dict[str, Any]:
        given = self.given_options(options)
        file_type = str(given["type"]).upper()
        check_choice(self, "type", file_type, tuple(FILE_TYPES))
        check_choice(self, "solver", given["solver"], SOLVERS)
        calibration = uniform_calibrated.calibration_recipe(given)
        recipe = {
            "method": self.name,
            "type": file_type,
            "solver": given["solver"],
            "file_type": FILE_TYPES[file_type].ftype,
        }
        if calibration is None:
            return recipe
        if file_type in FLOAT_TYPES:
            raise UsageError(
                "{method}: --calibration does not apply to {value}: its weights are stored as floats, "
                "no block to fit",
                value=file_type,
                method=self.name,
            )
        if given["solver"] != "qconv":
            raise UsageError(
                "{method}: {option} {value} is data-free; with --calibration the block Linears' solver "
                "is GPTQ",
                option="solver",
                value=given["solver"],
                method=self.name,
            )
        # "solver" stays the data-free one, for the tensors outside the blocks (embeddings, head)
        recipe.update(calibration=calibration, gptq=gguf_calibrated.solver_settings())
        return recipe

    def label(self, recipe: dict) -> str:
        solver = "" if recipe.get("solver", "qconv") == "qconv" else f" ({recipe['solver']} solver)"
        calibrated = " gptq" if recipe.get("calibration") else ""
        return f"gguf {recipe['type']}{solver}{calibrated}"

    def prepare(self, context: PrepareContext) -> Prepared | None:
        if not context.recipe.get("calibration"):
            return None
        return gguf_calibrated.prepare(context, self)

    def quantize_as(self, weight: torch.Tensor, ggml_type: str, solver: str) -> torch.Tensor:
        """The GGUF bytes of one float32 ``[rows, n]`` tensor in ``ggml_type``: uint8 ``[rows,
        bytes per row]`` on the weight's device. NaN or infinite values: a broken source."""
        if not torch.isfinite(weight).all():
            raise SourceError("the tensor has NaN or infinite values")
        try:
            quantize = QUANTIZERS[ggml_type]
        except KeyError:
            raise SourceError(f"GGML type {ggml_type} is not one qconv writes") from None
        return quantize(weight.to(torch.float32), solver)

    def dequantize_bytes(self, data: np.ndarray, ggml_type: str) -> np.ndarray:
        """float32 values of stored GGUF bytes, by the ``gguf`` package's own dequantizer
        (llama.cpp's Python package: independent of qconv's quantizers)."""
        import gguf

        return gguf.quants.dequantize(data, gguf.GGMLQuantizationType[ggml_type]).astype(np.float32)

    def load_pretrained(self, folder, device: torch.device, dtype: torch.dtype):
        """``qconv.load_model`` of a GGUF artifact: transformers' own GGUF loader, every weight
        dequantized into ``dtype`` (llama.cpp is the loader users run; this is for Python work
        on the same weights). A split file is llama.cpp's to read: transformers reads one file."""
        from pathlib import Path

        from transformers import AutoModelForCausalLM  # heavy: only loading needs it

        files = sorted(p.name for p in Path(folder).glob("*.gguf"))
        if len(files) != 1:
            raise ArtifactError(
                f"{folder}: {len(files)} .gguf files; transformers reads one unsplit GGUF (llama.cpp "
                "reads a split one from its first part)"
            )
        return AutoModelForCausalLM.from_pretrained(
            str(folder), gguf_file=files[0], dtype=dtype, device_map=str(device)
        )

    def loader_tolerance(self, recipe: dict) -> float:
        # llama.cpp's CPU matmuls quantize each activation row to 8 bits (Q8_0 / Q8_K blocks)
        # before the dot product with a quantized weight, and accumulate in its own order; the
        # reference multiplies the dequantized weights in float32. Measured on SmolLM2 and the
        # tiny test models (tests/test_gguf.py): see LOADER_TOLERANCE's comment.
        return LOADER_TOLERANCE.get(recipe.get("type", ""), 0.05)


#: largest relative logits difference between llama.cpp and qconv's float32 reference of the
#: same bytes. F32/F16/BF16 are float matmuls (F16/BF16 weights meet F16/BF16-rounded
#: activations in ggml's CPU kernels); every quantized type meets 8-bit activations.
LOADER_TOLERANCE = {"F16": 0.01, "BF16": 0.02}

register(GGUFFormat())
