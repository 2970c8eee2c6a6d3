"""GPTQ for GGML block types: error feedback over the inputs, in exactly the bytes a GGUF type
stores (``--method gguf --calibration``).

For code assignment every GGML block type is a grid per element: ``value = a_e * level(q) + b_e``
with ``q`` an integer code in ``[lo, hi]`` (``level`` the identity except for IQ4_NL, whose 16
levels are ggml's ``kvalues_iq4nl``):

- k-quants (Q2_K..Q6_K, 256-value super-blocks): ``a_e = d * sc_j`` and ``b_e = -dmin * m_j`` of
  the 16- or 32-value sub-block ``j`` holding the element (ggml's ``dequantize_row_qN_K``);
- legacy types (32-value blocks): ``a_e = d``, ``b_e = m`` (Q4_1/Q5_1) or 0.

The walk is GPTQ's (formats/gptq.py: the same dampened ``H``, the Cholesky factor of ``H^-1``,
lazy batches of columns, no act-order). When it reaches the first column of a GGML block it
chooses that block's numbers for every output row from the weights as the error feedback has
left them, as GPTQ chooses a group's scale (``static_groups=False``): the data-free qconv and
llama solvers of the type (gguf_quants.py / gguf_kquants.py) each propose the block's numbers,
and the one with the lower error weighted by ``diag(H)`` of the block's columns (the importance
llama.cpp's ``--imatrix`` weights by, ggml-quants.c ``quantize_row_q4_K_impl`` and friends) is
kept. Then each column's codes are the nearest on that fixed grid, and the rounding error feeds
the columns not yet quantized. At the end the codes and block numbers are packed by the type's
own packers into the bytes llama.cpp reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
import torch

from qconv.formats import gguf_kquants, gguf_quants
from qconv.formats.gptq import BLOCK, DAMP, prepare_hessian

#: GGML types GPTQ can fill (every quantized type qconv writes)
TYPES = (*gguf_kquants.QUANTIZERS, *(name for name in gguf_quants._LEGACY))


def block_size(type_name: str) -> int:
    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]][0]


@dataclass
class BlockGrid:
    """One GGML block's numbers for ``rows`` rows: per element ``a``, ``b`` ``[rows, block]``
    (``value = a * level(code) + b``) and what the packer needs besides the codes."""

    a: torch.Tensor
    b: torch.Tensor
    params: dict


class _KQuant:
    """Q2_K..Q6_K through gguf_kquants' solutions (``d``, ``dmin``, signed ``sc``, ``m``)."""

    def __init__(self, type_name: str) -> None:
        self.name = type_name
        spec = gguf_kquants._SPECS[type_name]
        self.sub = spec["sub"]
        self.lo, self.hi = -spec["q_offset"], spec["q_max"] - spec["q_offset"]

    def candidates(self, x: torch.Tensor, weights: torch.Tensor) -> list[dict]:
        """The data-free qconv and llama solutions, an imatrix-style start fitted with
        ``weights`` (per element), and each refitted for ``weights`` at its own codes."""
        starts = [gguf_kquants._qconv(self.name, x), gguf_kquants._LLAMA[self.name](x)]
        starts.append(self._weighted_start(x, weights))
        return starts + [self._refit(solution, x, weights) for solution in starts]

    def _weighted_start(self, x: torch.Tensor, weights: torch.Tensor) -> dict:
        """Each sub-block fitted for the weighted squared error (ggml-quants.c's imatrix path:
        make_qkx3_quants' grid -0.9 + 0.05 k, k <= 36, or make_qx_quants with weights), then
        the sub-scales (and mins) quantized against the largest, as llama.cpp's reference does."""
        spec = gguf_kquants._SPECS[self.name]
        nsub = gguf_kquants.QK_K // self.sub
        sub_x, sub_w = x.reshape(-1, self.sub), weights.reshape(-1, self.sub)
        if spec["m_max"]:
            scales, mins, _ = gguf_kquants._make_qkx2_quants(
                sub_x, sub_w, spec["q_max"], -0.9, 0.05, 36, False
            )
            scales, mins = scales.reshape(-1, nsub), mins.reshape(-1, nsub)
            d = gguf_kquants._f16(gguf_kquants._positive_max(scales) / spec["sc_hi"])
            dmin = gguf_kquants._f16(gguf_kquants._positive_max(mins) / spec["m_max"])
            safe_m = torch.where(dmin == 0, torch.ones_like(dmin), dmin)[:, None]
            m = torch.round(mins / safe_m).clamp(0, spec["m_max"])
        else:
            scales, _ = gguf_kquants._make_qx_quants(sub_x, sub_w, spec["q_offset"])
            scales = scales.reshape(-1, nsub)
            d = gguf_kquants._f16(gguf_kquants._signed_max(scales)[0] / spec["sc_lo"])
            dmin = torch.zeros_like(d)
            m = torch.zeros_like(scales)
        safe = torch.where(d == 0, torch.ones_like(d), d)[:, None]
        sc = torch.round(scales / safe).clamp(spec["sc_lo"], spec["sc_hi"])
        return self._solution(d, dmin, sc.to(torch.int64), m.to(torch.int64))

    def _solution(self, d, dmin, sc, m) -> dict:
        q = torch.zeros((d.shape[0], sc.shape[1], self.sub), dtype=torch.int64, device=d.device)
        return gguf_kquants._signed_to_stored(self.name, d, dmin, sc, m, q)

    def _refit(self, solution: dict, x: torch.Tensor, weights: torch.Tensor) -> dict:
        """Weighted least squares of the super-block's ``d`` (and ``dmin``) for the nearest codes
        of ``solution`` and its integer sub-scales, rounded to fp16."""
        grid = self.grid(solution)
        q = _codes(self, grid, x)
        sc, m = grid.params["sc"].to(torch.float32), grid.params["m"].to(torch.float32)
        u = sc.repeat_interleave(self.sub, dim=1) * q
        v = m.repeat_interleave(self.sub, dim=1)
        w = weights.double()
        u, v, xd = u.double(), v.double(), x.double()
        uu, ux = (w * u * u).sum(1), (w * u * xd).sum(1)
        d, dmin = grid.params["d"], grid.params["dmin"]
        if gguf_kquants._SPECS[self.name]["m_max"]:
            uv, vv, vx = (w * u * v).sum(1), (w * v * v).sum(1), (w * v * xd).sum(1)
            det = uu * vv - uv * uv
            ok = det > 1e-12 * (uu * vv).clamp(min=1e-300)
            new_d = (ux * vv - uv * vx) / torch.where(ok, det, torch.ones_like(det))
            new_dmin = (ux * uv - uu * vx) / torch.where(ok, det, torch.ones_like(det))
        else:
            ok = uu > 0
            new_d = ux / torch.where(ok, uu, torch.ones_like(uu))
            new_dmin = torch.zeros_like(new_d)
        new_d, new_dmin = gguf_kquants._f16(new_d.float()), gguf_kquants._f16(new_dmin.float())
        ok = ok & torch.isfinite(new_d) & torch.isfinite(new_dmin) & (new_dmin >= 0)
        return self._solution(
            torch.where(ok, new_d, d), torch.where(ok, new_dmin, dmin), grid.params["sc"], grid.params["m"]
        )

    def grid(self, solution: dict) -> BlockGrid:
        sc, m, _ = gguf_kquants._stored_to_signed(self.name, solution)
        d, dmin = solution["d"][:, None], solution["dmin"][:, None]
        a = (d * sc.to(torch.float32)).repeat_interleave(self.sub, dim=1)
        b = -(dmin * m.to(torch.float32)).repeat_interleave(self.sub, dim=1)
        return BlockGrid(a, b, {"d": solution["d"], "dmin": solution["dmin"], "sc": sc, "m": m})

    def level(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.to(torch.float32)

    def nearest(self, t: torch.Tensor) -> torch.Tensor:
        return torch.round(t).clamp(self.lo, self.hi)

    def pack(self, params: dict, codes: torch.Tensor) -> torch.Tensor:
        q = codes.to(torch.int64).reshape(-1, gguf_kquants.QK_K // self.sub, self.sub)
        sol = gguf_kquants._signed_to_stored(
            self.name, params["d"], params["dmin"], params["sc"], params["m"], q
        )
        return gguf_kquants._BYTES[self.name](sol).to(torch.uint8)


class _Legacy:
    """Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL through gguf_quants' blocks (``d``, ``m``, codes)."""

    def __init__(self, type_name: str) -> None:
        self.spec = gguf_quants._LEGACY[type_name]
        self.lo, self.hi = self.spec.low, self.spec.high

    def candidates(self, x: torch.Tensor, weights: torch.Tensor) -> list[tuple]:
        """The data-free qconv and llama blocks, an imatrix-style start fitted with ``weights``
        (ggml-quants.c quantize_q4_0 / q4_1 / q5_0 / q5_1 with quant_weights: make_qx_quants,
        make_qkx3_quants), and each refitted for ``weights`` at its own codes."""
        starts = [gguf_quants._qconv(x, self.spec), gguf_quants._llama(x, self.spec)]
        if not self.spec.nonlinear and self.spec.name != "Q8_0":  # llama.cpp ignores weights there
            if self.spec.has_min:
                scale, the_min, _ = gguf_kquants._make_qkx2_quants(
                    x, weights, self.spec.high, -0.9, 0.05, 36, False
                )
                starts.append((gguf_quants._fp16(scale), gguf_quants._fp16(-the_min), None))
            else:
                scale, _ = gguf_kquants._make_qx_quants(x, weights, -self.spec.low)
                starts.append((gguf_quants._fp16(scale), None, None))
        return starts + [self._refit(solution, x, weights) for solution in starts]

    def _refit(self, solution: tuple, x: torch.Tensor, weights: torch.Tensor) -> tuple:
        """Weighted least squares of ``d`` (and ``m``) for the nearest levels of ``solution``."""
        d16, m16, _ = solution
        grid = self.grid(solution)
        level = self.level(_codes(self, grid, x)).double()
        w, xd = weights.double(), x.double()
        ll, lx = (w * level * level).sum(1), (w * level * xd).sum(1)
        if m16 is None:
            ok = ll > 0
            d = lx / torch.where(ok, ll, torch.ones_like(ll))
            m = None
        else:
            sw, sl, sx = w.sum(1), (w * level).sum(1), (w * xd).sum(1)
            det = sw * ll - sl * sl
            ok = det > 1e-12 * (sw * ll).clamp(min=1e-300)
            safe = torch.where(ok, det, torch.ones_like(det))
            d = (sw * lx - sl * sx) / safe
            m = (ll * sx - sl * lx) / safe
        new_d = gguf_quants._fp16(d.float())
        ok = ok & torch.isfinite(new_d.float())
        new_m = None
        if m is not None:
            new_m = gguf_quants._fp16(m.float())
            ok = ok & torch.isfinite(new_m.float())
            new_m = torch.where(ok, new_m, m16)
        return torch.where(ok, new_d, d16), new_m, None

    def grid(self, solution: tuple) -> BlockGrid:
        d16, m16, _ = solution
        n = self.spec.block
        a = d16.to(torch.float32)[:, None].expand(-1, n)
        b = torch.zeros_like(a) if m16 is None else m16.to(torch.float32)[:, None].expand(-1, n)
        return BlockGrid(a, b, {"d": d16, "m": m16})

    def level(self, codes: torch.Tensor) -> torch.Tensor:
        return gguf_quants._levels(self.spec, codes.to(torch.int64))

    def nearest(self, t: torch.Tensor) -> torch.Tensor:
        return gguf_quants._nearest(self.spec, t).to(torch.float32)

    def pack(self, params: dict, codes: torch.Tensor) -> torch.Tensor:
        return gguf_quants._pack(self.spec, params["d"], params["m"], codes.to(torch.int32))


def block_type(type_name: str):
    if type_name in gguf_kquants.QUANTIZERS:
        return _KQuant(type_name)
    if type_name in gguf_quants._LEGACY:
        return _Legacy(type_name)
    raise ValueError(f"GGML type {type_name} has no block grid for GPTQ")


def _grid_values(kind, grid: BlockGrid, codes: torch.Tensor) -> torch.Tensor:
    return grid.a * kind.level(codes) + grid.b


def fit_block(kind, x: torch.Tensor, importance: torch.Tensor) -> BlockGrid:
    """The block's numbers for rows ``x`` ``[rows, block]``: of the type's candidates, the one
    with the lowest ``importance``-weighted squared error per row (float64). The weights the
    imatrix-style candidates are fitted with are llama.cpp's: ``qw * sqrt(sigma2 + x^2)``,
    ``sigma2 = 2 * mean(x^2)`` of the row's block (ggml-quants.c quantize_row_q4_K_impl)."""
    best_grid, best_error = None, None
    sigma2 = 2 * x.square().mean(dim=1, keepdim=True)
    weights = importance[None, :] * torch.sqrt(sigma2 + x * x)
    for solution in kind.candidates(x, weights):
        grid = kind.grid(solution)
        codes = _codes(kind, grid, x)
        error = ((x - _grid_values(kind, grid, codes)).double().square() * importance.double()).sum(1)
        if best_grid is None:
            best_grid, best_error = grid, error
            continue
        take = error < best_error
        best_error = torch.where(take, error, best_error)
        best_grid = _pick(take, grid, best_grid)
    return best_grid


def _pick(take: torch.Tensor, new: BlockGrid, old: BlockGrid) -> BlockGrid:
    def choose(a, b):
        if a is None:
            return None
        return torch.where(take.view(-1, *[1] * (a.dim() - 1)), a, b)

    params = {k: choose(v, old.params[k]) for k, v in new.params.items()}
    return BlockGrid(choose(new.a, old.a), choose(new.b, old.b), params)


def _codes(kind, grid: BlockGrid, x: torch.Tensor) -> torch.Tensor:
    """Nearest codes of ``x`` on the grid; where a step is 0 every code gives ``b``: code 0's
    level range start (any code is right)."""
    safe = torch.where(grid.a == 0, torch.ones_like(grid.a), grid.a)
    codes = kind.nearest((x - grid.b) / safe)
    return torch.where(grid.a == 0, kind.nearest(torch.zeros_like(x)), codes)


@torch.no_grad()
def quantize_gptq_gguf(
    weight: torch.Tensor, xtx: torch.Tensor, type_name: str, damp: float = DAMP
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ of ``weight`` ``[out, in]`` under ``xtx`` ``[in, in]`` into ``type_name``'s bytes:
    (uint8 ``[out, in // block * type_size]``, rows in ``weight``'s order; the float32 values the
    walk took the codes for, ``[out, in]``, which the bytes dequantize to) (the module doc)."""
    kind = block_type(type_name)
    out_features, in_features = weight.shape
    size = block_size(type_name)
    if in_features % size:
        raise ValueError(f"{in_features} inputs do not split into {type_name} blocks of {size}")
    device = weight.device
    w = weight.to(torch.float32).clone()
    importance = torch.diagonal(xtx).to(device=device, dtype=torch.float32)
    upper = prepare_hessian(xtx.to(device), damp).to(torch.float32)
    codes = torch.empty((out_features, in_features), dtype=torch.float32, device=device)
    values = torch.empty_like(codes)
    grids: list[BlockGrid] = []
    batch = max(1, BLOCK // size) * size
    grid = None
    for start in range(0, in_features, batch):
        end = min(start + batch, in_features)
        w1 = w[:, start:end].clone()
        errors = torch.empty_like(w1)
        u1 = upper[start:end, start:end]
        for i in range(end - start):
            column = start + i
            offset = column % size
            if offset == 0:
                grid = fit_block(kind, w1[:, i : i + size], importance[column : column + size])
                grids.append(grid)
            a, b = grid.a[:, offset : offset + 1], grid.b[:, offset : offset + 1]
            q = _codes(kind, BlockGrid(a, b, {}), w1[:, i : i + 1])
            codes[:, column : column + 1] = q
            value = a * kind.level(q) + b
            values[:, column : column + 1] = value
            error = (w1[:, i : i + 1] - value) / u1[i, i]
            w1[:, i:].sub_(error * u1[i : i + 1, i:])
            errors[:, i : i + 1] = error
        w[:, end:].sub_(errors @ upper[start:end, end:])
    parts = [
        kind.pack(grid.params, codes[:, k * size : (k + 1) * size]).reshape(out_features, -1)
        for k, grid in enumerate(grids)
    ]
    return torch.cat(parts, dim=1).contiguous(), values


def dequantize_bytes(data: torch.Tensor, type_name: str, shape: tuple[int, int]) -> torch.Tensor:
    """float32 ``shape`` values of stored bytes, by the ``gguf`` package's own dequantizer."""
    values = gguf.quants.dequantize(data.cpu().numpy(), gguf.GGMLQuantizationType[type_name])
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)
