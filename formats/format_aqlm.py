"""AQLM (additive quantization of language models): 1x16, 2x8, 1x8 codebooks over groups of 8
input weights, in the layout transformers + the aqlm package load (``aqlm.QuantizedLinear``).

Per quantized ``nn.Linear`` (shared/FORMATS.md, transformers' integrations/aqlm.py):

- ``codes``: ``[out / out_group, in / in_group, num_codebooks]``, int16 for 16-bit codebooks and
  int8 for 8-bit ones, holding UNSIGNED indices wrapped into the signed type (index 40000 is
  stored as 40000 - 65536; aqlm.utils.unpack_int_data takes them modulo 2^nbits);
- ``codebooks``: float16 ``[num_codebooks, 2^nbits, out_group, in_group]``;
- ``scales``: float16 ``[out / out_group, 1, 1, 1]``;
- weight row block o, input group g = ``scales[o] * sum_c codebooks[c, codes[o, g, c]]``.

``config.json``'s ``linear_weights_not_to_quantize`` names the embeddings and every Linear left
unquantized twice, as ``X.weight`` and ``X``: transformers matches module names, and aqlm's
published checkpoints list parameter names (with only one of the two the loaded lm_head is
random or NaN: FORMATS.md).

The quantizer is AQLM's algorithm: with calibration data (the default: WikiText-2's validation
split shipped with qconv, or ``--calibration FILE``) the model runs block by block, each Linear
is fitted to its inputs' statistics and each block fine-tuned (formats/aqlm_calibrated.py, with
the per-layer maths in formats/aqlm_solver.py); ``--calibration none`` keeps only the data-free
initialisation (residual k-means on the weights). Deterministic for a given ``seed``.
"""

from __future__ import annotations

from typing import Any

import torch

from qconv.calibration import DEFAULT_SEQLEN, DEFAULT_TOKENS, calibration_text
from qconv.errors import SourceError, UsageError
from qconv.formats.aqlm_calibrated import prepare
from qconv.formats.aqlm_layout import (
    OUT_GROUP_SIZE,
    codes_dtype,
    dequantize_layer,
    stored_tensors,
)
from qconv.formats.aqlm_solver import LayerCodes, least_squares_scales, quantize_layer
from qconv.formats.base import (
    Option,
    PrepareContext,
    Prepared,
    QuantFormat,
    check_choice,
    register,
)

# scheme -> (num_codebooks, nbits_per_codebook): the schemes aqlm has CUDA kernels for
SCHEMES = {"1x16": (1, 16), "2x8": (2, 8), "1x8": (1, 8)}
IN_GROUP_SIZES = (
    8,
)  # aqlm's fast kernels: 1x16 takes 8 or 16 (16 is wrong above 4096 inputs), 2x8/1x8 only 8
# aqlm's CUDA kernels silently compute wrong results unless in_features % 64 == 0 (FORMATS.md)
KERNEL_IN_FEATURES_MULTIPLE = 64
KMEANS_ITERS = 25
REFINE_ROUNDS = 2
# The published per-layer settings (shared/FORMATS.md; the reference's main.py and README):
# Adam lr 1e-4 for 100 steps between code searches, stop when an epoch gains less than 1%,
# beam 1 for 16-bit codebooks (65,536 candidates a step already) and 8 for 8-bit ones.
ADAM_STEPS = 100
ADAM_LR = 1e-4
RELATIVE_TOLERANCE = 0.01
MAX_EPOCHS = 100
BEAM_SIZE = {16: 1, 8: 8}
# Block fine-tuning (ours; the reference's defaults are lr 1e-5, batch 32, 5-10 epochs over 1,024
# sequences): with 64 calibration sequences a larger step in smaller batches.
FINETUNE_LR = 1e-4
FINETUNE_BATCH = 8
FINETUNE_EPOCHS = 10
FINETUNE_PATIENCE = 2


class AQLMFormat(QuantFormat):
    def __init__(self) -> None:
        super().__init__(
            name="aqlm",
            description="AQLM additive quantization: 1x16 (~2 bits), 2x8, 1x8 codebooks over groups of 8",
            libraries=("aqlm",),
            quant_method="aqlm",
            stock_loader="transformers",
            extra="aqlm",
            options=(
                Option(
                    "scheme",
                    str,
                    "aqlm: codebooks x bits each (default 1x16)",
                    # no choices here: compressed-tensors declares --scheme too (its own names);
                    # make_recipe checks the value with the same message
                    default="1x16",
                ),
                Option("in_group_size", int, "aqlm: input weights a code covers (default 8)", default=8),
                Option(
                    "calibration",
                    str,
                    "aqlm: calibration text file (default: WikiText-2 validation, shipped, also named "
                    "'wikitext2'), or 'none' for the data-free quantizer",
                ),
                Option("calib_tokens", int, f"aqlm: calibration tokens (default {DEFAULT_TOKENS:,})"),
                Option(
                    "finetune", bool, "aqlm: fine-tune each block after quantizing it (default on)", flag=True
                ),
                Option(
                    "max_epochs",
                    int,
                    f"aqlm: most Adam + code-search rounds a layer gets (default {MAX_EPOCHS}; 0: the "
                    "k-means initialisation only)",
                ),
            ),
        )

    def make_recipe(self, options: dict[str, Any]) -> dict[str, Any]:
        options = self.given_options(options)
        scheme = options["scheme"]
        check_choice(self, "scheme", scheme, tuple(SCHEMES))
        in_group = options["in_group_size"]
        check_choice(self, "in_group_size", in_group, IN_GROUP_SIZES)
        num_codebooks, nbits = SCHEMES[scheme]
        text = options.get("calibration")
        tokens = options.get("calib_tokens")
        max_epochs = options.get("max_epochs")
        if max_epochs is not None and max_epochs < 0:
            raise UsageError("{option} {value}: give 0 or more", option="max_epochs", value=max_epochs)
        if text is not None and text.lower() == "none":
            if tokens is not None or options.get("finetune") or max_epochs:
                raise UsageError(
                    "{condition}: {options} need calibration data",
                    condition=("calibration", "none"),
                    option=("calib_tokens", "finetune", "max_epochs"),
                )
            calibration = None
        else:
            if tokens is not None and tokens < 2:
                raise UsageError(
                    "{option} {value}: give at least one sequence's worth",
                    option="calib_tokens",
                    value=tokens,
                )
            tokens = tokens or DEFAULT_TOKENS
            seqlen = min(DEFAULT_SEQLEN, tokens)
            calibration = {"text": calibration_text(text), "tokens": tokens, "seqlen": seqlen}
        return {
            "method": self.name,
            "scheme": scheme,
            "num_codebooks": num_codebooks,
            "nbits_per_codebook": nbits,
            "in_group_size": in_group,
            "out_group_size": OUT_GROUP_SIZE,
            "calibration": calibration,
            "kmeans_iters": KMEANS_ITERS,
            "refine_rounds": REFINE_ROUNDS,
            "max_epochs": (MAX_EPOCHS if max_epochs is None else max_epochs) if calibration else 0,
            "adam_steps": ADAM_STEPS,
            "lr": ADAM_LR,
            "relative_tolerance": RELATIVE_TOLERANCE,
            "beam_size": BEAM_SIZE[nbits],
            "finetune": bool(calibration) and options.get("finetune") is not False,
            "finetune_lr": FINETUNE_LR,
            "finetune_batch": FINETUNE_BATCH,
            "finetune_epochs": FINETUNE_EPOCHS,
            "finetune_patience": FINETUNE_PATIENCE,
            "seed": 0,
        }

    def label(self, recipe: dict) -> str:
        calibrated = "" if recipe["calibration"] else " data-free"
        finetuned = "+ft" if recipe["finetune"] else ""
        return f"aqlm {recipe['scheme']}{finetuned} g{recipe['in_group_size']}{calibrated}"

    def skip_reason(self, module_name: str, shape: tuple[int, ...], recipe: dict) -> str | None:
        out_features, in_features = shape
        if in_features % KERNEL_IN_FEATURES_MULTIPLE:
            return (
                f"{in_features} input features: aqlm's CUDA kernels compute wrong results unless the "
                f"input features are a multiple of {KERNEL_IN_FEATURES_MULTIPLE}"
            )
        if out_features % OUT_GROUP_SIZE:
            return f"{out_features} outputs do not split into groups of {OUT_GROUP_SIZE}"
        return None

    def output_specs(
        self, shape: tuple[int, ...], recipe: dict
    ) -> dict[str, tuple[torch.dtype, tuple] | None]:
        out_features, in_features = shape
        group, books, nbits = recipe["in_group_size"], recipe["num_codebooks"], recipe["nbits_per_codebook"]
        return {
            "codes": (codes_dtype(nbits), (out_features // OUT_GROUP_SIZE, in_features // group, books)),
            "codebooks": (torch.float16, (books, 2**nbits, OUT_GROUP_SIZE, group)),
            "scales": (torch.float16, (out_features // OUT_GROUP_SIZE, 1, 1, 1)),
        }

    def prepare(self, context: PrepareContext) -> Prepared | None:
        if not context.recipe["calibration"]:
            return None
        return prepare(context)

    def quantize(self, weight: torch.Tensor, recipe: dict, device: torch.device) -> dict[str, torch.Tensor]:
        """Data-free (``--calibration none``, and Linears outside the decoder blocks)."""
        if not torch.isfinite(weight).all():
            raise SourceError("the weight has NaN or infinite values")
        generator = torch.Generator().manual_seed(int(recipe["seed"]))
        state = quantize_layer(weight, None, recipe, generator).state
        books = state.codebooks.half().float()  # the scales are fitted to the codebooks as stored
        scales = least_squares_scales(weight.to(torch.float32), state.codes, books, state.scales)
        return stored_tensors(LayerCodes(state.codes, books, scales), recipe["nbits_per_codebook"])

    def dequantize(self, tensors: dict[str, torch.Tensor], recipe: dict) -> torch.Tensor:
        return dequantize_layer(tensors["codes"], tensors["codebooks"], tensors["scales"])

    def quantization_config(self, recipe: dict, plan: Any) -> dict[str, Any]:
        not_quantized = list(plan.embeddings)
        for module in sorted(plan.skipped):
            not_quantized += [f"{module}.weight", module]
        return {
            "quant_method": "aqlm",
            "in_group_size": recipe["in_group_size"],
            "out_group_size": OUT_GROUP_SIZE,
            "num_codebooks": recipe["num_codebooks"],
            "nbits_per_codebook": recipe["nbits_per_codebook"],
            "linear_weights_not_to_quantize": not_quantized,
        }

    def load_pretrained(self, folder, device: torch.device, dtype: torch.dtype):
        """Stock transformers + aqlm. On the CPU, aqlm sends 8-bit codebooks to a numba kernel
        (the ``aqlm[cpu]`` extra) that races with more than one thread and permutes the codes
        in place on its first call (FORMATS.md); there every layer is pointed at aqlm's own
        generic kernel (``dequantize_gemm``, plain torch) instead. 16-bit codebooks on the CPU
        and everything on CUDA run the kernels aqlm picks."""
        if device.type == "cuda" and dtype not in (torch.float16, torch.bfloat16):
            dtype = torch.float16  # aqlm's CUDA kernels take nothing else
        model = super().load_pretrained(folder, device, dtype)
        if device.type == "cpu":
            from aqlm.inference_kernels.dequantization import dequantize_gemm

            class GenericMatmul:
                @staticmethod
                def apply(x, codes, codebooks, scales, bias):
                    return dequantize_gemm(x, codes, codebooks, scales, bias)

            for module in model.modules():
                if type(module).__name__ == "QuantizedLinear" and module.codebook_size == 256:
                    module.gemv_op = module.gemm_op = GenericMatmul
                    module.use_gemv_rule = lambda x: False
        return model

    def loader_tolerance(self, recipe: dict) -> float:
        # on CUDA aqlm computes in float16 against qconv's float32 reference (on the CPU the
        # two agree exactly); 1e-2 relative still catches a wrong code or codebook
        return 1e-2


register(AQLMFormat())
