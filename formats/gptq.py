"""GPTQ for uniform group formats: error feedback over the inputs, each group's scale and zero
searched under the inputs' statistics, in exactly the numbers a format stores.

The algorithm is GPTQ's (Frantar et al. 2022, arXiv:2210.17323, Algorithm 1, as the authors'
``gptq.py`` runs it): with ``H = X^T X`` of the layer's calibration inputs,

- inputs never seen (``H[i, i] = 0``) get ``H[i, i] = 1`` and every diagonal entry gets
  ``damp * mean(diag H)`` (``DAMP`` = 0.01, the paper's default), so ``H`` is invertible;
- ``U``: the upper Cholesky factor of ``H^-1`` (float64 here: one factorisation a layer);
- the input columns are quantized left to right, in blocks of ``BLOCK`` columns ("lazy batch"
  updates): after column ``i`` is rounded, its error ``e = (w_i - q_i) / U[i, i]`` is spread over
  the columns not yet quantized (``W[:, j] -= e * U[i, j]``, inside the block at once, beyond it
  once per block), which is the optimal correction of the remaining weights for the layer's
  output error ``tr((W - Q) H (W - Q)^T)`` (Optimal Brain Quantization).

Groups are the format's: ``group_size`` consecutive input columns of an output row (a format's
``axis=1`` grouping when the group size divides the inputs; one group per row for per-channel
schemes). Columns are never reordered (no act-order), so the stored layout is the data-free one.

Each group's scale and zero are chosen when the walk reaches its first column, from the group's
weights as the error feedback has left them (GPTQ's ``static_groups=False``): among ``RATIOS``
clipping ratios of the group's range (GPTQ's own ``mse`` grid search of its ``Quantizer``, and
AWQ's / llama.cpp's imatrix search), the one with the lowest error weighted by ``diag(H)`` of the
group's columns (the importance llama.cpp's ``--imatrix`` weights by), then refined by weighted
least squares of the scale (and a float zero) for the codes it gives (llama.cpp's
``make_qkx2_quants``), kept only where it lowers that error. Every candidate is measured in the
stored numbers: the scale (and a float zero) rounded to the format's dtype, integer codes and
zero points as the format clamps them (:class:`Grid`).

All of it is batched torch over the output rows: on a GPU the whole layer stays on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: GPTQ's dampening of H's diagonal, relative to its mean (the paper's and AutoGPTQ's 0.01)
DAMP = 0.01
#: columns a lazy-batch block spans (GPTQ's 128), rounded to whole groups
BLOCK = 128
#: clipping ratios of a group's range searched (GPTQ's Quantizer grid: 1 down to 1 - maxshrink,
#: maxshrink 0.8 in 100 steps there; 1 down to 0.4 in steps of 0.04 here, the least-squares
#: refinement below then moving the scale off the grid)
RATIOS = tuple(round(1.0 - 0.04 * k, 2) for k in range(16))
#: weighted least-squares refinements of a group's scale (and zero) after the ratio search
REFINE_ROUNDS = 2


@dataclass(frozen=True)
class Grid:
    """What a format stores for a group: codes in ``[q_min, q_max]``; ``symmetric``: no zero
    (the scale alone, ``w = code * s``, scale from the group's largest magnitude over
    ``half_range``); else ``zero`` is ``"int"`` (a code in the range, ``w = (code - z) * s``) or
    ``"float"`` (any float stored in ``dtype``, HQQ); scales are stored in ``dtype``."""

    q_min: int
    q_max: int
    symmetric: bool
    zero: str
    dtype: torch.dtype
    #: symmetric only: the magnitude, in steps, the group's largest weight maps to (llm-compressor
    #: 7.5 for 4 bits: half the full range [-8, 7])
    half_range: float = 0.0
    #: the range of a group always holds 0 (compressed-tensors' calculate_qparams)
    holds_zero: bool = False


@dataclass
class GPTQResult:
    """``codes`` ``[out, in]`` (int32), ``scale`` / ``zero`` ``[out, groups]`` (float32 holding
    the stored values; zero all 0 when symmetric)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor


def _stored(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    finfo = torch.finfo(dtype)
    return values.nan_to_num(0.0).clamp(-finfo.max, finfo.max).to(dtype).to(torch.float32)


def _stored_scale(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    stored = _stored(values, dtype)
    tiny = torch.finfo(dtype).tiny
    return torch.where(stored > 0, stored, torch.full_like(stored, tiny).to(dtype).to(torch.float32))


def _codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grid: Grid) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale + zero), grid.q_min, grid.q_max)


def _weighted_error(w, scale, zero, importance, grid) -> torch.Tensor:
    q = _codes(w, scale, zero, grid)
    return ((w - (q - zero) * scale).square() * importance).sum(dim=1, keepdim=True)


def _candidate(w: torch.Tensor, ratio: float, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    low = w.amin(dim=1, keepdim=True)
    high = w.amax(dim=1, keepdim=True)
    if grid.holds_zero or grid.symmetric:
        low, high = low.clamp(max=0), high.clamp(min=0)
    low, high = low * ratio, high * ratio
    if grid.symmetric:
        scale = _stored_scale(torch.maximum(-low, high) / grid.half_range, grid.dtype)
        return scale, torch.zeros_like(scale)
    scale = _stored_scale((high - low) / (grid.q_max - grid.q_min), grid.dtype)
    if grid.zero == "int":
        zero = torch.round(grid.q_min - low / scale).clamp(grid.q_min, grid.q_max)
    else:
        zero = _stored(grid.q_min - low / scale, grid.dtype)
    return scale, zero


def _refine(w, scale, zero, importance, grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted least squares of the scale (and a float zero) for the codes of (scale, zero)."""
    q = _codes(w, scale, zero, grid)
    d = importance.expand_as(w)
    if grid.symmetric or grid.zero == "int":
        v = q - zero
        num = (d * w * v).sum(dim=1, keepdim=True)
        den = (d * v * v).sum(dim=1, keepdim=True)
        fitted = torch.where((den > 0) & (num > 0), num / den.clamp_min(1e-30), scale)
        return _stored_scale(fitted, grid.dtype), zero
    # w ~ s * q + m (m = -s z): the weighted regression line of w on the codes
    sw, sq, sqq = d.sum(1, keepdim=True), (d * q).sum(1, keepdim=True), (d * q * q).sum(1, keepdim=True)
    sx, sqx = (d * w).sum(1, keepdim=True), (d * q * w).sum(1, keepdim=True)
    det = sw * sqq - sq * sq
    s = (sw * sqx - sq * sx) / det.clamp_min(1e-30)
    m = (sx - s * sq) / sw.clamp_min(1e-30)
    usable = (det > 1e-12 * sw * sqq) & (s > 0)
    new_scale = _stored_scale(torch.where(usable, s, scale), grid.dtype)
    new_zero = _stored(torch.where(usable, -m / new_scale, zero), grid.dtype)
    return new_scale, new_zero


def fit_groups(w: torch.Tensor, importance: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero ``[rows, 1]`` per row of ``w`` ``[rows, size]`` (a group a row) minimising
    ``sum importance * (w - dequantized)^2`` over the clipping ratios, then refined."""
    importance = importance.reshape(1, -1).to(w.dtype)
    best_scale, best_zero = _candidate(w, RATIOS[0], grid)
    best = _weighted_error(w, best_scale, best_zero, importance, grid)
    for ratio in RATIOS[1:]:
        scale, zero = _candidate(w, ratio, grid)
        error = _weighted_error(w, scale, zero, importance, grid)
        better = error < best
        best = torch.where(better, error, best)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    for _ in range(REFINE_ROUNDS):
        scale, zero = _refine(w, best_scale, best_zero, importance, grid)
        error = _weighted_error(w, scale, zero, importance, grid)
        better = error < best
        best = torch.where(better, error, best)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def prepare_hessian(xtx: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """GPTQ's ``U``: the upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` (float64),
    dead inputs given ``H[i, i] = 1``."""
    h = xtx.to(torch.float64).clone()
    diagonal = torch.diagonal(h)
    diagonal[diagonal == 0] = 1.0
    diagonal += damp * diagonal.mean()
    lower = torch.linalg.cholesky(h)
    inverse = torch.cholesky_inverse(lower)
    return torch.linalg.cholesky(inverse, upper=True)


#: on a CUDA device, replay each lazy-batch block's column walk as one captured CUDA graph
#: (the walk is ~13 small kernels a column plus the group searches: launched one by one, a layer
#: of 4096 inputs costs ~0.65 s on an H100 whatever its rows; replayed, the same kernels run with
#: the same launch parameters, so the numbers are bit-identical to the eager walk)
CUDA_GRAPHS = True


def _walk_block(
    w1: torch.Tensor, u1: torch.Tensor, importance: torch.Tensor, group_size: int, grid: Grid
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One lazy-batch block (whole groups, ``w1`` updated in place): codes, the block's group
    scales and zeros, and the scaled errors the columns beyond the block are corrected by."""
    rows, width = w1.shape
    codes = torch.empty((rows, width), dtype=torch.int32, device=w1.device)
    scales = torch.empty((rows, width // group_size), dtype=torch.float32, device=w1.device)
    zeros = torch.empty_like(scales)
    errors = torch.empty_like(w1)
    for i in range(width):
        if i % group_size == 0:
            g = i // group_size
            scale, zero = fit_groups(w1[:, i : i + group_size], importance[i : i + group_size], grid)
            scales[:, g : g + 1], zeros[:, g : g + 1] = scale, zero
        q = _codes(w1[:, i : i + 1], scale, zero, grid)
        codes[:, i : i + 1] = q.to(torch.int32)
        error = (w1[:, i : i + 1] - (q - zero) * scale) / u1[i, i]
        w1[:, i:].sub_(error * u1[i : i + 1, i:])
        errors[:, i : i + 1] = error
    return codes, scales, zeros, errors


class _GraphedBlockWalk:
    """``_walk_block`` for blocks of one shape, captured once as a CUDA graph over static
    buffers and replayed per block (torch.cuda.graphs' capture recipe: a warm-up on a side
    stream, then the capture)."""

    def __init__(self, rows: int, width: int, group_size: int, grid: Grid, device: torch.device):
        self.w1 = torch.empty((rows, width), dtype=torch.float32, device=device)
        self.u1 = torch.empty((width, width), dtype=torch.float32, device=device)
        self.importance = torch.empty(width, dtype=torch.float32, device=device)
        self.walk = lambda: _walk_block(self.w1, self.u1, self.importance, group_size, grid)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: tuple[torch.Tensor, ...] = ()

    def __call__(self, w1, u1, importance) -> tuple[torch.Tensor, ...]:
        def load() -> None:
            self.w1.copy_(w1)
            self.u1.copy_(u1)
            self.importance.copy_(importance)

        load()
        if self.graph is None:
            side = torch.cuda.Stream(device=self.w1.device)
            side.wait_stream(torch.cuda.current_stream(self.w1.device))
            with torch.cuda.stream(side):
                self.walk()
            torch.cuda.current_stream(self.w1.device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outputs = self.walk()
            load()  # the warm-up walked the buffers in place
        self.graph.replay()
        return self.outputs


@torch.no_grad()
def quantize_gptq(
    weight: torch.Tensor, xtx: torch.Tensor, group_size: int, grid: Grid, damp: float = DAMP
) -> GPTQResult:
    """GPTQ of ``weight`` ``[out, in]`` under ``xtx`` ``[in, in]`` (the module doc);
    ``group_size`` divides ``in``."""
    out_features, in_features = weight.shape
    if in_features % group_size:
        raise ValueError(f"{in_features} inputs do not split into groups of {group_size}")
    device = weight.device
    w = weight.to(torch.float32).clone()
    importance = torch.diagonal(xtx).to(device=device, dtype=torch.float32)
    upper = prepare_hessian(xtx.to(device), damp).to(torch.float32)
    groups = in_features // group_size
    codes = torch.empty((out_features, in_features), dtype=torch.int32, device=device)
    scales = torch.empty((out_features, groups), dtype=torch.float32, device=device)
    zeros = torch.empty_like(scales)
    block = max(1, BLOCK // group_size) * group_size
    graphed = None
    if CUDA_GRAPHS and device.type == "cuda" and in_features >= 2 * block:
        graphed = _GraphedBlockWalk(out_features, block, group_size, grid, device)
    for start in range(0, in_features, block):
        end = min(start + block, in_features)
        u1, block_importance = upper[start:end, start:end], importance[start:end]
        if graphed is not None and end - start == block:
            block_codes, block_scales, block_zeros, errors = graphed(w[:, start:end], u1, block_importance)
        else:
            block_codes, block_scales, block_zeros, errors = _walk_block(
                w[:, start:end].clone(), u1, block_importance, group_size, grid
            )
        codes[:, start:end] = block_codes
        scales[:, start // group_size : end // group_size] = block_scales
        zeros[:, start // group_size : end // group_size] = block_zeros
        w[:, end:].sub_(errors @ upper[start:end, end:])
    return GPTQResult(codes, scales, zeros)


def dequantize(result: GPTQResult, group_size: int) -> torch.Tensor:
    values = result.codes.to(torch.float32).unflatten(1, (-1, group_size))
    values = (values - result.zero.unsqueeze(-1)) * result.scale.unsqueeze(-1)
    return values.flatten(1)


def output_error(weight: torch.Tensor, approx: torch.Tensor, xtx: torch.Tensor) -> float:
    """``tr((W - Q) H (W - Q)^T) / tr(W H W^T)``: the layer's relative output error on its
    calibration inputs (float64)."""
    h = xtx.to(torch.float64)
    w = weight.to(torch.float64)
    diff = approx.to(device=w.device, dtype=torch.float64) - w
    num = float(((diff @ h) * diff).sum())
    den = float(((w @ h) * w).sum())
    return num / den if den > 0 else 0.0
