"""Fused nearest-codeword search for AQLM on the GPU: ``argmin_k |x - c_k|^2`` for every vector,
computed as ``|c_k|^2 - 2 x.c_k`` tile by tile with a running minimum, so the ``vectors x
codewords`` distance matrix (65,536 columns for a 16-bit codebook) never exists in memory.
Ties go to the lowest index, as ``torch.argmin`` does; the dot products are IEEE float32 (no
TF32), so exact inputs give exactly the brute-force choice (tests/test_format_aqlm.py)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def nearest_codeword_kernel(
    x_ptr,
    codebook_ptr,
    norms_ptr,
    out_ptr,
    n_vectors,
    n_codewords,
    DIM: tl.constexpr,
    DIM_P2: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_vectors
    dims = tl.arange(0, DIM_P2)
    dim_ok = dims < DIM
    x = tl.load(
        x_ptr + rows[:, None].to(tl.int64) * DIM + dims[None, :],
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )
    best = tl.full((BLOCK_N,), float("inf"), tl.float32)
    best_index = tl.zeros((BLOCK_N,), tl.int32)
    for start in range(0, n_codewords, BLOCK_K):
        words = start + tl.arange(0, BLOCK_K)
        word_ok = words < n_codewords
        codewords = tl.load(
            codebook_ptr + words[:, None].to(tl.int64) * DIM + dims[None, :],
            mask=word_ok[:, None] & dim_ok[None, :],
            other=0.0,
        )
        norms = tl.load(norms_ptr + words, mask=word_ok, other=float("inf"))
        dots = tl.dot(x, tl.trans(codewords), input_precision="ieee")
        scores = norms[None, :] - 2.0 * dots
        tile_best = tl.min(scores, axis=1)
        tile_index = tl.argmin(scores, axis=1).to(tl.int32) + start
        better = tile_best < best  # strict: an earlier tile keeps a tie
        best = tl.where(better, tile_best, best)
        best_index = tl.where(better, tile_index, best_index)
    tl.store(out_ptr + rows, best_index, mask=row_ok)


def nearest_codewords_fused(vectors: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """int64 index of the nearest codeword for every row of ``vectors`` (CUDA, float32)."""
    vectors = vectors.to(torch.float32).contiguous()
    codebook = codebook.to(torch.float32).contiguous()
    n_vectors, dim = vectors.shape
    norms = codebook.square().sum(1)
    out = torch.empty(n_vectors, dtype=torch.int32, device=vectors.device)
    dim_p2 = max(16, triton.next_power_of_2(dim))  # tl.dot needs 16 along the reduced axis
    block_n, block_k = 64, 128
    nearest_codeword_kernel[(triton.cdiv(n_vectors, block_n),)](
        vectors,
        codebook,
        norms,
        out,
        n_vectors,
        codebook.shape[0],
        DIM=dim,
        DIM_P2=dim_p2,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )
    return out.to(torch.int64)
