"""Calibration for activation-aware methods: the text, and running a model block by block.

The model never exists whole: the architecture is built from the source's config with its
parameters on the meta device, the inputs of the first block are caught by running only what
comes before the blocks, and each block is then materialised from the source on its own, run
over every calibration sequence, and thrown away (as the AQLM and GPTQ papers process models).

Default text: WikiText-2's validation split shipped with qconv (``converter/data``, CC BY-SA
3.0, see its README). Never the test split: that one measures perplexity.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qconv.errors import SourceError, UsageError, literal
from qconv.files import FLOAT_DTYPES
from qconv.modeling import ModelSource, assign_parameter, parameters_on_meta

DEFAULT_TEXT = "wikitext2-validation"
#: what ``--calibration`` also accepts for the shipped text
DEFAULT_TEXT_ALIASES = (DEFAULT_TEXT, "wikitext2")
DEFAULT_TEXT_FILE = "wikitext2-validation.txt"
DEFAULT_SEQLEN = 2048
DEFAULT_TOKENS = 131_072  # 64 sequences of 2048 tokens


def default_text_path() -> Path:
    return Path(str(resources.files("qconv").joinpath("data", DEFAULT_TEXT_FILE)))


def calibration_text(text: str | None) -> str:
    """``--calibration``'s value as recipes record it: the shipped text's name for any of its
    aliases (and None), else the path as given."""
    return DEFAULT_TEXT if text is None or text in DEFAULT_TEXT_ALIASES else text


@dataclass
class CalibrationSet:
    ids: torch.Tensor  # [sequences, seqlen]
    fingerprint: dict[str, Any]  # recorded in the manifest: which text, its sha256, how many tokens


def load_calibration(source: ModelSource, text: str | None, tokens: int, seqlen: int) -> CalibrationSet:
    """Tokenize the calibration text with the source's own tokenizer and cut it into
    ``tokens // seqlen`` non-overlapping sequences of ``seqlen`` tokens, evenly spread over the
    text (deterministic: the same text gives the same sequences)."""
    from transformers import AutoTokenizer

    shipped = calibration_text(text) == DEFAULT_TEXT
    path = default_text_path() if shipped else Path(text).expanduser()
    try:
        data = path.read_bytes()
        content = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(
            "{option} " + literal(f"{path}: cannot read the text ({exc})"), option="calibration"
        ) from None
    if seqlen < 2:
        raise UsageError("the calibration sequences must hold at least 2 tokens")
    wanted = tokens // seqlen
    if wanted < 1:
        raise UsageError(
            "{option} {value}: fewer than one sequence of " + f"{seqlen} tokens",
            option="calib_tokens",
            value=tokens,
        )
    import tempfile

    with tempfile.TemporaryDirectory(prefix="qconv-tokenizer-") as folder:
        source.write_support_files(Path(folder))
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except Exception as exc:  # noqa: BLE001 - any failure means the source ships no usable tokenizer
            # the cause is the source, the way out an option: name it (a UsageError's field)
            detail = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UsageError(
                literal(f"{source.ref}: no usable tokenizer for the calibration text ({detail}); ")
                + "{option} {value} quantizes from the weights alone",
                option="calibration",
                value="none",
            ) from None
    ids = tokenizer(content, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    ids = torch.tensor(ids, dtype=torch.long)
    available = ids.numel() // seqlen
    if available < 1:
        raise UsageError(
            "{option} " + literal(f"{path}: {ids.numel()} tokens, fewer than one sequence of {seqlen}"),
            option="calibration",
        )
    count = min(wanted, available)
    windows = ids[: available * seqlen].view(available, seqlen)
    picked = torch.linspace(0, available - 1, count).round().long().unique()
    fingerprint = {
        "text": DEFAULT_TEXT if shipped else str(path),
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "sequences": int(picked.numel()),
        "seqlen": seqlen,
        "tokens": int(picked.numel() * seqlen),
        "text_tokens": int(ids.numel()),
    }
    return CalibrationSet(windows[picked].clone(), fingerprint)


# -- block by block -----------------------------------------------------------------------------
class _Stop(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for a block while the model runs once: keeps the block's keyword arguments
    (attention mask, rotary embeddings...) and passes the hidden states through."""

    def __init__(self, keep: list, last: bool) -> None:
        super().__init__()
        self.keep, self.last = keep, last

    def forward(self, hidden_states, *args, **kwargs):
        self.keep.append((hidden_states, args, kwargs))
        if self.last:
            raise _Stop
        return hidden_states


class BlockRunner:
    """The source's architecture on the meta device, its blocks materialised one at a time."""

    def __init__(self, source: ModelSource, device: torch.device) -> None:
        from transformers import AutoModelForCausalLM

        self.source, self.device = source, device
        config = source.hf_config()
        config.use_cache = False
        with parameters_on_meta():
            try:
                self.model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            except (ValueError, KeyError) as exc:
                raise SourceError(
                    f"{source.ref}: transformers cannot build a causal LM of it ({exc})"
                ) from None
        self.model.eval()
        for module in self.model.modules():  # rotary frequencies and other real (small) buffers
            for name, buffer in list(module._buffers.items()):
                if buffer is not None and not buffer.is_meta:
                    module._buffers[name] = buffer.to(device)
        self.prefix, self.blocks = self._find_blocks()
        self.names = {t.name for t in source.tensors()}

    def _find_blocks(self) -> tuple[str, nn.ModuleList]:
        """The ModuleList holding most of the model's Linear layers: the decoder blocks."""
        best, best_count = None, 0
        for name, module in self.model.named_modules():
            if isinstance(module, nn.ModuleList) and len(module) > 0:
                count = sum(isinstance(m, nn.Linear) for m in module.modules())
                if count > best_count:
                    best, best_count = (name, module), count
        if best is None:
            raise SourceError(f"{self.source.ref}: no list of decoder blocks found in the architecture")
        return best

    def __len__(self) -> int:
        return len(self.blocks)

    def block_name(self, index: int) -> str:
        return f"{self.prefix}.{index}"

    def _materialise(self, module: nn.Module, prefix: str, only: list[str] | None = None) -> None:
        """Read ``module``'s parameters (or those named in ``only``) from the source (float32,
        on the device)."""
        for name, param in list(module.named_parameters(recurse=True)):
            if only is not None and name not in only:
                continue
            key = f"{prefix}.{name}" if prefix else name
            if key not in self.names:
                # e.g. Mixtral saved with one Linear per expert, which transformers fuses at load
                raise SourceError(
                    f"{self.source.ref}: no tensor {key!r}, which the block needs (checkpoints laid "
                    "out as an earlier transformers saved them are not mapped for calibration; "
                    "--calibration none works)"
                )
            value = self.source.read(key)
            if tuple(value.shape) != tuple(param.shape):
                raise SourceError(
                    f"{self.source.ref}: tensor {key!r} is {list(value.shape)}, expected {list(param.shape)}"
                )
            value = value.to(self.device, torch.float32 if value.dtype in FLOAT_DTYPES else value.dtype)
            assign_parameter(module, name, value)

    @torch.no_grad()
    def first_inputs(self, ids: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
        """The first block's input for every sequence ``[n, seqlen, hidden]`` (float32, on the
        device) and each block's keyword arguments (the same for every sequence: one length)."""
        # Everything outside the blocks runs before the first one may need (embeddings, OPT's
        # positional embedding and projection, Bloom's embedding norm), except a separate output
        # head: read from the source now, dropped again once the inputs are caught.
        output = self.model.get_output_embeddings()
        inputs = {id(p) for p in self.model.get_input_embeddings().parameters()}
        head = {id(p) for p in output.parameters()} - inputs if output is not None else set()
        before = [
            name
            for name, param in self.model.named_parameters()
            if not name.startswith(self.prefix + ".") and id(param) not in head
        ]
        self._materialise(self.model, "", only=before)
        originals = list(self.blocks)
        hidden = []
        kwargs_per_block: list[dict] = []
        try:
            for row in range(ids.shape[0]):
                keep: list = []
                for i in range(len(originals)):
                    self.blocks[i] = _Recorder(keep, last=i == len(originals) - 1)
                try:
                    self.model(input_ids=ids[row : row + 1].to(self.device), use_cache=False)
                except _Stop:
                    pass
                if len(keep) != len(originals):
                    raise SourceError(f"{self.source.ref}: the model did not run through all its blocks")
                hidden.append(keep[0][0].to(torch.float32))
                if row == 0:
                    kwargs_per_block = [dict(kwargs) for _, _, kwargs in keep]
        finally:
            for i, block in enumerate(originals):
                self.blocks[i] = block
        for name in before:
            assign_parameter(self.model, name, self.model.get_parameter(name).to("meta"))
        return torch.cat(hidden), kwargs_per_block

    def load_block(self, index: int) -> nn.Module:
        """Block ``index`` with the source's weights, float32 on the device (a fresh copy)."""
        import copy

        block = copy.deepcopy(self.blocks[index])
        self._materialise(block, self.block_name(index))
        return block

    @staticmethod
    def run(
        block: nn.Module, hidden: torch.Tensor, kwargs: dict, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``block`` over every sequence (one at a time), into ``out`` (default: a new tensor)."""
        out = torch.empty_like(hidden) if out is None else out
        for row in range(hidden.shape[0]):
            out[row : row + 1] = call_block(block, hidden[row : row + 1], kwargs)
        return out


def call_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    result = block(hidden, **kwargs)
    return result[0] if isinstance(result, tuple) else result
