"""Convert refuses, before quantizing, a destination whose file system cannot hold the artifact
(issue 18): not an hour of AQLM and then "No space left on device"."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import train_sentencepiece

from qconv import pipeline

# bnb int8 of conftest's tiny Llama (hidden 128, intermediate 256, 2 blocks, 4 heads / 2 KV heads,
# vocab 320, bf16, untied), by hand. Per block the 7 Linears hold 147,456 int8 weights, 1,024 SCB
# float32 scales (4,096 bytes) and 7 one-byte weight_format tensors; copied in bf16: the
# embeddings and lm_head (2 x 81,920 bytes), 2 norms a block (512 bytes) and the final norm (256).
INT8_BYTES = 2 * (147_456 + 4_096 + 7) + 2 * 81_920 + 2 * 512 + 256


def needed(artifact_bytes: int) -> int:
    return -(-artifact_bytes * 102 // 100) + 32 * 2**20  # 2% and 32 MiB, as pipeline.py says why


def refusal(folder, name: str, need: int, free: int, sizes: tuple[str, str]) -> str:
    return (
        f"Error: {folder}: not enough free disk space for {name}: it needs about {sizes[0]} "
        f"({need:,} bytes, the artifact and a margin), {sizes[1]} ({free:,} bytes) are free\n"
    )


def gguf_source(folder):
    """A random bf16 Llama of 2 blocks (hidden 128) with a SentencePiece tokenizer of 512 pieces
    (llama.cpp's "llama" vocabulary), as tests/test_gguf.py makes a bigger one."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir()
    train_sentencepiece(folder, vocab_size=512, dummy_prefix=True)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


@pytest.fixture
def free_space(monkeypatch):
    """What the check sees as free, in bytes; records the folders it asked about."""
    state = {"free": 0, "asked": []}

    def fake(folder):
        state["asked"].append(folder)
        return state["free"]

    monkeypatch.setattr(pipeline, "free_bytes", fake)
    return state


def test_refused_before_anything_is_written(cli, tiny_llama, tmp_path, free_space):
    free_space["free"] = 123_456
    out = tmp_path / "new" / "deeper" / "out"  # its folders do not exist yet: the space is tmp_path's
    result = cli(
        "convert", tiny_llama, "-o", out, "--method", "bnb", "--bits", "8", "--device", "cpu", ok=False
    )
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == refusal(tmp_path, "out", 34_032_035, 123_456, ("34.0 MB", "123.5 KB"))
    assert needed(INT8_BYTES) == 34_032_035
    assert free_space["asked"] == [tmp_path]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qconv-home"]  # no folder, no temp folder
    assert cli.json("ls")[1] == []  # no registry row


def test_exactly_enough_is_enough(cli, tiny_llama, tmp_path, free_space):
    """The estimate is the planned tensors' bytes: with exactly that and the margin free, the
    conversion runs, and what it writes fits in it."""
    out = tmp_path / "out"
    free_space["free"] = needed(INT8_BYTES)
    _, doc = cli.json("convert", tiny_llama, "-o", out, "--method", "bnb", "--bits", "8", "--device", "cpu")
    written = sum(p.stat().st_size for p in out.iterdir())
    assert INT8_BYTES < written <= needed(INT8_BYTES)
    free_space["free"] -= 1
    result = cli("convert", tiny_llama, "-o", tmp_path / "two", "--method", "bnb", "--bits", "8", ok=False)
    assert result.stderr == refusal(tmp_path, "two", 34_032_035, 34_032_034, ("34.0 MB", "34.0 MB"))


def test_json_error(cli, tiny_llama, tmp_path, free_space):
    free_space["free"] = 1_000
    result, doc = cli.json("convert", tiny_llama, "-o", tmp_path / "out", "--method", "hqq", ok=False)
    assert doc["exit_code"] == 2 and doc["error"].startswith(
        f"{tmp_path}: not enough free disk space for out: "
    )


def test_gguf_counts_the_planned_tensors(cli, tmp_path, free_space):
    """A GGUF artifact's estimate is the sum of its planned tensors' bytes (byte_shape of each
    GGML type): here a Q8_0 file of a tiny Llama, refused with a free size just under it."""
    pytest.importorskip("gguf")
    from qconv import gguf_export
    from qconv.formats import get_format
    from qconv.sources import open_source

    src = gguf_source(tmp_path / "src")
    fmt = get_format("gguf")
    recipe = fmt.make_recipe({"type": "Q8_0"})
    with open_source(src) as source:
        model = gguf_export.describe_source(source, tmp_path)
        planned = gguf_export.plan_tensors(source, model, recipe, [])
    q8 = sum(len(t.shape) > 1 and t.ggml_type == "Q8_0" for t in planned)
    assert q8 >= 14  # the Linears at least: Q8_0 is counted at 34 bytes per 32 weights
    total = sum(math.prod(gguf_export.byte_shape(t.shape, t.ggml_type)) for t in planned)
    free_space["free"] = needed(total) - 1
    result = cli("convert", src, "-o", tmp_path / "g", "--method", "gguf", "--type", "Q8_0", ok=False)
    size = f"{needed(total) / 1e6:.1f} MB"
    assert result.stderr == refusal(tmp_path, "g", needed(total), needed(total) - 1, (size, size))
    free_space["free"] = needed(total)
    cli("convert", src, "-o", tmp_path / "g", "--method", "gguf", "--type", "Q8_0", "--no-verify")
    gguf_bytes = sum(p.stat().st_size for p in (tmp_path / "g").glob("*.gguf"))
    assert total < gguf_bytes <= needed(total)  # the tensors, and the metadata within the margin
    assert sum(p.stat().st_size for p in (tmp_path / "g").iterdir()) <= needed(total)


def test_a_disk_that_fills_anyway_leaves_nothing(cli, tiny_llama, tmp_path, monkeypatch):
    """The check passed but the disk filled while writing (another process took the space): one
    line, exit 2, nothing under the final name, no temporary folder, no registry row."""
    import errno
    import os

    from qconv.writer import SafetensorsShardWriter

    add, calls = SafetensorsShardWriter.add, []

    def add_until_full(self, key, value):
        calls.append(key)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.folder / "model.safetensors"))
        return add(self, key, value)

    monkeypatch.setattr(SafetensorsShardWriter, "add", add_until_full)
    out = tmp_path / "out"
    result = cli(
        "convert", tiny_llama, "-o", out, "--method", "bnb", "--bits", "8", "--device", "cpu", ok=False
    )
    assert result.exit_code == 2 and len(calls) == 5
    temp = tmp_path / f".out.qconv-tmp-{os.getpid()}"
    assert result.stderr == f"Error: {temp / 'model.safetensors'}: No space left on device\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qconv-home"]
    assert cli.json("ls")[1] == []
