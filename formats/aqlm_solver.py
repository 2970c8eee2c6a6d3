"""AQLM's per-layer optimisation (Egiazarian et al., "Extreme Compression of Large Language Models
via Additive Quantization", 2024), written for qconv.

A layer ``W [out, in]`` becomes ``W_hat[o] = s[o] * concat_g sum_c C_c[codes[o, g, c]]``: per
output row a scale, per group of ``g`` inputs one codeword from each codebook. The objective is
the layer's output error on the calibration inputs X, written with ``H = X^T X / tokens``:

    loss = sum_o (W - W_hat)[o] H (W - W_hat)[o]^T / out        (H = identity: weight error)

Steps (shared/FORMATS.md gives the published settings; ``recipe`` carries ours):

1. ``initialise``: scales from the rows' norms, then residual k-means over the normalised groups,
   one codebook after another (data-free, as the paper's initialisation).
2. Repeat until the loss improves by less than ``relative_tolerance`` in an epoch:
   ``adam_steps`` of Adam on codebooks and scales (codes fixed), then ``beam_search`` over the
   codes (codebooks and scales fixed).

The code search is greedy coordinate descent over (input group, codebook) with a beam: changing
the codeword of group g, codebook c of row o from ``d0 = s C[k0]`` to ``s C[k]`` changes the
row's loss by ``s^2 (C[k]^T H_gg C[k] - 2 C[k].t) + const`` where ``t = (v + H_gg d0) / s`` and
``v`` is the group's slice of ``(W - W_hat) H``. So the best codeword is a nearest-codeword
search with ``C^T H_gg C`` in place of the squared norms: the fused Triton kernel on CUDA
(formats/aqlm_triton.py), chunked matmuls elsewhere. ``(W - W_hat) H`` is kept up to date with
a rank-g update per step instead of being recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qconv.formats.triton_support import triton_available

# scores computed at once in the nearest-codeword search (bounds its memory: 64 MB in fp32 on
# the host, 512 MB on a GPU, where bigger matmuls run faster)
SEARCH_CHUNK_ELEMENTS = 1 << 24
SEARCH_CHUNK_ELEMENTS_CUDA = 1 << 27
# Adam on codebooks and scales, as the reference's AQEngine.quantize: betas (0, 0.95), amsgrad
ADAM_BETAS = (0.0, 0.95)
# k-means stops early once an iteration lowers the squared error by less than this fraction (the
# reference instead runs a fixed 100 iterations; on a real layer 5 gave the same final error as 25)
KMEANS_TOLERANCE = 1e-3


# -- search and k-means -------------------------------------------------------------------------
SCAN_TILE = 1024


def scan_rows(rows: torch.Tensor) -> torch.Tensor:
    """Inclusive prefix sums along the last dimension of a 2-D tensor, in an order that does not
    depend on timing. torch's CUDA cumsum sends a tensor whose elements all lie along the scanned
    dimension to CUB's single-pass scan, whose decoupled look-back adds tile totals in whatever
    order the tiles finish (floats then differ run to run in the last bits); with two or more
    rows it runs one block per row in a fixed order. So a single row gets a zero row beside it."""
    if rows.shape[0] == 1:
        return torch.cat([rows, torch.zeros_like(rows)]).cumsum(1)[:1]
    return rows.cumsum(1)


class SortedCodes:
    """Per-codeword sums of vectors (k-means' centroids, the gradient of a codebook: per codeword
    the sum over the groups using it), deterministic on the GPU as well: once the codes are
    sorted, a sum is a difference of float64 prefix sums, scanned in tiles of ``SCAN_TILE`` (see
    :func:`scan_rows`). No atomics (index_add_ on CUDA adds in any order), and no sort per call
    (autograd's embedding backward sorts at every step, while Adam's codes change only between
    runs). The tensors keep their storage across ``update`` calls: a CUDA graph reads them."""

    def __init__(self, count: int, size: int, width: int, device: torch.device) -> None:
        self.count, self.size, self.width = count, size, width
        self.tiles = -(-count // SCAN_TILE)
        # one column's prefix sums: a leading zero, then one per (padded) entry
        self.stride = self.tiles * SCAN_TILE + 1
        self.order = torch.zeros(count, dtype=torch.int64, device=device)
        self.lower = torch.zeros(size, width, dtype=torch.int64, device=device)
        self.upper = torch.zeros(size, width, dtype=torch.int64, device=device)

    def update(self, codes: torch.Tensor) -> None:
        """``codes`` [count]: each group's codeword in this codebook."""
        self.order.copy_(torch.argsort(codes, stable=True))
        counts = torch.bincount(codes, minlength=self.size)
        ends = counts.cumsum(0)  # integers: exact in any order
        starts = ends - counts
        column = torch.arange(self.width, device=codes.device) * self.stride
        self.lower.copy_(starts[:, None] + column)
        self.upper.copy_(ends[:, None] + column)

    def sums(self, values: torch.Tensor) -> torch.Tensor:
        """Per codeword the sum of ``values [count, width]`` over its entries, ``[size, width]``."""
        ordered = values.index_select(0, self.order).t().to(torch.float64)  # [width, count]
        padded = torch.nn.functional.pad(ordered, (0, self.tiles * SCAN_TILE - self.count))
        within = scan_rows(padded.reshape(-1, SCAN_TILE)).view(self.width, self.tiles, SCAN_TILE)
        totals = within[:, :, -1]
        before = scan_rows(totals) - totals  # what the tiles before each tile add up to
        prefix = torch.nn.functional.pad((within + before[:, :, None]).reshape(self.width, -1), (1, 0))
        flat = prefix.reshape(-1)
        return (flat[self.upper] - flat[self.lower]).to(values.dtype)


def nearest_codewords(
    vectors: torch.Tensor, codebook: torch.Tensor, norms: torch.Tensor | None = None, exact: bool = True
) -> torch.Tensor:
    """For every row of ``vectors`` the index k minimising ``norms[k] - 2 vectors.codebook[k]``;
    with the default ``norms = |codebook[k]|^2`` that is the nearest codeword (squared
    Euclidean). Ties go to the lowest index. On CUDA one fused Triton kernel (``exact=False``:
    TF32 dot products, for k-means); elsewhere chunked so that the score matrix never exists whole."""
    if vectors.is_cuda and triton_available():
        # aqlm_triton imports triton, optional and CUDA-only: loaded only on this path
        from qconv.formats.aqlm_triton import nearest_codewords_fused

        return nearest_codewords_fused(vectors, codebook, norms, exact)
    if norms is None:
        norms = codebook.square().sum(1)
    budget = SEARCH_CHUNK_ELEMENTS_CUDA if vectors.is_cuda else SEARCH_CHUNK_ELEMENTS
    rows = max(1, budget // codebook.shape[0])
    out = torch.empty(vectors.shape[0], dtype=torch.int64, device=vectors.device)
    for start in range(0, vectors.shape[0], rows):
        part = vectors[start : start + rows]
        scores = torch.addmm(norms[None, :], part, codebook.t(), alpha=-2.0)
        out[start : start + rows] = scores.argmin(1)
    return out


def centroids(vectors: torch.Tensor, assignment: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Mean of the vectors assigned to each codeword; an empty codeword keeps its place. The sums
    are deterministic on the GPU too (index_add_'s atomics are not), so that a resumed
    conversion repeats the same layer errors."""
    size, width = previous.shape
    grouped = SortedCodes(vectors.shape[0], size, width, vectors.device)
    grouped.update(assignment)
    sums = grouped.sums(vectors)
    counts = torch.bincount(assignment, minlength=size).to(vectors.dtype)
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
    previous = float("inf")
    for _ in range(iters):
        assignment = nearest_codewords(vectors, codebook, exact=False)
        error = float((vectors - codebook[assignment]).square().sum())
        if error >= previous * (1 - KMEANS_TOLERANCE):
            break  # converged: the last update gained (almost) nothing
        previous = error
        codebook = centroids(vectors, assignment, codebook)
    # TF32 here too: a near-tie going the other way costs nothing measurable, and the calibrated
    # path's code search re-picks every code exactly anyway
    return codebook, nearest_codewords(vectors, codebook, exact=False)


# -- the layer's state --------------------------------------------------------------------------
@dataclass
class LayerCodes:
    """codes ``[out, in/g, num_codebooks]`` (int64, unsigned indices), codebooks
    ``[num_codebooks, 2^nbits, g]`` and scales ``[out]``, both float32 while optimised."""

    codes: torch.Tensor
    codebooks: torch.Tensor
    scales: torch.Tensor

    def weight(self) -> torch.Tensor:
        return decode(self.codes, self.codebooks, self.scales)


def decode(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``scales[o] * sum_c codebooks[c, codes[o, g, c]]`` as ``[out, in]`` (differentiable in
    codebooks and scales)."""
    out_features, groups, num_codebooks = codes.shape
    # embedding() rather than indexing: its backward is a dedicated scatter-add, several times
    # faster than index_put's for a 65,536-entry codebook
    embed = torch.nn.functional.embedding
    picked = sum(embed(codes[:, :, c], codebooks[c]) for c in range(num_codebooks))  # [out, groups, g]
    return picked.reshape(out_features, -1) * scales[:, None]


def output_loss(delta: torch.Tensor, xtx: torch.Tensor | None) -> torch.Tensor:
    """Per row ``delta H delta^T`` (``H`` None: the identity)."""
    if xtx is None:
        return delta.square().sum(1)
    return ((delta @ xtx) * delta).sum(1)


@torch.no_grad()
def initialise(weight: torch.Tensor, recipe: dict, generator: torch.Generator) -> LayerCodes:
    """Scales from the row norms, residual k-means per codebook, then (several codebooks) rounds
    re-fitting each codebook to what the others leave, and a least-squares refit of the scales."""
    num_codebooks, nbits = recipe["num_codebooks"], recipe["nbits_per_codebook"]
    group = recipe["in_group_size"]
    out_features, in_features = weight.shape
    # Row norms as scales, as the reference does: the codebooks then hold values of about
    # 1/sqrt(in), the scale Adam's step size (lr 1e-4) was tuned for.
    norms = torch.linalg.vector_norm(weight, dim=1, keepdim=True)
    scales = torch.where(norms > 0, norms, torch.ones_like(norms))
    groups = (weight / scales).reshape(-1, group)  # [out * in / group, group]

    residual = groups.clone()
    codebooks, indices = [], []
    for _ in range(num_codebooks):
        codebook, index = kmeans(residual, 2**nbits, recipe["kmeans_iters"], generator)
        residual -= codebook[index]
        codebooks.append(codebook)
        indices.append(index)
    for _ in range(recipe["refine_rounds"] if num_codebooks > 1 else 0):
        for c in range(num_codebooks):
            target = residual + codebooks[c][indices[c]]  # what codebook c alone should give
            indices[c] = nearest_codewords(target, codebooks[c])
            codebooks[c] = centroids(target, indices[c], codebooks[c])
            residual = target - codebooks[c][indices[c]]

    codes = torch.stack(indices, dim=1).reshape(out_features, in_features // group, num_codebooks)
    books = torch.stack(codebooks)
    return LayerCodes(codes, books, least_squares_scales(weight, codes, books, scales[:, 0]))


def least_squares_scales(
    weight: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, fallback: torch.Tensor
) -> torch.Tensor:
    """Per row ``argmin_s |w - s d|^2`` for the row ``d`` the codes decode to unscaled; a row that
    decodes to zero keeps its ``fallback`` scale."""
    decoded = decode(codes, codebooks, torch.ones_like(fallback))
    energy = decoded.square().sum(1)
    fitted = (weight * decoded).sum(1) / energy.clamp_min(1e-30)
    return torch.where(energy > 0, fitted, fallback)


# -- code search --------------------------------------------------------------------------------
@torch.no_grad()
def beam_search(weight: torch.Tensor, xtx: torch.Tensor, state: LayerCodes, beam_size: int) -> LayerCodes:
    """One pass of beam search over every (input group, codebook) in order (module doc); returns
    the state with the best beam's codes per row. Never increases the loss of a row: its current
    codes are always among the candidates."""
    codes, books, scales = state.codes, state.codebooks, state.scales
    out_features, groups, num_codebooks = codes.shape
    size, width = books.shape[1], books.shape[2]
    s = torch.where(scales.abs() > 1e-20, scales, torch.full_like(scales, 1e-20))  # [out]
    residual = weight - decode(codes, books, scales)
    if beam_size == 1 and weight.is_cuda and triton_available():
        from qconv.formats.aqlm_triton import greedy_pass  # triton: optional, CUDA only

        codes = codes.clone()
        greedy_pass(residual @ xtx, codes, books.contiguous(), s.contiguous(), xtx.contiguous())
        return LayerCodes(codes, books, scales)
    beams_codes = codes[None].clone()  # [beams, out, groups, books]
    beams_rh = (residual @ xtx)[None]  # [beams, out, in]: (W - W_hat) H per beam
    beams_loss = (beams_rh[0] * residual).sum(1)[None]  # [beams, out]
    rows = torch.arange(out_features, device=weight.device)
    for g in range(groups):
        cols = slice(g * width, (g + 1) * width)
        h_gg = xtx[cols, cols]
        h_rows = xtx[cols, :]  # [width, in]
        for c in range(num_codebooks):
            book = books[c]
            book_norms = ((book @ h_gg) * book).sum(1)  # C^T H_gg C per codeword
            beams = beams_codes.shape[0]
            v = beams_rh[:, :, cols]  # [beams, out, width]
            d0 = s[None, :, None] * book[beams_codes[:, :, g, c]]  # current contribution
            d0_h = d0 @ h_gg
            base = beams_loss + 2 * (d0 * v).sum(-1) + (d0_h * d0).sum(-1)  # loss with the group empty
            target = (v + d0_h) / s[None, :, None]
            if beam_size == 1:
                choice = nearest_codewords(target[0], book, book_norms)[None]
                chosen = book[choice]
                new_loss = base + s.square()[None] * (book_norms[choice] - 2 * (target * chosen).sum(-1))
                parent = torch.zeros_like(choice)
            else:
                scores = book_norms - 2 * target @ book.t()  # [beams, out, size]
                candidates = base[..., None] + s.square()[None, :, None] * scores
                flat = candidates.permute(1, 0, 2).reshape(out_features, beams * size)
                keep = min(beam_size, beams * size)
                new_loss, picked = torch.topk(flat, keep, dim=1, largest=False, sorted=True)
                new_loss, picked = new_loss.t(), picked.t()  # [keep, out]
                parent, choice = picked // size, picked % size
            beams_codes = beams_codes[parent, rows[None, :]]
            beams_codes[:, :, g, c] = choice
            change = d0[parent, rows[None, :]] - s[None, :, None] * book[choice]  # residual change
            beams_rh = beams_rh[parent, rows[None, :]] + change @ h_rows
            beams_loss = new_loss
    best = beams_loss.argmin(0)
    return LayerCodes(beams_codes[best, rows], books, scales)


# -- the whole layer ----------------------------------------------------------------------------
@dataclass
class LayerResult:
    state: LayerCodes
    epochs: int
    initial_loss: float
    loss: float
    reference_energy: float  # sum_o W H W^T / out: the loss of an all-zero weight

    @property
    def relative_loss(self) -> float:
        return self.loss / self.reference_energy if self.reference_energy > 0 else 0.0

    @property
    def relative_initial_loss(self) -> float:
        return self.initial_loss / self.reference_energy if self.reference_energy > 0 else 0.0


def _mean_loss(weight, xtx, state: LayerCodes) -> torch.Tensor:
    return output_loss(state.weight() - weight, xtx).mean()


def quantize_layer(
    weight: torch.Tensor, xtx: torch.Tensor | None, recipe: dict, generator: torch.Generator
) -> LayerResult:
    """Initialise, then alternate Adam and beam search until an epoch improves the loss by less
    than ``recipe["relative_tolerance"]`` (or ``max_epochs``). float32 throughout. ``xtx`` None
    minimises the weight error (the data-free quantizer: initialisation only)."""
    weight = weight.to(torch.float32)
    state = initialise(weight, recipe, generator)
    with torch.no_grad():
        reference = float(output_loss(weight, xtx).mean())
        initial = float(_mean_loss(weight, xtx, state))
    if xtx is None or recipe["max_epochs"] == 0:
        return LayerResult(state, 0, initial, initial, reference)
    xtx = xtx.to(torch.float32)
    beam_size = recipe["beam_size"]
    codes = state.codes.clone()  # updated in place by each code search (a CUDA graph reads it)
    codebooks = torch.nn.Parameter(state.codebooks.clone())
    scales = torch.nn.Parameter(state.scales.clone())
    adam = AdamSteps(weight, xtx, codes, codebooks, scales, recipe["lr"])
    best_loss, best_state, best_epochs = initial, state, 0
    previous = initial
    epochs = 0
    for epoch in range(recipe["max_epochs"]):
        adam.run(recipe["adam_steps"])
        state = beam_search(weight, xtx, LayerCodes(codes, codebooks.detach(), scales.detach()), beam_size)
        codes.copy_(state.codes)
        state = LayerCodes(state.codes, codebooks.detach().clone(), scales.detach().clone())
        epochs = epoch + 1
        with torch.no_grad():
            current = float(_mean_loss(weight, xtx, state))
        if current < best_loss:  # Adam can overshoot a nearly exact fit: keep the best state seen
            best_loss, best_state, best_epochs = current, state, epochs
        if current > previous * (1 - recipe["relative_tolerance"]):
            break  # the epoch gained less than the tolerance (the reference's early stop)
        previous = current
    return LayerResult(best_state, best_epochs, initial, best_loss, reference)


class AdamSteps:
    """Adam on codebooks and scales with the codes fixed, on the mean output loss. Its gradient
    is written out rather than left to autograd: for ``D = s * U - W`` (U the unscaled decoded
    weight) it is ``G = D (H + H^T) / out``, the scales' ``sum_j G U`` per row and a codeword's
    the sum of ``s G`` over the groups using it (``SortedCodes``). On CUDA one step (gradient
    and fused Adam update) is captured once as a CUDA graph and replayed: a step on a small
    layer is a few dozen tiny kernels, whose launch cost would otherwise be most of the time."""

    EAGER_STEPS = 3  # before capture (the allocator and fused Adam's state settle); real steps

    def __init__(self, weight, xtx, codes, codebooks, scales, lr: float) -> None:
        self.negative_weight, self.codes = -weight, codes
        self.gradient_h = (xtx + xtx.t()) / weight.shape[0]
        self.params = (codebooks, scales)
        out_features, groups, num_codebooks = codes.shape
        size, width = codebooks.shape[1], codebooks.shape[2]
        self.columns = torch.empty(
            num_codebooks, out_features * groups, dtype=codes.dtype, device=codes.device
        )
        self.sorted = [
            SortedCodes(out_features * groups, size, width, codes.device) for _ in range(num_codebooks)
        ]
        for p in self.params:
            p.grad = torch.zeros_like(p)
        cuda = weight.is_cuda
        self.optimizer = torch.optim.Adam(
            self.params, lr=lr, betas=ADAM_BETAS, amsgrad=True, fused=cuda or None, capturable=cuda
        )
        self.graph = None
        self.pending_eager = self.EAGER_STEPS if cuda else None

    @torch.no_grad()
    def _step(self) -> None:
        codebooks, scales = self.params
        out_features, groups, num_codebooks = self.codes.shape
        width = codebooks.shape[2]
        embed = torch.nn.functional.embedding
        unscaled = sum(embed(self.columns[c], codebooks[c]) for c in range(num_codebooks))
        unscaled = unscaled.reshape(out_features, -1)
        delta = torch.addcmul(self.negative_weight, unscaled, scales[:, None])  # W_hat - W
        gradient = delta @ self.gradient_h  # [out, in]: d loss / d W_hat
        scales.grad.copy_((gradient * unscaled).sum(1))
        per_group = (gradient * scales[:, None]).reshape(-1, width)
        for c in range(num_codebooks):
            codebooks.grad[c].copy_(self.sorted[c].sums(per_group))
        self.optimizer.step()

    def run(self, steps: int) -> None:
        """``steps`` Adam steps from the current codes (which may have changed since the last run)."""
        for c in range(self.codes.shape[2]):
            self.columns[c].copy_(self.codes[:, :, c].reshape(-1))
            self.sorted[c].update(self.columns[c])
        if self.pending_eager is None:  # CPU: plain steps
            for _ in range(steps):
                self._step()
            return
        while steps > 0 and self.pending_eager > 0:
            self._step()
            steps, self.pending_eager = steps - 1, self.pending_eager - 1
        if steps == 0:
            return
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._step()
            steps -= 1  # capturing does not run the step: replay it
            self.graph.replay()
        for _ in range(steps):
            self.graph.replay()
