"""Calibrated uniform quantization (HQQ, compressed-tensors): GPTQ block by block.

``--calibration FILE|wikitext2`` with ``--method hqq`` or ``--method compressed-tensors`` runs
the shared walk (formats/blockwise.py): for each decoder block, the source block runs over the
calibration sequences while hooks collect ``H = X^T X`` of each quantized Linear's inputs (inside
the attention each token weighted by 1 + the attention it receives, formats/token_weights.py); each
Linear is quantized by GPTQ (formats/gptq.py) into exactly the numbers its format stores, and
replaced in the block by those numbers dequantized; the quantized block's outputs are the next
block's inputs. The format's ``gptq_layer(weight, xtx, recipe)`` gives a layer's stored tensors
(None: it cannot be calibrated, e.g. HQQ groups spanning output rows; such a layer is quantized
from its weights alone, as are Linears outside the blocks).

Each layer's manifest entry gets ``rel_output_error``, ``tr((W - Q) H (W - Q)^T) / tr(W H W^T)``
on the calibration inputs, and ``calibrate_s``; each block its ``quantize_s``.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from qconv.calibration import DEFAULT_SEQLEN, DEFAULT_TOKENS, calibration_text
from qconv.errors import UsageError
from qconv.formats import gptq, token_weights
from qconv.formats.base import Option
from qconv.formats.blockwise import CheckpointedBlocks, calibration_set, walk_blocks
from qconv.formats.gptq import output_error
from qconv.modeling import assign_parameter

SOLVER = "gptq"


def calibration_options(method: str) -> tuple[Option, Option]:
    """``--calibration`` and ``--calib-tokens`` as a uniform method declares them (the same
    declaration as aqlm's: one CLI option serves all)."""
    return (
        Option(
            "calibration",
            str,
            f"{method}: calibration text file, 'wikitext2' (WikiText-2 validation, shipped) or 'none' "
            "(default: data-free)",
        ),
        Option("calib_tokens", int, f"{method}: calibration tokens (default {DEFAULT_TOKENS:,})"),
    )


def calibration_recipe(options: dict[str, Any]) -> dict[str, Any] | None:
    """The recipe's ``calibration`` entry from the given options (None: data-free)."""
    text, tokens = options.get("calibration"), options.get("calib_tokens")
    if text is None or text.lower() == "none":
        if tokens is not None:
            raise UsageError(
                "{option} needs calibration data: add --calibration FILE or wikitext2",
                option="calib_tokens",
            )
        return None
    if tokens is not None and tokens < 2:
        raise UsageError(
            "{option} {value}: give at least one sequence's worth", option="calib_tokens", value=tokens
        )
    tokens = tokens or DEFAULT_TOKENS
    return {"text": calibration_text(text), "tokens": tokens, "seqlen": min(DEFAULT_SEQLEN, tokens)}


def solver_settings() -> dict[str, Any]:
    """GPTQ's constants, recorded in the recipe (so the manifest says what ran)."""
    return {
        "damp": gptq.DAMP,
        "block": gptq.BLOCK,
        "clip_ratios": [min(gptq.RATIOS), max(gptq.RATIOS), len(gptq.RATIOS)],
        "refine_rounds": gptq.REFINE_ROUNDS,
        "act_order": False,
        "token_weights": token_weights.SETTING,
    }


def prepare(context, fmt) -> CheckpointedBlocks:
    recipe, device = context.recipe, context.device
    calib = calibration_set(context)
    suffixes = fmt.output_suffixes(recipe)

    def quantize_block(block, prefix, names, hidden, kwargs, index, target, layers, blocks):
        clock = time.perf_counter()
        statistics = token_weights.collect_statistics(block, prefix, names, hidden, kwargs, target)
        stored: dict[str, torch.Tensor] = {}
        for name in names:
            linear = block.get_submodule(name[len(prefix) :])
            weight = linear.weight.detach()
            xtx = statistics.pop(name)
            started = time.perf_counter()
            tensors = fmt.gptq_layer(weight, xtx, recipe)
            if tensors is None:
                continue
            approx = fmt.dequantize(tensors, recipe)
            layers[name] = {
                "rel_output_error": output_error(weight, approx, xtx),
                "calibrate_s": round(time.perf_counter() - started, 3),
            }
            assign_parameter(linear, "weight", approx.to(device=device, dtype=weight.dtype))
            for suffix in suffixes:
                stored[f"{name}.{suffix}"] = tensors[suffix].detach().to("cpu", copy=True)
            del xtx
        blocks[prefix[:-1]] = {
            "quantize_s": round(time.perf_counter() - clock, 3),
            "token_weights": "attention" if statistics.attention_seen else "uniform",
        }
        return stored

    def install_stored(block, prefix, names, stored):
        for name in names:
            if f"{name}.{suffixes[0]}" not in stored:
                continue  # quantized from its weights alone: the block keeps the source's
            tensors = {s: stored[f"{name}.{s}"] for s in suffixes}
            linear = block.get_submodule(name[len(prefix) :])
            approx = fmt.dequantize(tensors, recipe)
            assign_parameter(linear, "weight", approx.to(device=device, dtype=linear.weight.dtype))

    walk = walk_blocks(context, calib, quantize_block, install_stored)
    calibration: dict[str, Any] = {**calib.fingerprint, "solver": SOLVER, "blocks": walk.blocks}
    return CheckpointedBlocks(context.checkpoint, calibration, walk, suffixes)
