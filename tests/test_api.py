"""The library surface, `qconv.Qconv`: convert -> verify -> evaluate -> load on a tiny model, the
registry it carries, and the module-level functions of the default instance."""

from __future__ import annotations

import importlib
import math
import subprocess
import sys

import pytest
import torch
from conftest import make_tiny_llama
from test_eval import add_byte_tokenizer

import qconv
from qconv import Qconv
from qconv.errors import RegistryError
from qconv.registry import artifact_id, open_registry, registry_path


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return add_byte_tokenizer(make_tiny_llama(tmp_path_factory.mktemp("src") / "tiny-api", hidden=64))


def rows(home, table: str) -> list[dict]:
    with open_registry(registry_path(home)) as registry:
        return [dict(row) for row in registry.db.table(table).rows]


def test_convert_verify_evaluate_load_through_one_object(source, tmp_path):
    home, out = tmp_path / "home", tmp_path / "nf4"
    with Qconv(home=home, device="cpu") as api:
        converted = api.convert(source, out, "bnb", {"bits": 4}, logits=False)
        ident = converted.artifact_id
        assert converted.report.passed and ident == artifact_id(converted.manifest, out)
        assert api.registry.path == home / "registry.db"

        report = api.verify(ident[:6], logits=False)
        assert report.passed and report.path == str(out.resolve())

        result = api.evaluate(out, seqlen=32, max_windows=2)
        assert result.recorded and result.artifact_id == ident
        assert result.metrics["ppl"] == pytest.approx(math.exp(result.metrics["nll"]))
        assert (result.protocol["seqlen"], result.protocol["windows"]) == (32, 2)

        model = api.load_model(ident[:8], dtype=torch.float32)
        assert model.config.vocab_size == 320 and next(model.parameters()).device.type == "cpu"

    (artifact,) = rows(home, "artifacts")
    assert (artifact["id"], artifact["path"], artifact["verified"]) == (ident, str(out.resolve()), 1)
    metrics = {row["name"]: row["value"] for row in rows(home, "metrics")}
    assert metrics == pytest.approx({"ppl": result.metrics["ppl"], "nll": result.metrics["nll"]})
    assert rows(home, "layers") and rows(home, "files")


def test_not_recording_leaves_the_registry_unopened(source, tmp_path):
    home = tmp_path / "home"
    api = Qconv(home=home, device="cpu")
    result = api.convert(source, tmp_path / "out", "bnb", {"bits": 8}, verify=False, record=False)
    assert result.artifact_id is None
    model = api.load_model(tmp_path / "out")  # a folder: no registry needed
    assert model is not None and api._registry is None and not home.exists()
    api.close()


def test_a_stale_id_is_refused(source, tmp_path):
    """Recorded, then replaced by an unrecorded conversion: the id is refused, the folder has none."""
    api = Qconv(home=tmp_path / "home", device="cpu")
    out = tmp_path / "out"
    ident = api.convert(source, out, "bnb", {"bits": 8}, verify=False).artifact_id
    # another recipe: the same one converted within the same second would be the same artifact
    api.convert(source, out, "bnb", {"bits": 4}, verify=False, force=True, record=False)
    with pytest.raises(
        RegistryError, match=f"artifact {ident} was recorded at .*, which now holds artifact "
    ):
        api.verify(ident, logits=False)
    result = api.evaluate(out, seqlen=32, max_windows=1)
    assert result.artifact_id is None and not result.recorded
    assert rows(tmp_path / "home", "metrics") == []
    api.close()


def test_module_functions_use_the_default_instance(source, tmp_path, qconv_home, monkeypatch):
    monkeypatch.setattr(qconv, "_default", None)
    out = tmp_path / "out"
    ident = qconv.convert(source, out, "bnb", {"bits": 8}, verify=False, device="cpu").artifact_id
    assert qconv.default_api().registry.path == qconv_home / "registry.db"
    assert qconv.verify(ident, logits=False, device="cpu").passed
    with qconv.open_registry() as registry:
        assert registry.get_artifact(ident)["verified"] is True
    assert qconv.load_model(ident, device="cpu") is not None
    qconv.default_api().close()
    # `qconv.verify` etc. stay the functions after their modules are imported
    for name in ("qconv.evaluate", "qconv.release", "qconv.verify"):
        importlib.import_module(name)
    from qconv.verify import run_verify

    assert callable(run_verify)
    assert [getattr(qconv, name).__module__ for name in qconv.ALIASES] == ["qconv"] * len(qconv.ALIASES)


def test_import_qconv_stays_light():
    code = "import sys, qconv; print(sorted(m for m in ('torch', 'transformers', 'qconv.api') if m in sys.modules))"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        == "[]\n"
    )
