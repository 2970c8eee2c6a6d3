"""Fused nearest-codeword search for AQLM on the GPU: ``argmin_k norms[k] - 2 x.c_k`` for every
vector, tile by tile with a running minimum, so the ``vectors x codewords`` score matrix (65,536
columns for a 16-bit codebook) never exists in memory. With ``norms = |c_k|^2`` it is the
nearest codeword in Euclidean distance (k-means); with ``norms = c_k^T H c_k`` it is one step of
AQLM's code search under the layer's input statistics H (formats/aqlm_solver.py).

Few vectors (a code-search step covers one output row each) would leave most of the GPU idle,
so the codewords are also split between programs, each writing its own best, and the splits
are reduced afterwards. Ties go to the lowest index, as ``torch.argmin`` does; the dot products
are IEEE float32 (no TF32), so exact inputs give exactly the brute-force choice
(tests/test_format_aqlm.py)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def nearest_codeword_kernel(
    x_ptr,
    codebook_ptr,
    norms_ptr,
    best_ptr,
    index_ptr,
    n_vectors,
    n_codewords,
    words_per_split,
    DIM: tl.constexpr,
    DIM_P2: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
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
    first = split * words_per_split
    last = tl.minimum(first + words_per_split, n_codewords)
    for start in range(first, last, BLOCK_K):
        words = start + tl.arange(0, BLOCK_K)
        word_ok = words < last
        codewords = tl.load(
            codebook_ptr + words[:, None].to(tl.int64) * DIM + dims[None, :],
            mask=word_ok[:, None] & dim_ok[None, :],
            other=0.0,
        )
        norms = tl.load(norms_ptr + words, mask=word_ok, other=float("inf"))
        dots = tl.dot(x, tl.trans(codewords), input_precision=PRECISION)
        scores = norms[None, :] - 2.0 * dots
        tile_best = tl.min(scores, axis=1)
        tile_index = tl.argmin(scores, axis=1).to(tl.int32) + start
        better = tile_best < best  # strict: an earlier tile keeps a tie
        best = tl.where(better, tile_best, best)
        best_index = tl.where(better, tile_index, best_index)
    out = split.to(tl.int64) * n_vectors + rows
    tl.store(best_ptr + out, best, mask=row_ok)
    tl.store(index_ptr + out, best_index, mask=row_ok)


def nearest_codewords_fused(
    vectors: torch.Tensor, codebook: torch.Tensor, norms: torch.Tensor | None = None, exact: bool = True
) -> torch.Tensor:
    """int64 index minimising ``norms[k] - 2 vectors[i].codebook[k]`` for every row (CUDA,
    float32); ``norms`` defaults to the codewords' squared lengths. ``exact=False`` lets the dot
    products run on TF32 tensor cores (several times faster; near-ties may go either way, which
    k-means' assignment step tolerates)."""
    vectors = vectors.to(torch.float32).contiguous()
    codebook = codebook.to(torch.float32).contiguous()
    norms = (codebook.square().sum(1) if norms is None else norms.to(torch.float32)).contiguous()
    n_vectors, dim = vectors.shape
    n_codewords = codebook.shape[0]
    dim_p2 = max(16, triton.next_power_of_2(dim))  # tl.dot needs 16 along the reduced axis
    block_n, block_k = 64, 128
    row_blocks = triton.cdiv(n_vectors, block_n)
    sm_count = (  # Triton's CPU interpreter (tests) has no device properties
        torch.cuda.get_device_properties(vectors.device).multi_processor_count if vectors.is_cuda else 4
    )
    splits = max(1, min(triton.cdiv(n_codewords, block_k), (4 * sm_count) // row_blocks))
    words_per_split = triton.cdiv(triton.cdiv(n_codewords, splits), block_k) * block_k
    splits = triton.cdiv(n_codewords, words_per_split)
    best = torch.empty((splits, n_vectors), dtype=torch.float32, device=vectors.device)
    index = torch.empty((splits, n_vectors), dtype=torch.int32, device=vectors.device)
    nearest_codeword_kernel[(row_blocks, splits)](
        vectors,
        codebook,
        norms,
        best,
        index,
        n_vectors,
        n_codewords,
        words_per_split,
        DIM=dim,
        DIM_P2=dim_p2,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        PRECISION="ieee" if exact else "tf32",
    )
    if splits == 1:
        return index[0].to(torch.int64)
    # argmin takes the first of equal minima: the lowest split, hence the lowest codeword index
    winner = best.argmin(0, keepdim=True)
    return index.gather(0, winner)[0].to(torch.int64)
