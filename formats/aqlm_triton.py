"""Fused nearest-codeword search for AQLM on the GPU: ``argmin_k norms[k] - 2 x.c_k`` for every
vector, tile by tile with a running minimum, so the ``vectors x codewords`` score matrix (65,536
columns for a 16-bit codebook) never exists in memory. With ``norms = |c_k|^2`` it is the
nearest codeword in Euclidean distance (k-means); with ``norms = c_k^T H c_k`` it is one step of
AQLM's code search under the layer's input statistics H (formats/aqlm_solver.py).

Few vectors (a code-search step covers one output row each) would leave most of the GPU idle,
so the codewords are also split between programs, each writing its own best, and the splits
are reduced afterwards. Ties go to the lowest index, as ``torch.argmin`` does; the dot products
are IEEE float32 (no TF32), so exact inputs give exactly the brute-force choice
(tests/test_format_aqlm.py).

``greedy_pass`` is the code search with a beam of one, a whole pass over a layer's codes: per
(group, codebook) one kernel that forms each row's search target from ``(W - W_hat) H`` and its
current code and searches, one that picks the winning split, writes the code and the residual's
change, and one rank-g update of ``(W - W_hat) H``. Three launches a step instead of some thirty
small torch operations, whose launch cost was most of the pass's time."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _search(
    x,
    codebook_ptr,
    norms_ptr,
    first,
    last,
    dims,
    dim_ok,
    DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Best score and its codeword index among codewords [first, last) for each row of x."""
    best = tl.full((BLOCK_N,), float("inf"), tl.float32)
    best_index = tl.zeros((BLOCK_N,), tl.int32)
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
    return best, best_index


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
    first = split * words_per_split
    last = tl.minimum(first + words_per_split, n_codewords)
    best, best_index = _search(
        x, codebook_ptr, norms_ptr, first, last, dims, dim_ok, DIM, BLOCK_N, BLOCK_K, PRECISION
    )
    out = split.to(tl.int64) * n_vectors + rows
    tl.store(best_ptr + out, best, mask=row_ok)
    tl.store(index_ptr + out, best_index, mask=row_ok)


@triton.jit
def greedy_search_kernel(
    rh_ptr,
    codes_ptr,
    scales_ptr,
    codebook_ptr,
    norms_ptr,
    xtx_ptr,
    best_ptr,
    index_ptr,
    n_rows,
    n_inputs,
    n_codewords,
    words_per_split,
    code_stride,
    code_offset,
    column,
    DIM: tl.constexpr,
    DIM_P2: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One step's search: the target of row o is ``rh[o, cols] / s[o] + C[code[o]] H_gg``
    (aqlm_solver's module doc), then the nearest codeword under ``norms = c^T H_gg c``."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    row_ok = rows < n_rows
    dims = tl.arange(0, DIM_P2)
    dim_ok = dims < DIM
    both = row_ok[:, None] & dim_ok[None, :]
    rows64 = rows.to(tl.int64)
    v = tl.load(rh_ptr + rows64[:, None] * n_inputs + column + dims[None, :], mask=both, other=0.0)
    s = tl.load(scales_ptr + rows, mask=row_ok, other=1.0)
    current = tl.load(codes_ptr + rows64 * code_stride + code_offset, mask=row_ok, other=0)
    c0 = tl.load(codebook_ptr + current[:, None] * DIM + dims[None, :], mask=both, other=0.0)
    h_gg = tl.load(
        xtx_ptr + (column + dims[:, None]).to(tl.int64) * n_inputs + column + dims[None, :],
        mask=dim_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )
    x = v / s[:, None] + tl.dot(c0, h_gg, input_precision="ieee")
    first = split * words_per_split
    last = tl.minimum(first + words_per_split, n_codewords)
    best, best_index = _search(
        x, codebook_ptr, norms_ptr, first, last, dims, dim_ok, DIM, BLOCK_N, BLOCK_K, "ieee"
    )
    out = split.to(tl.int64) * n_rows + rows
    tl.store(best_ptr + out, best, mask=row_ok)
    tl.store(index_ptr + out, best_index, mask=row_ok)


@triton.jit
def greedy_apply_kernel(
    best_ptr,
    index_ptr,
    codes_ptr,
    scales_ptr,
    codebook_ptr,
    change_ptr,
    n_rows,
    splits,
    code_stride,
    code_offset,
    DIM: tl.constexpr,
    DIM_P2: tl.constexpr,
    SPLITS_P2: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The winning split of each row (the lowest on a tie: the lowest codeword index), its code
    written, and the residual's change ``s (C[old] - C[new])`` for the update of (W - W_hat) H."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    parts = tl.arange(0, SPLITS_P2)
    where = parts[:, None].to(tl.int64) * n_rows + rows64[None, :]
    part_ok = (parts[:, None] < splits) & row_ok[None, :]
    best = tl.load(best_ptr + where, mask=part_ok, other=float("inf"))
    winner = tl.argmin(best, axis=0, tie_break_left=True)
    choice = tl.load(index_ptr + winner.to(tl.int64) * n_rows + rows64, mask=row_ok, other=0).to(tl.int64)
    dims = tl.arange(0, DIM_P2)
    both = row_ok[:, None] & (dims < DIM)[None, :]
    code_at = codes_ptr + rows64 * code_stride + code_offset
    current = tl.load(code_at, mask=row_ok, other=0)
    s = tl.load(scales_ptr + rows, mask=row_ok, other=1.0)
    c0 = tl.load(codebook_ptr + current[:, None] * DIM + dims[None, :], mask=both, other=0.0)
    c1 = tl.load(codebook_ptr + choice[:, None] * DIM + dims[None, :], mask=both, other=0.0)
    tl.store(change_ptr + rows64[:, None] * DIM + dims[None, :], s[:, None] * c0 - s[:, None] * c1, mask=both)
    tl.store(code_at, choice, mask=row_ok)


def _grid(n_rows: int, n_codewords: int, device: torch.device) -> tuple[int, int, int, int, int]:
    """(block_n, block_k, row blocks, splits, codewords per split): enough programs to fill the
    GPU even when there are few rows."""
    block_n, block_k = 64, 128
    row_blocks = triton.cdiv(n_rows, block_n)
    sm_count = (  # Triton's CPU interpreter (tests) has no device properties
        torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    )
    splits = max(1, min(triton.cdiv(n_codewords, block_k), (4 * sm_count) // row_blocks))
    words_per_split = triton.cdiv(triton.cdiv(n_codewords, splits), block_k) * block_k
    return block_n, block_k, row_blocks, triton.cdiv(n_codewords, words_per_split), words_per_split


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
    block_n, block_k, row_blocks, splits, words_per_split = _grid(n_vectors, n_codewords, vectors.device)
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
        DIM_P2=_padded(dim),
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        PRECISION="ieee" if exact else "tf32",
    )
    if splits == 1:
        return index[0].to(torch.int64)
    # argmin takes the first of equal minima: the lowest split, hence the lowest codeword index
    winner = best.argmin(0, keepdim=True)
    return index.gather(0, winner)[0].to(torch.int64)


def _padded(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))  # tl.dot needs 16 along the reduced axis


# scores of codeword-norm precomputation held at once: (groups x codewords) float32, 128 MB
NORMS_CHUNK_ELEMENTS = 1 << 25


@torch.no_grad()
def greedy_pass(
    residual_h: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    xtx: torch.Tensor,
) -> None:
    """One pass of the code search with a beam of one over every (input group, codebook), in
    place: ``codes [out, groups, books]`` (int64) get each step's best codeword and
    ``residual_h = (W - W_hat) H [out, in]`` follows them. ``scales`` must be nonzero.

    The codeword norms ``c^T H_gg c`` of every group come from one matmul per chunk of groups:
    ``(c outer c) . vec(H_gg)``, with the codebook's outer products formed once."""
    out_features, groups, num_codebooks = codes.shape
    size, width = codebooks.shape[1], codebooks.shape[2]
    in_features = residual_h.shape[1]
    device = residual_h.device
    block_n, block_k, row_blocks, splits, words_per_split = _grid(out_features, size, device)
    best = torch.empty((splits, out_features), dtype=torch.float32, device=device)
    index = torch.empty((splits, out_features), dtype=torch.int32, device=device)
    change = torch.empty((out_features, width), dtype=torch.float32, device=device)
    # the diagonal blocks H_gg of every group, flattened: [groups, width * width]
    blocks = xtx.reshape(groups, width, groups, width).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    blocks = blocks.reshape(groups, width * width)
    outer = [(book[:, :, None] * book[:, None, :]).reshape(size, width * width) for book in codebooks]
    chunk = max(1, NORMS_CHUNK_ELEMENTS // size)
    apply_rows = 64
    for first in range(0, groups, chunk):
        norms = [blocks[first : first + chunk] @ o.t() for o in outer]  # [chunk, size] per codebook
        for g in range(first, min(first + chunk, groups)):
            column = g * width
            h_rows = xtx[column : column + width]
            for c in range(num_codebooks):
                book = codebooks[c]
                greedy_search_kernel[(row_blocks, splits)](
                    residual_h,
                    codes,
                    scales,
                    book,
                    norms[c][g - first],
                    xtx,
                    best,
                    index,
                    out_features,
                    in_features,
                    size,
                    words_per_split,
                    groups * num_codebooks,
                    g * num_codebooks + c,
                    column,
                    DIM=width,
                    DIM_P2=_padded(width),
                    BLOCK_N=block_n,
                    BLOCK_K=block_k,
                )
                greedy_apply_kernel[(triton.cdiv(out_features, apply_rows),)](
                    best,
                    index,
                    codes,
                    scales,
                    book,
                    change,
                    out_features,
                    splits,
                    groups * num_codebooks,
                    g * num_codebooks + c,
                    DIM=width,
                    DIM_P2=_padded(width),
                    SPLITS_P2=max(2, triton.next_power_of_2(splits)),
                    BLOCK_N=apply_rows,
                )
                residual_h.addmm_(change, h_rows)
