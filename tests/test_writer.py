"""The streaming shard writer: files safetensors reads, sizes, index, hashes."""

from __future__ import annotations

import hashlib
import json
import re
import struct

import pytest
import torch
from safetensors import safe_open

from qconv.files import parse_size
from qconv.writer import PlannedTensor, SafetensorsShardWriter


def tensors():
    torch.manual_seed(0)
    return {
        "a.weight": torch.randn(64, 32, dtype=torch.bfloat16),
        "a.weight.absmax": torch.rand(32),
        "b.codes": torch.randint(-128, 127, (100, 3), dtype=torch.int8),
        "b.flag": torch.tensor(0, dtype=torch.uint8),
        "c.big": torch.randn(128, 128, dtype=torch.float16),
        "empty": torch.zeros(0, 4),
    }


def planned(expected, unknown=()):
    return [
        PlannedTensor(n, None, None) if n in unknown else PlannedTensor(n, t.dtype, tuple(t.shape))
        for n, t in expected.items()
    ]


@pytest.mark.parametrize(
    "max_bytes,unknown,files",
    [
        (10**9, (), ["model.safetensors"]),
        (5_000, (), ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]),
        # a tensor sized only when it arrives goes into a last small shard
        (10**9, ("b.codes",), ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]),
        (5_000, ("a.weight.absmax", "b.flag"), [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]),
    ],
)
def test_shards_read_back_exactly(tmp_path, max_bytes, unknown, files):
    expected = tensors()
    writer = SafetensorsShardWriter(tmp_path, planned(expected, unknown), max_bytes)
    for name, value in expected.items():
        writer.add(name, value)
    written = writer.close()
    weights = sorted(n for n in written if n.endswith(".safetensors"))
    assert weights == files
    if len(files) > 1:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert sorted(index["weight_map"]) == sorted(expected)
        if unknown:
            assert {index["weight_map"][n] for n in unknown} == {files[-1]}
    seen = {}
    for name in weights:
        data = (tmp_path / name).read_bytes()
        assert written[name] == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        (header_len,) = struct.unpack("<Q", data[:8])
        assert (8 + header_len) % 8 == 0  # data aligned as safetensors aligns it
        with safe_open(str(tmp_path / name), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            for key in f.keys():
                seen[key] = f.get_tensor(key)
    assert sorted(seen) == sorted(expected)
    for name, value in expected.items():
        assert seen[name].dtype == value.dtype and torch.equal(seen[name], value), name
    assert not list(tmp_path.glob(".shard-*"))


@pytest.mark.parametrize(
    "bad,message",
    [
        (
            {"a.weight": torch.zeros(2, 2)},
            "tensor 'a.weight' is torch.float32 [2, 2], planned torch.bfloat16 [64, 32]",
        ),
        ({"nope": torch.zeros(1)}, "tensor 'nope' was not planned"),
        ({"b.codes": torch.zeros(100, 3, dtype=torch.int8)}, "tensor 'b.codes' arrived out of order"),
    ],
)
def test_writer_refuses_what_was_not_planned(tmp_path, bad, message):
    expected = tensors()
    writer = SafetensorsShardWriter(tmp_path, planned(expected), 10**9)
    for name, value in bad.items():
        writer.add(name, value)
    with pytest.raises(RuntimeError, match=re.escape(message)):
        writer.close()


def test_writer_error_surfaces_in_producer(tmp_path):
    writer = SafetensorsShardWriter(tmp_path, [PlannedTensor("x", None, None)], 10**9)
    writer.add("x", torch.zeros(2, dtype=torch.complex64))  # no safetensors dtype: fails at close
    with pytest.raises(KeyError):
        writer.close()


def test_missing_tensor_is_an_error(tmp_path):
    expected = tensors()
    writer = SafetensorsShardWriter(tmp_path, planned(expected), 10**9)
    writer.add("a.weight", expected["a.weight"])
    with pytest.raises(RuntimeError, match="did not receive every planned tensor"):
        writer.close()


@pytest.mark.parametrize(
    "text,value",
    [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("1.5GiB", int(1.5 * 2**30)), ("123", 123), ("64kb", 64_000)],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["lots", "-5GB", "0"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_source_hashes_stream_in_order_or_fall_back(tiny_llama_tied_sharded):
    """Weight files are hashed from the bytes read; a file not read whole is hashed from disk."""
    import hashlib

    from qconv.sources import open_source

    expected = {
        p.name: {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "size": p.stat().st_size}
        for p in tiny_llama_tied_sharded.iterdir()
    }
    with open_source(str(tiny_llama_tied_sharded)) as source:
        source.start_hashing()
        infos = source.tensors()
        for info in infos[:-1]:  # the last tensor is never read: its file's stream is incomplete
            source.read(info.name)
        assert source.file_hashes() == expected
    with open_source(str(tiny_llama_tied_sharded)) as source:
        source.start_hashing()
        for info in reversed(source.tensors()):  # out of order: every stream spoiled
            source.read(info.name)
        assert source.file_hashes() == expected
