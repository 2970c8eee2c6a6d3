"""The block-by-block calibration walk every calibrated method shares, with its checkpoint.

For every decoder block, in order (as the GPTQ and AQLM papers process models):

1. materialise the block from the source (``qconv.calibration.BlockRunner``);
2. unless the checkpoint holds it already: let the method quantize it (``quantize_block``:
   it runs the source block over the calibration inputs, collecting each Linear's ``X^T X``
   with :class:`InputStatistics` (AQLM) or its token-weighted form (formats/token_weights.py:
   GPTQ's methods), and replaces the block's Linears by their quantized versions),
   then write the block's stored tensors to the checkpoint folder (one safetensors file, renamed
   into place) and record it in ``state.json``; a block the checkpoint holds is put back from
   its stored tensors instead (``install_stored``, the same operations as after quantizing);
3. run the quantized block: its outputs are the next block's inputs, so later blocks are fitted
   to what the quantized model really feeds them.

``--resume`` skips the blocks already in the checkpoint, so a resumed run writes the same bytes
as an uninterrupted one (on the CPU; a GPU's kernels may differ in the last bits). The
checkpoint's key hashes the source's tensors, the recipe and the calibration fingerprint: a
checkpoint made from anything else is refused.

Users: formats/aqlm_calibrated.py (AQLM) and formats/uniform_calibrated.py (HQQ and
compressed-tensors with GPTQ).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qconv.calibration import BlockRunner, CalibrationSet, load_calibration
from qconv.errors import UsageError
from qconv.files import fsync_path
from qconv.formats.base import Prepared
from qconv.modeling import context_length

STATE_FILE = "state.json"


def block_file(index: int) -> str:
    return f"block-{index:05d}.safetensors"


def checkpoint_key(source, recipe: dict, calibration: dict) -> str:
    """What must match for a checkpoint to be resumed: source tensors, recipe, calibration."""
    identity = {
        "source": source.ref,
        "tensors": [[t.name, list(t.shape), str(t.dtype)] for t in source.tensors()],
        "recipe": {k: v for k, v in recipe.items() if k != "label"},
        "calibration": calibration,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    fsync_path(tmp)
    os.replace(tmp, path)


def open_checkpoint(folder: Path, key: str, resume: bool) -> dict:
    state_path = folder / STATE_FILE
    if folder.exists() and resume and state_path.is_file():
        try:
            state = json.loads(state_path.read_text())
        except (OSError, json.JSONDecodeError):
            raise UsageError(
                f"{folder}: the checkpoint's {STATE_FILE} is unreadable; delete the folder"
            ) from None
        if state.get("key") != key:
            raise UsageError(
                f"{folder}: the checkpoint was made from another source, recipe or calibration text; "
                "delete it or convert without --resume into another folder"
            )
        return state
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.iterdir():  # a fresh start (no --resume, or nothing to resume)
        stale.unlink()
    state = {"key": key, "blocks_done": 0, "layers": {}}
    write_atomic(state_path, lambda p: p.write_text(json.dumps(state, indent=1)))
    return state


def discard_if_unstarted(folder: Path) -> None:
    """Remove a checkpoint folder whose state records no finished block (a run refused or failed
    before its first block): there is nothing to resume, and leaving it would make the next run ask
    for --resume or --force."""
    try:
        state = json.loads((folder / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return  # not a checkpoint qconv can read: leave it to the user
    if state.get("blocks_done", 0) == 0 and not any(folder.glob("block-*")):
        shutil.rmtree(folder, ignore_errors=True)


def calibration_set(context) -> CalibrationSet:
    """The recipe's calibration text, tokenized and cut into sequences. A model that cannot
    attend past ``limit`` positions (learned or tabulated position embeddings) gets sequences of
    that length, as many more of them; the recipe (hence the manifest) says so."""
    calibration_recipe = context.recipe["calibration"]
    limit = context_length(context.source.hf_config())
    if limit and calibration_recipe["seqlen"] > limit:
        calibration_recipe["seqlen"] = limit
    return load_calibration(
        context.source, calibration_recipe["text"], calibration_recipe["tokens"], calibration_recipe["seqlen"]
    )


class InputStatistics:
    """``H = X^T X / tokens`` of the inputs of Linears of ``block`` (``names`` under ``prefix``),
    accumulated in float64 by forward pre-hooks from construction until :meth:`stop`. Linears
    fed the very same tensor (a block's q/k/v projections, its gate and up projections) share
    one sum: the product is computed once per input, not once per Linear."""

    def __init__(self, block: nn.Module, prefix: str, names: list[str]) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._tokens: dict[str, int] = {}
        self._alias: dict[str, str] = {}  # a Linear -> the one whose sum it shares
        self._last: tuple[torch.Tensor, int, str] | None = None
        self._hooks = [
            block.get_submodule(name[len(prefix) :]).register_forward_pre_hook(
                lambda module, args, name=name: self._add(name, args[0])
            )
            for name in names
        ]

    def _add(self, name: str, inputs: torch.Tensor) -> None:
        last = self._last
        if last is not None and last[0] is inputs and last[1] == inputs._version and last[2] != name:
            target = self._alias.get(last[2], last[2])
            if self._alias.setdefault(name, target) == target:
                return  # the tensor the Linear before added, unchanged: already in the sum
        self._last = (inputs, inputs._version, name)
        owner = self._alias.setdefault(name, name)
        x = inputs.detach().reshape(-1, inputs.shape[-1]).to(torch.float64)
        if owner not in self._sums:
            self._sums[owner] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
            self._tokens[owner] = 0
        self._sums[owner].addmm_(x.t(), x)
        self._tokens[owner] += x.shape[0]

    def stop(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._last = None

    def pop(self, name: str) -> torch.Tensor:
        """``H`` of ``name`` in float32 (the float64 sum is released with its last Linear)."""
        owner = self._alias.pop(name)
        h = (self._sums[owner] / self._tokens[owner]).to(torch.float32)
        if owner not in self._alias.values():
            del self._sums[owner]
        return h


#: ``quantize_block(block, prefix, names, hidden, kwargs, index, target, layers, blocks)``:
#: quantize the Linears ``names`` of ``block`` in place (``target``: a buffer for the source
#: block's outputs; ``layers`` / ``blocks``: per-layer and per-block statistics to fill), and
#: return the tensors to store for the block (CPU, by full name)
QuantizeBlock = Callable[..., dict[str, torch.Tensor]]
#: ``install_stored(block, prefix, names, stored)``: put a checkpointed block's stored tensors
#: back into ``block`` exactly as ``quantize_block`` left it
InstallStored = Callable[..., None]


@dataclass
class Walk:
    """What the walk leaves: the block index holding each stored tensor's owner, and the
    per-layer and per-block statistics (the checkpoint's, for blocks resumed)."""

    where: dict[str, int]
    layers: dict[str, dict]
    blocks: dict[str, dict]


def walk_blocks(
    context, calib: CalibrationSet, quantize_block: QuantizeBlock, install_stored: InstallStored
) -> Walk:
    """Steps 1-3 of the module doc over every block of ``context.source``."""
    folder = context.checkpoint
    key = checkpoint_key(context.source, context.recipe, calib.fingerprint)
    state = open_checkpoint(folder, key, context.resume)
    quantized = [t.module for t in context.plan.quantized]  # the plan's order
    runner = BlockRunner(context.source, context.device)
    hidden, kwargs_per_block = runner.first_inputs(calib.ids)
    scratch = torch.empty_like(hidden)
    where: dict[str, int] = {}
    layers: dict[str, dict] = dict(state.get("layers", {}))
    blocks: dict[str, dict] = dict(state.get("blocks", {}))
    progress = context.progress
    progress.start("calibrate", len(quantized), "layers")
    for index in range(len(runner)):
        prefix = runner.block_name(index) + "."
        names = [m for m in quantized if m.startswith(prefix)]
        block = runner.load_block(index)
        kwargs = kwargs_per_block[index]
        if index < state["blocks_done"]:
            stored = load_file(str(folder / block_file(index)))
            install_stored(block, prefix, names, stored)
        else:
            stored = quantize_block(block, prefix, names, hidden, kwargs, index, scratch, layers, blocks)
            write_atomic(folder / block_file(index), lambda p, s=stored: save_file(s, str(p)))
            state["blocks_done"] = index + 1
            state["layers"], state["blocks"] = layers, blocks
            write_atomic(folder / STATE_FILE, lambda p: p.write_text(json.dumps(state, indent=1)))
        for name in stored:
            owner = _owner(name, names)
            where[owner or name] = index
        with torch.no_grad():
            BlockRunner.run(block, hidden, kwargs, out=scratch)
        hidden, scratch = scratch, hidden
        del block
        progress.advance("calibrate", len(names))
    progress.finish("calibrate")
    return Walk(where, layers, blocks)


def _owner(tensor: str, modules: list[str]) -> str | None:
    """The quantized module a stored tensor belongs to (None: a tensor of its own, e.g. a norm)."""
    return next((m for m in modules if tensor.startswith(m + ".")), None)


class CheckpointedBlocks(Prepared):
    """The result of a calibration walk: each quantized module's stored tensors (and any tensor
    the method replaced, e.g. a fine-tuned norm), read back from the checkpoint folder, one block
    file at a time, by the streaming writer."""

    def __init__(self, folder: Path, calibration: dict[str, Any], walk: Walk, suffixes: list[str]) -> None:
        self.folder, self.calibration, self.suffixes = folder, calibration, suffixes
        self._where, self.layers = walk.where, walk.layers
        self._cache: tuple[int, dict[str, torch.Tensor]] | None = None

    def _block(self, index: int) -> dict[str, torch.Tensor]:
        if self._cache is None or self._cache[0] != index:
            self._cache = (index, load_file(str(self.folder / block_file(index))))
        return self._cache[1]

    def packed(self, module: str) -> dict[str, torch.Tensor] | None:
        """The stored tensors of ``module``, in the format's order; None for a Linear the walk
        did not quantize (outside the decoder blocks): the format quantizes it without data."""
        if module not in self.layers or module not in self._where:
            return None
        tensors = self._block(self._where[module])
        return {s: tensors[f"{module}.{s}"] for s in self.suffixes}

    def replacement(self, name: str) -> torch.Tensor | None:
        index = self._where.get(name)  # tensor names never equal module names: no clash
        return None if index is None else self._block(index)[name]

    def layer_stats(self, module: str) -> dict[str, Any]:
        return self.layers.get(module, {})
