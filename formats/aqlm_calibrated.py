"""AQLM with calibration data, block by block, checkpointed (formats/format_aqlm.py's ``prepare``).

For every decoder block, in order (as the paper's main.py does):

1. run the source block over the calibration inputs: its outputs are the fine-tuning target, and
   forward hooks accumulate ``H = X^T X / tokens`` (float64) for each of its quantized Linears;
2. quantize each Linear with ``aqlm_solver.quantize_layer`` under its H;
3. fine-tune (``finetune``): Adam on the block's codebooks, scales and norm weights with the codes
   frozen, to match the source block's outputs; keep the best epoch on held-out sequences;
4. round codebooks and scales to float16 (as stored) and run the quantized block: its outputs
   are the next block's inputs, so later blocks learn to undo earlier blocks' errors;
5. write the block's tensors to the checkpoint folder (one safetensors file, renamed into place)
   and record it in ``state.json``.

``--resume`` skips the blocks already in the checkpoint, rebuilding their outputs from the stored
tensors with the same operations as step 4, so a resumed run writes the same bytes as an
uninterrupted one (on the CPU; a GPU's kernels may differ in the last bits).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qconv.calibration import BlockRunner, call_block
from qconv.formats.aqlm_layout import solver_state, stored_tensors
from qconv.formats.aqlm_solver import LayerCodes, decode, quantize_layer
from qconv.formats.blockwise import (
    CheckpointedBlocks,
    InputStatistics,
    Walk,
    calibration_set,
    walk_blocks,
)
from qconv.modeling import assign_parameter

STORED_SUFFIXES = ("codes", "codebooks", "scales")
FINETUNE_BETAS = (0.9, 0.95)  # the reference's --finetune_adam_beta1/2 defaults


class AQLMLinear(nn.Module):
    """A Linear whose weight is decoded from codes (fixed), codebooks and scales (trainable)."""

    def __init__(self, state: LayerCodes, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("codes", state.codes)
        self.codebooks = nn.Parameter(state.codebooks)
        self.scales = nn.Parameter(state.scales)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, decode(self.codes, self.codebooks, self.scales), self.bias)

    @torch.no_grad()
    def round_to_storage(self) -> None:
        """What the artifact stores: float16 codebooks and scales."""
        self.codebooks.copy_(self.codebooks.half().float())
        self.scales.copy_(self.scales.half().float())

    def stored(self, nbits: int) -> dict[str, torch.Tensor]:
        state = LayerCodes(self.codes, self.codebooks.detach(), self.scales.detach())
        return {k: v.cpu().contiguous() for k, v in stored_tensors(state, nbits).items()}

    @classmethod
    def from_stored(cls, tensors: dict[str, torch.Tensor], bias, nbits: int, device) -> AQLMLinear:
        state = solver_state(tensors, nbits)
        return cls(LayerCodes(*(t.to(device) for t in (state.codes, state.codebooks, state.scales))), bias)


class CalibratedAQLM(CheckpointedBlocks):
    """The result of the calibration stage: each quantized module's stored tensors and the
    fine-tuned norm weights, read back from the checkpoint folder by the streaming writer."""

    def __init__(self, folder: Path, calibration: dict[str, Any], walk: Walk) -> None:
        super().__init__(folder, calibration, walk, list(STORED_SUFFIXES))


def prepare(context) -> CalibratedAQLM:
    recipe, device = context.recipe, context.device
    calib = calibration_set(context)
    nbits = recipe["nbits_per_codebook"]

    def quantize_block(block, prefix, names, hidden, kwargs, index, target, layers, blocks):
        return _quantize_block(block, prefix, names, hidden, kwargs, recipe, index, layers, blocks, target)

    def install_stored(block, prefix, names, stored):
        _install_stored(block, prefix, names, stored, nbits, device)

    walk = walk_blocks(context, calib, quantize_block, install_stored)
    blocks = walk.blocks
    calibration = {**calib.fingerprint, "blocks": blocks} if blocks else dict(calib.fingerprint)
    return CalibratedAQLM(context.checkpoint, calibration, walk)


def _quantize_block(
    block, prefix, names, hidden, kwargs, recipe, index, layers, blocks, target
) -> dict[str, torch.Tensor]:
    """Steps 1-3 of the module doc; returns the tensors to store for the block."""
    clock = time.perf_counter()
    statistics = InputStatistics(block, prefix, names)
    with torch.no_grad():
        BlockRunner.run(block, hidden, kwargs, out=target)  # the source block's outputs
    statistics.stop()
    modules: dict[str, AQLMLinear] = {}
    for name in names:
        linear = block.get_submodule(name[len(prefix) :])
        xtx = statistics.pop(name)
        generator = torch.Generator().manual_seed(_layer_seed(recipe["seed"], name))
        result = quantize_layer(linear.weight.detach(), xtx, recipe, generator)
        del xtx
        layers[name] = {
            "epochs": result.epochs,
            "rel_output_error_init": result.relative_initial_loss,
            "rel_output_error": result.relative_loss,
        }
        bias = None if linear.bias is None else linear.bias.detach()
        modules[name] = AQLMLinear(result.state, bias)
        block.set_submodule(name[len(prefix) :], modules[name])
    norms = _norm_parameters(block, modules)
    timing = {"quantize_s": round(time.perf_counter() - clock, 3)}
    clock = time.perf_counter()
    if recipe["finetune"] and modules:
        before, after = _finetune_block(block, modules, norms, hidden, kwargs, target, recipe, index)
        blocks[prefix[:-1]] = {"rel_error_before_finetune": before, "rel_error": after}
        timing["finetune_s"] = round(time.perf_counter() - clock, 3)
    blocks.setdefault(prefix[:-1], {}).update(timing)
    stored: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        module.round_to_storage()
        for suffix, value in module.stored(recipe["nbits_per_codebook"]).items():
            stored[f"{name}.{suffix}"] = value
    if recipe["finetune"]:
        working = getattr(torch, recipe.get("dtype") or "float32")
        with torch.no_grad():  # the artifact stores the norms in the working dtype: compute with that
            for local, param in norms.items():
                param.copy_(param.to(working).float())
                stored[prefix + local] = param.detach().cpu().contiguous()
    return stored


def _install_stored(block, prefix, names, stored, nbits, device) -> None:
    """Put a checkpointed block's quantized Linears and fine-tuned norms back into ``block``."""
    for name in names:
        linear = block.get_submodule(name[len(prefix) :])
        tensors = {s: stored[f"{name}.{s}"] for s in ("codes", "codebooks", "scales")}
        bias = None if linear.bias is None else linear.bias.detach()
        block.set_submodule(name[len(prefix) :], AQLMLinear.from_stored(tensors, bias, nbits, device))
    for key, value in stored.items():
        if key.rsplit(".", 1)[0] not in names:  # a fine-tuned norm
            assign_parameter(block, key[len(prefix) :], value.to(device))


def _norm_parameters(block: nn.Module, modules: dict[str, AQLMLinear]) -> dict[str, nn.Parameter]:
    """The block's floating parameters outside its Linear layers (the norms' weights)."""
    linear_like = (nn.Linear, AQLMLinear)
    found = {}
    for module_name, module in block.named_modules():
        if isinstance(module, linear_like):
            continue
        for attr, param in module.named_parameters(recurse=False):
            if param.dtype.is_floating_point:
                found[f"{module_name}.{attr}" if module_name else attr] = param
    return found


def _finetune_block(block, modules, norms, hidden, kwargs, target, recipe, index) -> tuple[float, float]:
    """Adam on codebooks, scales and norms (codes frozen) towards the source block's outputs.
    The last ``max(1, n // 10)`` sequences are held out; the epoch with the lowest held-out error
    is kept, and training stops after ``finetune_patience`` epochs without improvement."""
    count = hidden.shape[0]
    held_out = max(1, count // 10) if count > 1 else 0
    train_rows = list(range(count - held_out)) or list(range(count))
    valid_rows = list(range(count - held_out, count)) or train_rows
    for param in norms.values():
        param.requires_grad_(True)
    params = [p for m in modules.values() for p in (m.codebooks, m.scales)] + list(norms.values())
    optimizer = torch.optim.Adam(
        params, lr=recipe["finetune_lr"], betas=FINETUNE_BETAS, fused=hidden.is_cuda or None
    )
    generator = torch.Generator().manual_seed(recipe["seed"] * 1_000_003 + index)

    def relative_error(rows) -> float:
        with torch.no_grad():
            num = den = 0.0
            for row in rows:
                out = call_block(block, hidden[row : row + 1], kwargs)
                num += float((out - target[row : row + 1]).square().sum())
                den += float(target[row : row + 1].square().sum())
            return num / den if den else 0.0

    best = before = relative_error(valid_rows)
    best_state = [p.detach().clone() for p in params]
    stale = 0
    batch = recipe["finetune_batch"]
    for _ in range(recipe["finetune_epochs"]):
        order = [train_rows[i] for i in torch.randperm(len(train_rows), generator=generator).tolist()]
        for start in range(0, len(order), batch):
            rows = order[start : start + batch]
            optimizer.zero_grad(set_to_none=True)
            with torch.enable_grad():
                for row in rows:
                    out = call_block(block, hidden[row : row + 1], kwargs)
                    reference = target[row : row + 1]
                    loss = (out - reference).square().mean() / reference.square().mean().clamp_min(1e-30)
                    (loss / len(rows)).backward()
            optimizer.step()
        error = relative_error(valid_rows)
        if error < best:
            best, stale = error, 0
            best_state = [p.detach().clone() for p in params]
        else:
            stale += 1
            if stale >= recipe["finetune_patience"]:
                break
    with torch.no_grad():
        for param, value in zip(params, best_state, strict=True):
            param.copy_(value)
    for param in params:
        param.requires_grad_(False)
    return before, best


def _layer_seed(seed: int, name: str) -> int:
    """A seed per layer from the recipe's seed and the layer's name: a layer quantizes the same
    whether or not the run was resumed before it."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
