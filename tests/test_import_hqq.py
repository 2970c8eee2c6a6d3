"""Importing models already quantized with HQQ: hqq's own ``qmodel.pt`` folder (made here by
hqq's ``AutoHQQHFModel`` on the CPU) and transformers 4.x's safetensors layout. The import keeps
every code, scale and zero, so what qconv reads back must equal what hqq's own ``HQQLinear``
dequantizes, and ``qconv.load_model`` must give hqq's own model's logits."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
from safetensors.torch import load_file, save_file
from test_hqq_cli import PROMPT, layer_state, read_folder, tied_qwen2

import qconv
from qconv.errors import ArtifactError
from qconv.formats import all_formats, get_format
from qconv.formats.hqq_layout import parse_layer

# hqq quantizes per linear tag: 4-bit g64 on most, 8-bit v_proj, 2-bit g32 gate_proj, 3-bit
# down_proj grouped along the outputs (axis 0), and o_proj left in float.
QUANT_CONFIG = {
    "self_attn.q_proj": BaseQuantizeConfig(nbits=4, group_size=64),
    "self_attn.k_proj": BaseQuantizeConfig(nbits=4, group_size=64),
    "self_attn.v_proj": BaseQuantizeConfig(nbits=8, group_size=64),
    "self_attn.o_proj": None,
    "mlp.gate_proj": BaseQuantizeConfig(nbits=2, group_size=32),
    "mlp.up_proj": BaseQuantizeConfig(nbits=4, group_size=64),
    "mlp.down_proj": BaseQuantizeConfig(nbits=3, group_size=64, axis=0),
}
LAYERS = 12  # 2 blocks x 6 quantized projections


class Pickled:
    """A class weights-only loading does not know: a file pickling it must be refused."""

    def __init__(self):
        self.payload = 1


@pytest.fixture(scope="module")
def hqq_folder(tmp_path_factory):
    """(folder, model): a tiny Llama quantized and saved by hqq's own AutoHQQHFModel, and the
    quantized model hqq keeps in memory (its float32 compute is the reference)."""
    from conftest import make_tiny_llama
    from hqq.models.hf.base import AutoHQQHFModel
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("hqq")
    source = make_tiny_llama(root / "float")
    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
    AutoHQQHFModel.quantize_model(model, quant_config=QUANT_CONFIG, compute_dtype=torch.float32, device="cpu")
    AutoHQQHFModel.save_quantized(model, str(root / "hqq-qmodel"))
    (root / "hqq-qmodel" / "tokenizer_config.json").write_text("{}\n")  # a support file to carry over
    return root / "hqq-qmodel", model.eval()


def hqq_layers(model) -> dict[str, HQQLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, HQQLinear)}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_nothing_left(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.qconv-*"))


def test_qmodel_import_keeps_hqq_codes_and_runs_like_hqq(cli, hqq_folder, tmp_path):
    folder, model = hqq_folder
    out = tmp_path / "imported"
    _, doc = cli.json("convert", folder, "-o", out, "--device", "cpu")
    assert doc["verify"]["passed"], doc["verify"]
    assert [c["name"] for c in doc["verify"]["checks"]] == ["files", "layers", "loader"]
    assert doc["recipe"] == {
        "method": "hqq",
        "bits": 4,
        "group_size": 64,
        "axis": 1,
        "round_zero": True,
        "imported_from": "hqq-qmodel.pt",
        "mixed": True,
        "dtype": "float32",
        "skip": [],
        "label": "hqq 4-bit g64 (mixed)",
    }
    assert doc["summary"]["quantized_layers"] == LAYERS and doc["summary"]["worst_rel_error"] is None

    manifest = json.loads((out / "qconv.json").read_text())
    assert manifest["source"]["files"]["qmodel.pt"]["sha256"] == sha256(folder / "qmodel.pt")
    assert sorted(manifest["source"]["files"]) == ["config.json", "qmodel.pt", "tokenizer_config.json"]
    assert (out / "tokenizer_config.json").is_file()
    assert manifest["skipped"] == {
        "lm_head": "output embeddings, not quantized in the source",
        "model.layers.0.self_attn.o_proj": "not quantized in the source",
        "model.layers.1.self_attn.o_proj": "not quantized in the source",
    }
    formats = {name: entry["format"] for name, entry in manifest["layers"].items()}
    assert formats["model.layers.0.self_attn.v_proj"] == "hqq 8-bit g64"
    assert formats["model.layers.0.mlp.gate_proj"] == "hqq 2-bit g32"
    assert formats["model.layers.1.mlp.down_proj"] == "hqq 3-bit g64 axis0"
    assert all(entry["rel_error"] is None for entry in manifest["layers"].values())
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "hqq"
    assert config["skip_modules"] == sorted(manifest["skipped"])

    tensors = read_folder(out)
    fmt = get_format("hqq")
    layers = hqq_layers(model)
    assert sorted(layers) == sorted(manifest["layers"])
    for name, theirs in layers.items():
        state = layer_state(tensors, name)
        ours = parse_layer(state)
        # the same codes, scale and zero: hqq's own dequantization, bit for bit
        assert torch.equal(state["W_q"], theirs.W_q), name
        assert torch.equal(ours.dequantize(), theirs.dequantize().reshape(ours.shape)), name
        # the layout `qconv convert --method hqq` writes (scale and zero keep hqq's float32)
        recipe = {"bits": ours.nbits, "group_size": ours.group_size, "axis": ours.axis, "dtype": "float32"}
        specs = fmt.output_specs(ours.shape, recipe)
        assert {k: (v.dtype, tuple(v.shape)) for k, v in state.items()} == specs, name
        # and hqq's own HQQLinear reads it back
        reader = HQQLinear(None, None, compute_dtype=torch.float32, device="cpu", initialize=False)
        reader.load_state_dict(dict(state))
        assert torch.equal(reader.dequantize(), theirs.dequantize()), name

    loaded = qconv.load_model(out, device="cpu", dtype=torch.float32)
    assert type(loaded.model.layers[0].mlp.down_proj).__name__ == "HQQDequantLinear"
    assert type(loaded.model.layers[0].self_attn.o_proj).__name__ == "Linear"
    with torch.no_grad():
        ours, theirs = loaded(PROMPT).logits, model(PROMPT).logits
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-5), (ours - theirs).abs().max()

    # verify without a source checks what an import can check; the registry copes with no errors
    result = cli("verify", out, "--device", "cpu")
    assert f"{LAYERS} layers decode to finite weights" in result.stdout
    _, rows = cli.json("ls")
    assert [(r["id"], r["label"], r["bits"], r["worst_rel_error"], r["verified"]) for r in rows] == [
        (doc["id"], "hqq 4-bit g64 (mixed)", 4, None, True)
    ]


def to_safetensors_source(folder: Path, model, dest: Path) -> Path:
    """The layout transformers 4.x saved: HQQLinear.state_dict() encoded for safetensors, flattened
    under the module names, with float tensors and scale/zero in bfloat16."""
    dest.mkdir()
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, HQQLinear):
            module.encoded_state_dict = True  # hqq's save_quantized turned it off
            for key, value in module.state_dict().items():
                if key in ("scale", "zero"):
                    value = value.to(torch.bfloat16)
                state[f"{name}.{key}"] = value.contiguous()
        elif not list(module.children()):
            for key, value in module.state_dict().items():
                state[f"{name}.{key}"] = value.to(torch.bfloat16).contiguous()
    save_file(state, str(dest / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "hqq", "quant_config": {}, "skip_modules": ["lm_head"]}
    (dest / "config.json").write_text(json.dumps(config))
    return dest


@pytest.fixture(scope="module")
def hqq_safetensors(hqq_folder, tmp_path_factory):
    return to_safetensors_source(*hqq_folder, tmp_path_factory.mktemp("st") / "hqq-safetensors")


def test_transformers_4_safetensors_import_keeps_values_and_dtypes(
    cli, hqq_folder, hqq_safetensors, tmp_path
):
    out = tmp_path / "imported"
    _, doc = cli.json("convert", hqq_safetensors, "-o", out, "--method", "hqq", "--device", "cpu")
    assert doc["verify"]["passed"], doc["verify"]
    assert doc["recipe"]["imported_from"] == "hqq-safetensors"
    assert doc["recipe"]["dtype"] == "bfloat16"
    source, tensors = load_file(str(hqq_safetensors / "model.safetensors")), read_folder(out)
    for name in hqq_layers(hqq_folder[1]):
        for key in ("W_q", "scale", "zero"):
            assert tensors[f"{name}.{key}"].dtype == source[f"{name}.{key}"].dtype
            assert torch.equal(tensors[f"{name}.{key}"].flatten(), source[f"{name}.{key}"].flatten()), name
        assert torch.equal(
            parse_layer(layer_state(tensors, name)).dequantize(),
            parse_layer(layer_state(source, name)).dequantize(),
        )
    assert tensors["model.norm.weight"].dtype == torch.bfloat16


def test_legacy_nested_meta_imports_the_same(cli, hqq_folder, tmp_path):
    """hqq before 0.2 kept a layer's meta fields in one nested ``meta`` dict."""
    folder, _ = hqq_folder
    state = torch.load(folder / "qmodel.pt", weights_only=True)
    for module, fields in state.items():
        if "W_q" in fields:
            meta_keys = ("nbits", "group_size", "shape", "scale", "zero", "axis", "packing")
            state[module] = {**{k: v for k, v in fields.items() if k not in meta_keys}}
            state[module]["meta"] = {k: fields[k] for k in meta_keys}
    legacy = write_qmodel(tmp_path / "legacy", folder, state)
    cli("convert", folder, "-o", tmp_path / "a", "--no-verify", "--no-record")
    cli("convert", legacy, "-o", tmp_path / "b", "--no-verify", "--no-record")
    a, b = read_folder(tmp_path / "a"), read_folder(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- refusals: one line, exit 2, nothing left under OUT -------------------------------------------
def write_qmodel(dest: Path, like: Path, state) -> Path:
    dest.mkdir()
    shutil.copyfile(like / "config.json", dest / "config.json")
    torch.save(state, dest / "qmodel.pt")
    return dest


def drop_zero(state):
    del state["model.layers.0.mlp.down_proj"]["zero"]


def truncate_w_q(state):
    layer = state["model.layers.1.mlp.up_proj"]
    layer["W_q"] = layer["W_q"][:-1].clone()


def seven_bits(state):
    state["model.layers.0.self_attn.q_proj"]["nbits"] = 7


def float_in_a_norm(state):
    state["model.norm"]["eps"] = 1e-6


def list_field(state):
    state["model.layers.0.self_attn.k_proj"]["group_size"] = [64]


@pytest.mark.parametrize(
    "change,message",
    [
        (drop_zero, "layer model.layers.0.mlp.down_proj: missing HQQ field(s) zero"),
        (
            truncate_w_q,
            "layer model.layers.1.mlp.up_proj: W_q is uint8 [255, 64], expected uint8 [256, 64] for 4-bit "
            "[256, 128] group 64 axis 1",
        ),
        (
            seven_bits,
            "layer model.layers.0.self_attn.q_proj: unsupported nbits 7 (qconv reads 1, 2, 3, 4, 5, 6, 8)",
        ),
        (
            float_in_a_norm,
            "model.norm.eps is a float, not a tensor (module 'model.norm' is not an HQQ layer)",
        ),
        (
            list_field,
            "layer model.layers.0.self_attn.k_proj: field 'group_size' is a list, not a tensor or a plain value",
        ),
    ],
)
def test_malformed_qmodel_is_refused_naming_the_layer(cli, hqq_folder, tmp_path, change, message):
    folder, _ = hqq_folder
    state = torch.load(folder / "qmodel.pt", weights_only=True)
    change(state)
    bad = write_qmodel(tmp_path / "bad", folder, state)
    out = tmp_path / "out"
    result = cli("convert", bad, "-o", out, ok=False)
    assert result.exit_code == 2
    assert result.stderr == f"Error: {bad}/qmodel.pt: {message}\n"
    assert_nothing_left(out)


def test_pickled_class_is_refused_without_running_it(cli, hqq_folder, tmp_path):
    folder, _ = hqq_folder
    bad = write_qmodel(
        tmp_path / "bad", folder, {"model.norm": {"weight": torch.ones(4)}, "x": {"y": Pickled()}}
    )
    out = tmp_path / "out"
    result = cli("convert", bad, "-o", out, ok=False)
    assert result.exit_code == 2
    assert result.stderr == (
        f"Error: {bad}/qmodel.pt: cannot be read safely: it needs the Python object "
        f"{Pickled.__module__}.Pickled, and qconv loads pickles only with weights_only=True "
        "(it never runs pickle code)\n"
    )
    assert_nothing_left(out)


@pytest.mark.parametrize("keep", [0.5, 0.0])
def test_truncated_qmodel_is_refused(cli, hqq_folder, tmp_path, keep):
    folder, _ = hqq_folder
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copyfile(folder / "config.json", bad / "config.json")
    data = (folder / "qmodel.pt").read_bytes()
    (bad / "qmodel.pt").write_bytes(data[: int(len(data) * keep)])
    out = tmp_path / "out"
    result = cli("convert", bad, "-o", out, ok=False)
    assert result.exit_code == 2
    assert result.stderr == f"Error: {bad}/qmodel.pt: not a readable torch.save file (truncated or corrupt)\n"
    assert_nothing_left(out)


def test_malformed_safetensors_layer_names_file_and_layer(cli, hqq_safetensors, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(hqq_safetensors, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    del tensors["model.layers.1.self_attn.v_proj.nbits"]
    save_file(tensors, str(bad / "model.safetensors"))
    out = tmp_path / "out"
    result = cli("convert", bad, "-o", out, ok=False)
    assert result.exit_code == 2
    assert result.stderr == (
        f"Error: {bad}/model.safetensors: layer model.layers.1.self_attn.v_proj: missing HQQ field(s) nbits\n"
    )
    assert_nothing_left(out)


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--bits", "4"],
            "--bits does not apply to an import: {src} is already quantized with HQQ and its layers keep "
            "their own settings",
        ),
        (
            ["--method", "hqq", "--group-size", "32", "--skip", "down_proj"],
            "--group-size, --skip does not apply to an import: {src} is already quantized with HQQ and its "
            "layers keep their own settings",
        ),
        (
            ["--method", "bnb"],
            "{src}: already quantized with HQQ; qconv imports it as it is (omit --method or use --method hqq) "
            "and does not re-quantize it with --method bnb",
        ),
    ],
)
def test_import_options_are_refused(cli, hqq_folder, tmp_path, args, message):
    src, _ = hqq_folder
    out = tmp_path / "out"
    result = cli("convert", src, "-o", out, *args, ok=False)
    assert result.exit_code == 2
    assert result.stderr == f"Error: {message.format(src=src)}\n"
    assert_nothing_left(out)


def test_a_float_source_still_needs_a_method(cli, tiny_llama, tmp_path):
    result = cli("convert", tiny_llama, "-o", tmp_path / "out", ok=False)
    assert result.exit_code == 2
    assert (
        result.stderr
        == f"Error: {tiny_llama}: --method is required (choose from {', '.join(sorted(all_formats()))})\n"
    )
    assert_nothing_left(tmp_path / "out")


def test_existing_output_needs_force_and_a_failed_write_leaves_nothing(
    cli, hqq_folder, tmp_path, monkeypatch
):
    from qconv.sources import hqq as source_hqq

    src, _ = hqq_folder
    out = tmp_path / "out"
    out.mkdir()
    result = cli("convert", src, "-o", out, ok=False)
    assert result.exit_code == 2
    assert result.stderr == f"Error: {out}: already exists (use --force to replace it)\n"
    out.rmdir()

    calls = []

    def failing(layer, tensors, dtype):
        calls.append(layer)
        if len(calls) == 3:
            raise ArtifactError("disk on fire")
        return canonical(layer, tensors, dtype)

    canonical = source_hqq.canonical_layer
    monkeypatch.setattr(source_hqq, "canonical_layer", failing)
    result = cli("convert", src, "-o", out, "--no-record", ok=False)
    assert result.exit_code == 2 and result.stderr == "Error: disk on fire\n"
    assert len(calls) == 3
    assert_nothing_left(out)


def test_biases_and_tied_embeddings(cli, tmp_path):
    """Qwen2 has q/k/v biases (kept in HQQLinear's state) and ties lm_head to the embeddings."""
    from hqq.models.hf.base import AutoHQQHFModel

    model = tied_qwen2(layers=1)
    AutoHQQHFModel.quantize_model(
        model,
        quant_config=BaseQuantizeConfig(nbits=4, group_size=64),
        compute_dtype=torch.float32,
        device="cpu",
    )
    AutoHQQHFModel.save_quantized(model, str(tmp_path / "qwen-hqq"))
    out = tmp_path / "imported"
    _, doc = cli.json("convert", tmp_path / "qwen-hqq", "-o", out, "--device", "cpu")
    assert doc["verify"]["passed"], doc["verify"]
    assert doc["recipe"]["mixed"] is False and doc["recipe"]["label"] == "hqq 4-bit g64"
    tensors = read_folder(out)
    assert tensors["model.layers.0.self_attn.q_proj.bias"].dtype == torch.float32
    loaded = qconv.load_model(out, device="cpu", dtype=torch.float32)
    assert loaded.model.layers[0].self_attn.q_proj.bias is not None
    with torch.no_grad():
        ours, theirs = loaded(PROMPT).logits, model(PROMPT).logits
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-5), (ours - theirs).abs().max()
