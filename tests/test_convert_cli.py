"""`qconv convert` / `verify` / `ls` end to end on tiny random Llamas, through the real loaders."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import bitsandbytes.functional as F
import pytest
import torch
from safetensors.torch import load_file

from qconv.formats import get_format
from qconv.verify import layer_error


def read_artifact(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def stock_load(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), device_map="cpu")


@pytest.mark.parametrize(
    "flags,label,bits",
    [
        (["--bits", "4"], "bnb nf4+dq", 4),
        (["--bits", "4", "--quant-type", "fp4", "--no-double-quant", "--blocksize", "128"], "bnb fp4", 4),
        (["--bits", "8"], "bnb int8", 8),
    ],
)
def test_convert_loads_in_stock_transformers(cli, tiny_llama, tmp_path, flags, label, bits):
    out = tmp_path / "out"
    result, doc = cli.json("convert", tiny_llama, "-o", out, "--method", "bnb", *flags, "--device", "cpu")
    assert doc["recipe"]["label"] == label and doc["verify"]["passed"]
    assert [c["name"] for c in doc["verify"]["checks"]] == ["layers", "loader"]
    assert doc["verify"]["logits"]["loader_rel_diff"] <= get_format("bnb").loader_tolerance(doc["recipe"])
    names = sorted(p.name for p in out.iterdir())
    # bnb 4-bit's JSON quant_state is sized only after quantizing: it goes in a last small shard
    weights = (
        [
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
        ]
        if bits == 4
        else ["model.safetensors"]
    )
    assert names == sorted(["README.md", "config.json", "generation_config.json", "qconv.json", *weights])
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"] == (bits == 4)
    assert qc["llm_int8_skip_modules"] == ["lm_head"]

    # The packed bytes are bitsandbytes' own for every layer.
    stored = read_artifact(out)
    source = load_file(tiny_llama / "model.safetensors")
    recipe = doc["recipe"]
    module = "model.layers.1.mlp.down_proj"
    if bits == 4:
        packed, state = F.quantize_4bit(
            source[f"{module}.weight"],
            blocksize=recipe["blocksize"],
            compress_statistics=recipe["double_quant"],
            quant_type=recipe["quant_type"],
        )
        assert torch.equal(stored[f"{module}.weight"], packed)
        for key, value in state.as_dict(packed=True).items():
            assert torch.equal(stored[f"{module}.weight.{key}"], value), key
    else:
        int8, scb, _ = F.int8_vectorwise_quant(source[f"{module}.weight"].half())
        assert torch.equal(stored[f"{module}.weight"], int8) and torch.equal(stored[f"{module}.SCB"], scb)
    assert torch.equal(stored["lm_head.weight"], source["lm_head.weight"])
    assert torch.equal(stored["model.norm.weight"], source["model.norm.weight"])

    # Stock transformers (no quantization config passed) builds bnb layers, keeps lm_head dense.
    model = stock_load(out)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == ("Linear4bit" if bits == 4 else "Linear8bitLt")
    assert type(model.lm_head) is torch.nn.Linear

    # The manifest's errors agree with an independent computation through bitsandbytes.
    manifest = json.loads((out / "qconv.json").read_text())
    for name, recorded in manifest["layers"].items():
        weight = source[f"{name}.weight"]
        if bits == 4:
            qs = F.QuantState.from_dict(
                {
                    k.removeprefix(f"{name}.weight."): v
                    for k, v in stored.items()
                    if k.startswith(f"{name}.weight.")
                },
                torch.device("cpu"),
            )
            deq = F.dequantize_4bit(stored[f"{name}.weight"], qs).float()
            tol = 5e-3  # bnb dequantizes into bf16 here; ours is exact in float32
        else:
            deq = stored[f"{name}.weight"].float() * stored[f"{name}.SCB"][:, None] / 127
            tol = 1e-5
        independent = (deq - weight.float()).norm() / weight.float().norm()
        assert recorded["rel_error"] == pytest.approx(independent.item(), rel=tol)
    assert manifest["summary"]["worst_rel_error"] == max(e["rel_error"] for e in manifest["layers"].values())
    expected_files = {p.name for p in out.iterdir()} - {"qconv.json"}
    assert set(manifest["files"]) == expected_files
    for name, entry in {
        **manifest["files"],
        **{f"src/{k}": v for k, v in manifest["source"]["files"].items()},
    }.items():
        path = tiny_llama / name[4:] if name.startswith("src/") else out / name
        assert entry == {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "size": path.stat().st_size}
    assert set(manifest["source"]["files"]) == {"config.json", "generation_config.json", "model.safetensors"}


def test_convert_sharded_tied_source_and_output(cli, tiny_llama_tied_sharded, tmp_path):
    out = tmp_path / "out"
    _, doc = cli.json(
        "convert",
        tiny_llama_tied_sharded,
        "-o",
        out,
        "--method",
        "bnb",
        "--device",
        "cpu",
        "--max-shard-size",
        "60KB",
    )
    assert doc["verify"]["passed"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    config = json.loads((out / "config.json").read_text())
    # tied lm_head is absent from the files but must still be named in the skip list
    assert config["quantization_config"]["llm_int8_skip_modules"] == ["lm_head"]
    assert "lm_head.weight" not in index["weight_map"]
    manifest = json.loads((out / "qconv.json").read_text())
    assert manifest["skipped"] == {"lm_head": "output embeddings (tied to the input embeddings)"}
    # the source's own files: its config, its index and every shard the index names
    source_index = json.loads((tiny_llama_tied_sharded / "model.safetensors.index.json").read_text())
    source_shards = set(source_index["weight_map"].values())
    assert len(source_shards) > 1
    assert set(manifest["source"]["files"]) >= {"config.json", "model.safetensors.index.json", *source_shards}
    model = stock_load(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_skip_pattern_keeps_layers_dense(cli, tiny_llama, tmp_path):
    out = tmp_path / "out"
    _, doc = cli.json(
        "convert",
        tiny_llama,
        "-o",
        out,
        "--method",
        "bnb",
        "--device",
        "cpu",
        "--skip",
        "*.mlp.down_proj",
        "--skip",
        "re:model\\.layers\\.0\\..*_proj",
    )
    manifest = json.loads((out / "qconv.json").read_text())
    assert "model.layers.1.mlp.down_proj" in manifest["skipped"]
    assert "model.layers.0.self_attn.q_proj" in manifest["skipped"]
    assert "model.layers.1.self_attn.q_proj" in manifest["layers"]
    skip = json.loads((out / "config.json").read_text())["quantization_config"]["llm_int8_skip_modules"]
    assert "model.layers.1.mlp.down_proj" in skip and "lm_head" in skip
    model = stock_load(out)
    assert type(model.model.layers[1].mlp.down_proj) is torch.nn.Linear
    assert type(model.model.layers[1].mlp.up_proj).__name__ == "Linear4bit"
    assert doc["verify"]["passed"]


def test_human_output_and_ls(cli, tiny_llama, tmp_path):
    out = tmp_path / "out"
    result = cli("convert", tiny_llama, "-o", out, "--method", "bnb", "--device", "cpu")
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"wrote {out} (bnb nf4+dq, 14 layers, ")
    assert "verify" in result.stdout and "worst layers (10 of 14)" in result.stdout
    assert "verified" in lines[-2] and lines[-1].startswith("recorded as ")
    artifact_id = lines[-1].split()[-1]
    _, rows = cli.json("ls")
    assert [r["id"] for r in rows] == [artifact_id]
    row = rows[0]
    assert row["method"] == "bnb" and row["bits"] == 4 and row["verified"] is True
    assert row["base_model"] == "tiny-llama" and row["path"] == str(out.resolve())
    assert row["bits_per_weight"] == pytest.approx(
        json.loads((out / "qconv.json").read_text())["summary"]["bits_per_weight"]
    )
    table = cli("ls").stdout
    assert "1 artifact" in table and artifact_id in table and "bnb nf4+dq" in table


def test_verify_command_recomputes_and_catches_a_flipped_byte(cli, tiny_llama, tmp_path):
    out = tmp_path / "out"
    cli("convert", tiny_llama, "-o", out, "--method", "bnb", "--device", "cpu", "--no-verify")
    assert cli.json("ls")[1][0]["verified"] is None
    _, doc = cli.json("verify", out, "--device", "cpu")
    assert doc["passed"] and [c["name"] for c in doc["checks"]] == ["files", "layers", "loader"]
    assert cli.json("ls")[1][0]["verified"] is True
    recorded = json.loads((out / "qconv.json").read_text())["layers"]
    for name, e in doc["layers"].items():
        assert e["rel_error"] == pytest.approx(recorded[name]["rel_error"], rel=1e-6)

    # a gate: exit 1, the failing check named
    result, doc = cli.json("verify", out, "--device", "cpu", "--max-rel-error", "0.01", ok=None)
    assert result.exit_code == 1 and not doc["passed"]
    _, rows = cli.json("ls")
    assert rows[0]["verified"] is False  # the failed verify is stored on the artifact's row
    assert "exceed --max-rel-error 0.01" in next(c for c in doc["checks"] if c["name"] == "layers")["detail"]

    # flip one byte inside the packed weights
    path = out / "model-00001-of-00002.safetensors"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x10
    path.write_bytes(bytes(data))
    result = cli("verify", out, "--device", "cpu", "--no-logits", ok=None)
    assert result.exit_code == 1
    assert "model-00001-of-00002.safetensors does not match its sha256" in result.stdout
    assert "verification FAILED" in result.stdout


def test_verify_without_source_reports_recorded_errors(cli, tiny_llama, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_llama, src)
    out = tmp_path / "out"
    cli("convert", src, "-o", out, "--method", "bnb", "--device", "cpu", "--no-record", "--no-verify")
    assert json.loads((out / "qconv.json").read_text())["verify"] is None
    shutil.rmtree(src)
    _, doc = cli.json("verify", out)
    assert doc["passed"] and [c["name"] for c in doc["checks"]] == ["files", "layers"]
    assert "no source to recompute from" in doc["checks"][1]["detail"]


def test_gate_at_convert_exits_1_but_keeps_the_artifact(cli, tiny_llama, tmp_path):
    out = tmp_path / "out"
    result, doc = cli.json(
        "convert",
        tiny_llama,
        "-o",
        out,
        "--method",
        "bnb",
        "--device",
        "cpu",
        "--max-rel-error",
        "0.001",
        "--no-logits",
        ok=None,
    )
    assert result.exit_code == 1 and doc["verify"]["passed"] is False
    assert (out / "qconv.json").is_file()
    _, rows = cli.json("ls")
    assert rows[0]["verified"] is False


def test_conversion_streams_tensor_by_tensor(tiny_llama, tmp_path, monkeypatch):
    """At no point are more than a few source tensors alive: the state dict is never held."""
    import gc
    import weakref

    from qconv import pipeline
    from qconv.sources import HFFolderSource

    alive: weakref.WeakSet = weakref.WeakSet()
    most = []
    original = HFFolderSource.read

    def tracking_read(self, name, pin_memory=False):
        gc.collect()
        most.append(len(alive))
        tensor = original(self, name, pin_memory)
        alive.add(tensor)
        return tensor

    monkeypatch.setattr(HFFolderSource, "read", tracking_read)
    pipeline.convert(str(tiny_llama), tmp_path / "out", "bnb", {}, device="cpu", verify=False)
    # read ahead + the one being quantized + the writer's queue + the one being written
    bound = pipeline.READ_AHEAD + 1 + pipeline.WRITE_QUEUE + 1
    assert len(most) == 21 and max(most) <= bound < 21, most


def test_layer_error_definition():
    ref = torch.tensor([[3.0, 4.0]])
    err = layer_error(ref, torch.tensor([[3.0, 3.0]]))
    assert err["rel_error"] == pytest.approx(0.2) and err["max_abs"] == pytest.approx(1.0)
    assert err["snr_db"] == pytest.approx(20 * torch.log10(torch.tensor(5.0)).item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_fp16_and_fp32_sources(cli, tmp_path, dtype):
    from conftest import make_tiny_llama

    src = make_tiny_llama(tmp_path / "src", dtype=dtype, hidden=64)
    out = tmp_path / "out"
    _, doc = cli.json("convert", src, "-o", out, "--method", "bnb", "--device", "cpu")
    name = str(dtype).removeprefix("torch.")
    assert doc["verify"]["passed"] and doc["recipe"]["dtype"] == name
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == name and config["quantization_config"]["bnb_4bit_compute_dtype"] == name
    assert read_artifact(out)["model.norm.weight"].dtype == dtype
    # --dtype overrides what unquantized tensors keep
    _, doc = cli.json(
        "convert",
        src,
        "-o",
        tmp_path / "bf16",
        "--method",
        "bnb",
        "--bits",
        "8",
        "--dtype",
        "bfloat16",
        "--device",
        "cpu",
    )
    assert (
        doc["verify"]["passed"]
        and read_artifact(tmp_path / "bf16")["model.norm.weight"].dtype == torch.bfloat16
    )
