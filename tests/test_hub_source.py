"""`qconv convert ORG/NAME[@REVISION]`: a Hub model as the source, through the loopback Hub."""

from __future__ import annotations

from pathlib import Path

import pytest

SOURCE = "tiny-org/tiny-llama"
CARD = b"---\nlicense: apache-2.0\nlanguage: en\n---\n# tiny\n"


def model_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.fixture
def hub_model(hub, tiny_llama):
    return hub.add_model(SOURCE, {**model_files(tiny_llama), "README.md": CARD})


def test_convert_from_the_hub_records_the_commit(cli, hub, hub_model, tiny_llama, tmp_path):
    _, doc = cli.json("convert", SOURCE, "-o", tmp_path / "out", "--method", "hqq", "--device", "cpu")
    assert doc["verify"]["passed"]
    import json

    manifest = json.loads((tmp_path / "out" / "qconv.json").read_text())
    assert manifest["source"]["kind"] == "hub" and manifest["source"]["ref"] == SOURCE
    assert manifest["source"]["revision"] == hub_model
    assert manifest["source"]["license"] == "apache-2.0"
    assert set(manifest["source"]["files"]) == {"config.json", "generation_config.json", "model.safetensors"}
    downloads = sorted(
        r.path.rsplit("/", 1)[-1] for r in hub.requests if r.op == "resolve" and r.method == "GET"
    )
    assert downloads == ["README.md", "config.json", "generation_config.json", "model.safetensors"]
    _, rows = cli.json("ls")
    assert rows[0]["base_model"] == SOURCE and rows[0]["source_ref"] == SOURCE


def test_a_revision_is_resolved_to_its_commit(cli, hub, hub_model, tiny_llama, tmp_path):
    files = model_files(tiny_llama)
    newer = hub.add_model(SOURCE, {**files, "config.json": files["config.json"].replace(b"  ", b"   ")})
    assert newer != hub_model
    import json

    cli("convert", f"{SOURCE}@{hub_model}", "-o", tmp_path / "old", "--method", "bnb", "--device", "cpu")
    cli("convert", f"{SOURCE}@main", "-o", tmp_path / "new", "--method", "bnb", "--device", "cpu")
    old = json.loads((tmp_path / "old" / "qconv.json").read_text())["source"]
    new = json.loads((tmp_path / "new" / "qconv.json").read_text())["source"]
    assert (old["revision"], new["revision"]) == (hub_model, newer)


def test_offline_works_from_the_cache(cli, hub, hub_model, tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    cli("convert", SOURCE, "-o", tmp_path / "a", "--method", "bnb", "--device", "cpu")
    hub.requests.clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _, doc = cli.json("convert", SOURCE, "-o", tmp_path / "b", "--method", "bnb", "--device", "cpu")
    assert hub.requests == [] and doc["verify"]["passed"]
    import json

    assert json.loads((tmp_path / "b" / "qconv.json").read_text())["source"]["revision"] == hub_model


def test_offline_and_not_cached(cli, hub, tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = cli("convert", "nobody/nothing", "-o", tmp_path / "x", "--method", "bnb", ok=False)
    assert result.exit_code == 2
    assert result.stderr == (
        "Error: nobody/nothing: not in the Hugging Face cache, and HF_HUB_OFFLINE is set (no download)\n"
    )


@pytest.mark.parametrize(
    "ref,message",
    [
        ("nobody/nothing", "nobody/nothing: no such model repo on the Hub (or no access to it)"),
        (f"{SOURCE}@nope", f"{SOURCE}@nope: no such revision in the repo"),
        (
            "tiny-org/pickles",
            "tiny-org/pickles: no safetensors weights in the repo (only pytorch_model.bin...; "
            "qconv reads safetensors only)",
        ),
    ],
)
def test_hub_source_errors(cli, hub, hub_model, tmp_path, ref, message):
    hub.add_model("tiny-org/pickles", {"config.json": b"{}", "pytorch_model.bin": b"x"})
    result = cli("convert", ref, "-o", tmp_path / "x", "--method", "bnb", ok=False)
    assert result.exit_code == 2
    assert result.stderr == f"Error: {message}\n"


# -- verify: the recorded commit, from the cache (issue 18) ------------------------------------
def test_verify_reopens_the_recorded_commit_from_the_cache(cli, hub, hub_model, tmp_path, monkeypatch):
    """main moves on to another model after the conversion, and the cache holds both commits:
    verify compares with the commit the manifest records, offline, and finds the conversion's
    layer errors again; compared with the newer commit the same artifact is far off."""
    import json

    import huggingface_hub.constants as constants
    from conftest import make_tiny_llama

    out = tmp_path / "out"
    cli("convert", SOURCE, "-o", out, "--method", "bnb", "--device", "cpu")
    other = make_tiny_llama(tmp_path / "other", seed=1)
    newer = hub.add_model(SOURCE, {**model_files(other), "README.md": CARD})
    # main (now the newer commit) into the cache too
    cli("convert", SOURCE, "-o", tmp_path / "newer", "--method", "bnb", "--no-verify", "--no-record")
    hub.requests.clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    _, doc = cli.json("verify", out, "--device", "cpu")
    assert doc["passed"] and doc["source"] == f"{SOURCE}@{hub_model}" and hub.requests == []
    recorded = json.loads((out / "qconv.json").read_text())["layers"]
    assert doc["layers"].keys() == recorded.keys()
    for name, layer in doc["layers"].items():
        assert layer["rel_error"] == pytest.approx(recorded[name]["rel_error"], rel=1e-5), name

    _, against_newer = cli.json("verify", out, "--device", "cpu", "--source", f"{SOURCE}@{newer}", ok=None)
    assert against_newer["source"] == f"{SOURCE}@{newer}" and hub.requests == []
    assert min(layer["rel_error"] for layer in against_newer["layers"].values()) > 0.5


def test_verify_never_downloads_the_source_unasked(cli, hub, hub_model, tmp_path, monkeypatch):
    """Not in the cache: the recorded errors are checked and the check says how to compare with
    the source; --source ORG/NAME@COMMIT downloads it and compares."""
    import huggingface_hub.constants as constants

    out = tmp_path / "out"
    cli("convert", SOURCE, "-o", out, "--method", "bnb", "--device", "cpu")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "another-cache"))
    hub.requests.clear()
    pinned = f"{SOURCE}@{hub_model}"

    _, doc = cli.json("verify", out, "--device", "cpu")
    assert hub.requests == [] and doc["passed"] and doc["source"] is None
    (layers,) = [c for c in doc["checks"] if c["name"] == "layers"]
    assert layers["detail"].endswith(
        f" (as recorded at conversion: {pinned} is not in the Hugging Face cache; --source {pinned} downloads it)"
    )
    assert [c["name"] for c in doc["checks"]] == ["files", "layers"]

    _, doc = cli.json("verify", out, "--device", "cpu", "--source", pinned)
    assert doc["passed"] and doc["source"] == pinned
    assert [c["name"] for c in doc["checks"]] == ["files", "layers", "loader"]
    assert any(r.op == "resolve" and r.path.endswith("/model.safetensors") for r in hub.requests)
