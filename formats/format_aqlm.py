"""AQLM (additive quantization of language models): 1x16, 2x8, 1x8 codebooks over groups of 8
input weights, in the layout transformers + the aqlm package load (``aqlm.QuantizedLinear``).

Per quantized ``nn.Linear`` (shared/FORMATS.md, transformers' integrations/aqlm.py):

- ``codes``: ``[out / out_group, in / in_group, num_codebooks]``, int16 for 16-bit codebooks and
  int8 for 8-bit ones, holding UNSIGNED indices wrapped into the signed type (index 40000 is
  stored as 40000 - 65536; aqlm.utils.unpack_int_data takes them modulo 2^nbits);
- ``codebooks``: float16 ``[num_codebooks, 2^nbits, out_group, in_group]``;
- ``scales``: float16 ``[out / out_group, 1, 1, 1]``;
- weight row block o, input group g = ``scales[o] * sum_c codebooks[c, codes[o, g, c]]``.

``config.json``'s ``linear_weights_not_to_quantize`` names the embeddings and every Linear left
unquantized twice, as ``X.weight`` and ``X``: transformers matches module names, and aqlm's
published checkpoints list parameter names (with only one of the two the loaded lm_head is
random or NaN: FORMATS.md).

The quantizer here is the first stage of AQLM's algorithm without calibration data (the
activation-aware stages are not built yet, see README): per output row a scale (the row's
norm), then residual k-means over the normalised groups, one codebook after another, and
rounds of re-assigning each codebook's codes given the others (beam width 1) with the
centroids refitted, then a least-squares refit of the scales. It minimises the weight error
(an identity ``X^T X``). Deterministic for a given ``seed``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from qconv.errors import ArtifactError, UsageError
from qconv.formats.base import (
    Option,
    QuantFormat,
    check_choice,
    register,
    reject_foreign_options,
    triton_available,
)

# scheme -> (num_codebooks, nbits_per_codebook): the schemes aqlm has CUDA kernels for
SCHEMES = {"1x16": (1, 16), "2x8": (2, 8), "1x8": (1, 8)}
IN_GROUP_SIZES = (
    8,
)  # aqlm's fast kernels: 1x16 takes 8 or 16 (16 is wrong above 4096 inputs), 2x8/1x8 only 8
OUT_GROUP_SIZE = 1
# aqlm's CUDA kernels silently compute wrong results unless in_features % 64 == 0 (FORMATS.md)
KERNEL_IN_FEATURES_MULTIPLE = 64
KMEANS_ITERS = 10
REFINE_ROUNDS = 2
# distances computed at once in the nearest-codeword search (bounds its memory: 64 MB in fp32
# on the host, 512 MB on a GPU, where bigger matmuls run faster)
SEARCH_CHUNK_ELEMENTS = 1 << 24
SEARCH_CHUNK_ELEMENTS_CUDA = 1 << 27


def codes_dtype(nbits: int) -> torch.dtype:
    return torch.int8 if nbits <= 8 else torch.int16


def wrap_codes(indices: torch.Tensor, nbits: int) -> torch.Tensor:
    """Unsigned indices -> the signed storage aqlm expects (aqlm.utils.pack_int_data)."""
    wrapped = indices.to(torch.int64)
    wrapped = torch.where(wrapped >= 2 ** (nbits - 1), wrapped - 2**nbits, wrapped)
    return wrapped.to(codes_dtype(nbits))


def unwrap_codes(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    return codes.to(torch.int64) % (2**nbits)


# -- search and k-means -------------------------------------------------------------------------
def nearest_codewords(vectors: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codeword (squared Euclidean) for every row of ``vectors``; ties go
    to the lowest index. On CUDA one fused Triton kernel (formats/aqlm_triton.py); elsewhere
    chunked so that the distance matrix never exists whole."""
    if vectors.is_cuda and triton_available():
        from qconv.formats.aqlm_triton import nearest_codewords_fused

        return nearest_codewords_fused(vectors, codebook)
    norms = codebook.square().sum(1)
    budget = SEARCH_CHUNK_ELEMENTS_CUDA if vectors.is_cuda else SEARCH_CHUNK_ELEMENTS
    rows = max(1, budget // codebook.shape[0])
    out = torch.empty(vectors.shape[0], dtype=torch.int64, device=vectors.device)
    for start in range(0, vectors.shape[0], rows):
        part = vectors[start : start + rows]
        distances = torch.addmm(norms[None, :], part, codebook.t(), alpha=-2.0)
        out[start : start + rows] = distances.argmin(1)
    return out


def centroids(vectors: torch.Tensor, assignment: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Mean of the vectors assigned to each codeword; an empty codeword keeps its place."""
    sums = torch.zeros_like(previous).index_add_(0, assignment, vectors)
    counts = torch.bincount(assignment, minlength=previous.shape[0]).to(vectors.dtype)
    return torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], previous)


def kmeans(
    vectors: torch.Tensor, size: int, iters: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with ``size`` centroids, started from distinct random vectors. Returns
    the codebook and each vector's codeword. With no more vectors than centroids every vector
    becomes a codeword of its own (the rest are random repeats): nothing is left to optimise."""
    count = vectors.shape[0]
    order = torch.randperm(count, generator=generator).to(vectors.device)
    if count <= size:
        extra = torch.randint(0, count, (size - count,), generator=generator).to(vectors.device)
        assignment = torch.empty_like(order)
        assignment[order] = torch.arange(count, device=vectors.device)
        return torch.cat([vectors[order], vectors[extra]]), assignment
    codebook = vectors[order[:size]].clone()
    for _ in range(iters):
        codebook = centroids(vectors, nearest_codewords(vectors, codebook), codebook)
    return codebook, nearest_codewords(vectors, codebook)


@torch.inference_mode()
def quantize_weight(weight: torch.Tensor, recipe: dict) -> dict[str, torch.Tensor]:
    """The data-free AQ quantizer (module doc). Returns codes, codebooks and scales as stored."""
    num_codebooks, nbits = recipe["num_codebooks"], recipe["nbits_per_codebook"]
    group = recipe["in_group_size"]
    size = 2**nbits
    out_features, in_features = weight.shape
    w = weight.to(torch.float32)
    norms = torch.linalg.vector_norm(w, dim=1, keepdim=True)
    scales = torch.where(norms > 0, norms / math.sqrt(in_features), torch.ones_like(norms))
    groups = (w / scales).reshape(-1, group)  # [out * in / group, group]
    generator = torch.Generator().manual_seed(int(recipe["seed"]))

    residual = groups.clone()
    codebooks, indices = [], []
    for _ in range(num_codebooks):
        codebook, index = kmeans(residual, size, recipe["kmeans_iters"], generator)
        residual -= codebook[index]
        codebooks.append(codebook)
        indices.append(index)
    for _ in range(recipe["refine_rounds"] if num_codebooks > 1 else 0):
        for c in range(num_codebooks):
            target = residual + codebooks[c][indices[c]]  # what codebook c alone should give
            indices[c] = nearest_codewords(target, codebooks[c])
            codebooks[c] = centroids(target, indices[c], codebooks[c])
            residual = target - codebooks[c][indices[c]]

    books = torch.stack(codebooks).to(torch.float16)  # [num_codebooks, size, group]
    codes = torch.stack(indices, dim=1)  # [out * in / group, num_codebooks]
    decoded = books.float()[torch.arange(num_codebooks, device=codes.device), codes].sum(1)
    decoded = decoded.reshape(out_features, in_features)
    # least-squares scale per row for the decoded (float16) codebooks: argmin_s |w - s d|^2
    energy = decoded.square().sum(1, keepdim=True)
    fitted = (w * decoded).sum(1, keepdim=True) / energy.clamp_min(1e-30)
    scales = torch.where(energy > 0, fitted, scales)
    return {
        "codes": wrap_codes(codes.reshape(out_features, in_features // group, num_codebooks), nbits),
        "codebooks": books.reshape(num_codebooks, size, OUT_GROUP_SIZE, group),
        "scales": scales.reshape(out_features, 1, 1, 1).to(torch.float16),
    }


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


class AQLMFormat(QuantFormat):
    def __init__(self) -> None:
        super().__init__(
            name="aqlm",
            description="AQLM additive quantization: 1x16 (~2 bits), 2x8, 1x8 codebooks over groups of 8",
            libraries=("aqlm",),
            options=(
                Option("scheme", str, "aqlm: codebooks x bits each (default 1x16)", choices=tuple(SCHEMES)),
                Option("in_group_size", int, "aqlm: input weights a code covers (default 8)"),
            ),
        )

    def make_recipe(self, options: dict[str, Any]) -> dict[str, Any]:
        reject_foreign_options(self, options, {"scheme", "in_group_size"})
        scheme = options.get("scheme") or "1x16"
        check_choice(self, "scheme", scheme, tuple(SCHEMES))
        in_group = options.get("in_group_size") or 8
        check_choice(self, "in_group_size", in_group, IN_GROUP_SIZES)
        num_codebooks, nbits = SCHEMES[scheme]
        return {
            "method": self.name,
            "scheme": scheme,
            "num_codebooks": num_codebooks,
            "nbits_per_codebook": nbits,
            "in_group_size": in_group,
            "out_group_size": OUT_GROUP_SIZE,
            "calibration": None,  # data-free: the activation-aware stages are not built yet
            "kmeans_iters": KMEANS_ITERS,
            "refine_rounds": REFINE_ROUNDS,
            "seed": 0,
        }

    def label(self, recipe: dict) -> str:
        return f"aqlm {recipe['scheme']} g{recipe['in_group_size']}"

    def skip_reason(self, module_name: str, shape: tuple[int, ...], recipe: dict) -> str | None:
        out_features, in_features = shape
        if in_features % KERNEL_IN_FEATURES_MULTIPLE:
            return (
                f"{in_features} input features: aqlm's CUDA kernels compute wrong results unless the "
                f"input features are a multiple of {KERNEL_IN_FEATURES_MULTIPLE}"
            )
        if out_features % OUT_GROUP_SIZE:
            return f"{out_features} outputs do not split into groups of {OUT_GROUP_SIZE}"
        return None

    def output_suffixes(self, recipe: dict) -> list[str]:
        return ["codes", "codebooks", "scales"]

    def output_specs(
        self, shape: tuple[int, ...], recipe: dict
    ) -> dict[str, tuple[torch.dtype, tuple] | None]:
        out_features, in_features = shape
        group, books, nbits = recipe["in_group_size"], recipe["num_codebooks"], recipe["nbits_per_codebook"]
        return {
            "codes": (codes_dtype(nbits), (out_features // OUT_GROUP_SIZE, in_features // group, books)),
            "codebooks": (torch.float16, (books, 2**nbits, OUT_GROUP_SIZE, group)),
            "scales": (torch.float16, (out_features // OUT_GROUP_SIZE, 1, 1, 1)),
        }

    def quantize(self, weight: torch.Tensor, recipe: dict, device: torch.device) -> dict[str, torch.Tensor]:
        if not torch.isfinite(weight).all():
            raise UsageError("the weight has NaN or infinite values")
        return quantize_weight(weight, recipe)

    def dequantize(self, tensors: dict[str, torch.Tensor], recipe: dict) -> torch.Tensor:
        return dequantize_layer(tensors["codes"], tensors["codebooks"], tensors["scales"])

    def quantization_config(
        self, recipe: dict, skipped_modules: list[str], embeddings: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        not_quantized = list(embeddings)
        for module in skipped_modules:
            not_quantized += [f"{module}.weight", module]
        return {
            "quant_method": "aqlm",
            "in_group_size": recipe["in_group_size"],
            "out_group_size": OUT_GROUP_SIZE,
            "num_codebooks": recipe["num_codebooks"],
            "nbits_per_codebook": recipe["nbits_per_codebook"],
            "linear_weights_not_to_quantize": not_quantized,
        }

    def load_pretrained(self, folder, device: torch.device, dtype: torch.dtype):
        """Stock transformers + aqlm. On the CPU, aqlm sends 8-bit codebooks to a numba kernel
        (the ``aqlm[cpu]`` extra) that races with more than one thread and permutes the codes
        in place on its first call (FORMATS.md); there every layer is pointed at aqlm's own
        generic kernel (``dequantize_gemm``, plain torch) instead. 16-bit codebooks on the CPU
        and everything on CUDA run the kernels aqlm picks."""
        model = super().load_pretrained(folder, device, dtype)
        if device.type == "cpu":
            from aqlm.inference_kernels.dequantization import dequantize_gemm

            class GenericMatmul:
                @staticmethod
                def apply(x, codes, codebooks, scales, bias):
                    return dequantize_gemm(x, codes, codebooks, scales, bias)

            for module in model.modules():
                if type(module).__name__ == "QuantizedLinear" and module.codebook_size == 256:
                    module.gemv_op = module.gemm_op = GenericMatmul
                    module.use_gemv_rule = lambda x: False
        return model

    def loader_tolerance(self, recipe: dict) -> float:
        return 1e-3


register(AQLMFormat())
