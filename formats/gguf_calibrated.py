"""Calibrated GGUF (``--method gguf --calibration FILE|wikitext2``): GPTQ block by block into
the very bytes each tensor's GGML type stores.

The walk is the one every calibrated method shares (formats/blockwise.py): per decoder block,
the source block runs over the calibration sequences while hooks collect ``H = X^T X`` of each
Linear's inputs; each Linear whose planned GGML type (llama.cpp's rules for the file type,
``gguf_mix.py``, exactly as the writer plans them) is a block type is quantized by GPTQ into
that type's bytes (formats/gguf_gptq.py), and replaced in the block by those bytes as the
``gguf`` package dequantizes them; the quantized block's outputs feed the next block. The bytes
(uint8, rows in the Hugging Face order) go to the checkpoint folder; the GGUF writer
(qconv.gguf_export) writes them instead of quantizing, with llama.cpp's row permutation of the
tensor (Llama's q/k rotary layout) applied to the rows. Rows are quantized independently, so
permuting them after quantizing gives the bytes quantizing the permuted weight would, and ``H``
(over the input columns) is the same either way.

``H`` weighs each calibration token by how much the sequence reads it, inside the attention
(formats/token_weights.py, where the reason and the measurements are).

Each calibrated layer keeps the data-free solver's bytes where those have the lower weighted
output error (never worse than ``--calibration none`` by the objective).

Tensors outside the blocks (token embeddings, the output head) and those kept in float are
quantized from their weights alone by the recipe's data-free solver, as without calibration.

Each calibrated layer's manifest entry gets ``rel_output_error``, ``tr((W - Q) H (W - Q)^T) /
tr(W H W^T)`` on the calibration inputs (the token-weighted ``H``), ``data_free_rel_output_error``
(the same for the data-free solver's bytes of the same type and weight), ``data_free_kept`` and
``calibrate_s``.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from qconv.formats import gguf_gptq, token_weights
from qconv.formats.blockwise import CheckpointedBlocks, calibration_set, walk_blocks
from qconv.formats.gptq import output_error
from qconv.modeling import assign_parameter

SOLVER = "gptq"
#: the stored tensor of a calibrated layer: its GGUF bytes, rows in the source's order
SUFFIX = "gguf"


def solver_settings() -> dict[str, Any]:
    """What the GGUF GPTQ runs with, recorded in the recipe (so the manifest says what ran)."""
    return {
        "damp": gguf_gptq.DAMP,
        "block": gguf_gptq.BLOCK,
        "block_numbers": "the qconv, llama and an imatrix-style weighted fit's, each also refitted by weighted "
        "least squares; the lowest diag(H)-weighted error kept",
        "act_order": False,
        "token_weights": token_weights.SETTING,
        "data_free_fallback": True,
    }


def prepare(context, fmt) -> CheckpointedBlocks:
    recipe, device = context.recipe, context.device
    types = context.block_types or {}  # the GGUF writer's plan (qconv.gguf_export.block_typed_layers)
    calib = calibration_set(context)

    def quantize_block(block, prefix, names, hidden, kwargs, index, target, layers, blocks):
        clock = time.perf_counter()
        statistics = token_weights.collect_statistics(block, prefix, names, hidden, kwargs, target)
        stored: dict[str, torch.Tensor] = {}
        for name in names:
            xtx = statistics.pop(name)
            if name not in types:
                continue  # kept in float, or not a block type: the writer's data-free path
            ggml_type = types[name][0]
            linear = block.get_submodule(name[len(prefix) :])
            weight = linear.weight.detach().to(torch.float32)
            started = time.perf_counter()
            data, values = gguf_gptq.quantize_gptq_gguf(weight, xtx, ggml_type)
            calibrate_s = time.perf_counter() - started
            data_free = fmt.quantize_as(weight, ggml_type, recipe["solver"])
            data_free_values = gguf_gptq.dequantize_bytes(data_free, ggml_type, tuple(weight.shape))
            error = output_error(weight, values, xtx)
            data_free_error = output_error(weight, data_free_values.to(weight.device), xtx)
            keep_data_free = data_free_error < error
            if keep_data_free:
                data, values = data_free, data_free_values.to(weight.device)
            layers[name] = {
                "rel_output_error": min(error, data_free_error),
                "data_free_rel_output_error": data_free_error,
                "data_free_kept": keep_data_free,
                "calibrate_s": round(calibrate_s, 3),
            }
            assign_parameter(linear, "weight", values.to(device=device, dtype=linear.weight.dtype))
            stored[f"{name}.{SUFFIX}"] = data.to("cpu", copy=True)
            del xtx
        blocks[prefix[:-1]] = {
            "quantize_s": round(time.perf_counter() - clock, 3),
            "token_weights": "attention" if statistics.attention_seen else "uniform",
        }
        return stored

    def install_stored(block, prefix, names, stored):
        for name in names:
            key = f"{name}.{SUFFIX}"
            if key not in stored:
                continue
            linear = block.get_submodule(name[len(prefix) :])
            values = gguf_gptq.dequantize_bytes(stored[key], types[name][0], tuple(linear.weight.shape))
            assign_parameter(linear, "weight", values.to(device=device, dtype=linear.weight.dtype))

    walk = walk_blocks(context, calib, quantize_block, install_stored)
    calibration: dict[str, Any] = {**calib.fingerprint, "solver": SOLVER, "blocks": walk.blocks}
    return CheckpointedBlocks(context.checkpoint, calibration, walk, [SUFFIX])
