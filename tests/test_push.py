"""`qconv push` against the loopback Hub (tests/loopback_hub.py) with the real huggingface_hub client."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
from conftest import HUB_TOKEN

from qconv import hub as hub_module
from qconv.pipeline import convert
from qconv.registry import open_registry

REPO = "qconv-test/tiny-nf4"


@pytest.fixture(scope="module")
def artifacts(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    """One verified bnb nf4 artifact, one never verified, one that failed verification."""
    root = tmp_path_factory.mktemp("push")
    out = {}
    for name, kwargs in {
        "verified": {},
        "unverified": {"verify": False},
        "failed": {"max_rel_error": 1e-6, "logits": False},
    }.items():
        out[name] = convert(str(tiny_llama), root / name, "bnb", {"bits": 4}, device="cpu", **kwargs).path
    return out


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setattr(hub_module, "RETRY_BACKOFF_S", 0.01)


def pushes() -> list[dict]:
    with open_registry() as registry:
        return [dict(r) for r in registry.db.query("select * from pushes order by id")]


def commit_requests(hub) -> int:
    return sum(1 for r in hub.requests if r.op == "commit")


def test_push_uploads_card_and_files_and_records_the_commit(cli, hub, artifacts):
    folder = artifacts["verified"]
    result, doc = cli.json("push", folder, "--repo", REPO)
    assert doc["status"] == "committed" and doc["recorded"] and doc["attempts"] == 1
    commits = hub.commits(REPO)
    assert len(commits) == 2  # the repo's initial commit, then ours
    assert doc["commit_sha"] == commits[0].sha
    assert doc["url"] == f"{hub.endpoint}/{REPO}/commit/{commits[0].sha}"

    manifest = json.loads((folder / "qconv.json").read_text())
    remote = hub.files(REPO)
    for name, entry in manifest["files"].items():
        if name.endswith(".safetensors"):  # LFS: the oid is the manifest's sha256
            assert remote[name].lfs_oid == entry["sha256"], name
        elif name != "README.md":
            assert hub.file_bytes(REPO, name) == (folder / name).read_bytes(), name
    assert hub.file_bytes(REPO, "qconv.json") == (folder / "qconv.json").read_bytes()
    card = hub.file_bytes(REPO, "README.md").decode()
    # a local folder has no Hub id to name as base_model (a Hub source does: test_release.py);
    # the push says so, naming the option that gives one (tests/test_base_model.py)
    assert card.startswith("---\nlibrary_name: transformers\n") and "base_model" not in card
    assert result.stderr == (
        f"warning: {folder}: no base model recorded, so the model card names none and the Hub links the "
        "repo to no base model; name it with --base-model ORG/NAME\n"
    )
    assert "- qconv\n- bnb\n- quantized\n- 4-bit\n" in card
    assert "AutoModelForCausalLM.from_pretrained" in card and "## Provenance" in card
    # the artifact's own files are untouched (its README.md is the convert-time card)
    assert (
        hashlib.sha256((folder / "README.md").read_bytes()).hexdigest()
        == manifest["files"]["README.md"]["sha256"]
    )

    rows = pushes()
    assert [(r["artifact_id"], r["repo"], r["revision"], r["commit_sha"]) for r in rows] == [
        (doc["id"], REPO, "main", commits[0].sha)
    ]


def test_push_again_makes_no_commit(cli, hub, artifacts):
    cli("push", artifacts["verified"], "--repo", REPO)
    assert commit_requests(hub) == 1
    result = cli("push", artifacts["verified"], "--repo", REPO)
    assert "already holds this artifact" in result.stdout and "no new commit" in result.stdout
    assert commit_requests(hub) == 1 and len(hub.commits(REPO)) == 2
    assert len(pushes()) == 1  # the same commit is not recorded twice


def test_push_by_registry_id_to_a_branch(cli, hub, tiny_llama, tmp_path):
    _, converted = cli.json("convert", tiny_llama, "-o", tmp_path / "a", "--method", "bnb", "--device", "cpu")
    _, doc = cli.json("push", converted["id"][:6], "--repo", REPO, "--revision", "v1")
    assert doc["id"] == converted["id"] and doc["revision"] == "v1"
    assert len(hub.commits(REPO, "v1")) == 2 and len(hub.commits(REPO, "main")) == 1
    assert [(r["artifact_id"], r["revision"]) for r in pushes()] == [(converted["id"], "v1")]


def test_http_500_on_commit_is_retried_into_one_commit(cli, hub, artifacts):
    hub.fail_next("commit", status=500)
    result, doc = cli.json("push", artifacts["verified"], "--repo", REPO)
    assert doc["status"] == "committed" and doc["attempts"] == 2
    assert doc["retried_errors"] == [f"{REPO}: the Hub answered HTTP 500: injected HTTP 500"]
    assert commit_requests(hub) == 2 and len(hub.commits(REPO)) == 2
    assert [r["commit_sha"] for r in pushes()] == [hub.commits(REPO)[0].sha]


def test_connection_dropped_mid_lfs_upload(cli, hub, artifacts):
    hub.drop_connection_next("lfs_put")
    _, doc = cli.json("push", artifacts["verified"], "--repo", REPO)
    assert doc["status"] == "committed" and doc["attempts"] == 1  # the client retried the PUT itself
    # one PUT was cut off; the order in which the server threads log requests is not the order
    # the client sent them (its retry can finish before the dropped handler logs)
    statuses = [r.status for r in hub.requests if r.op == "lfs_put"]
    assert statuses.count(None) == 1 and set(statuses) == {None, 200}
    assert len(hub.commits(REPO)) == 2 and len(pushes()) == 1


def test_commit_applied_but_response_lost_makes_exactly_one_commit(cli, hub, artifacts):
    hub.commit_then_drop_response()
    _, doc = cli.json("push", artifacts["verified"], "--repo", REPO)
    assert doc["status"] == "committed" and doc["attempts"] == 2
    assert "RemoteProtocolError" in doc["retried_errors"][0] or "disconnected" in doc["retried_errors"][0]
    assert commit_requests(hub) == 1  # the second attempt found the commit there: no second commit
    assert len(hub.commits(REPO)) == 2
    assert [r["commit_sha"] for r in pushes()] == [hub.commits(REPO)[0].sha]


def test_slow_responses(cli, hub, artifacts):
    hub.delay_next("info", 0.3, times=2)
    hub.delay_next("commit", 0.5)
    _, doc = cli.json("push", artifacts["verified"], "--repo", REPO)
    assert doc["status"] == "committed" and len(hub.commits(REPO)) == 2


def test_commit_failing_every_time_gives_up_and_records_nothing(cli, hub, artifacts):
    hub.fail_next("commit", status=503, times=10)
    result = cli("push", artifacts["verified"], "--repo", REPO, ok=False)
    assert result.exit_code == 2
    assert result.stderr == f"Error: {REPO}: the Hub answered HTTP 503: injected HTTP 503 (attempt 4)\n"
    assert len(hub.commits(REPO)) == 1 and pushes() == []


def test_wrong_token_is_one_line_exit_2_and_nothing_recorded(cli, hub, artifacts, monkeypatch):
    wrong = "hf_wrongTokenXYZ0123456789"
    monkeypatch.setenv("HF_TOKEN", wrong)
    result = cli("push", artifacts["verified"], "--repo", REPO, ok=False)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"Error: {REPO}: the Hub answered HTTP 401 (the token was refused")
    assert result.stderr.count("\n") == 1 and wrong not in result.output
    assert REPO not in hub.repos and pushes() == []


def test_missing_token(cli, hub, artifacts, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    result = cli("push", artifacts["verified"], "--repo", REPO, ok=False)
    assert result.exit_code == 2
    assert result.stderr == "Error: no Hugging Face token: set HF_TOKEN or log in with `hf auth login`\n"
    assert hub.requests == []


@pytest.mark.parametrize(
    "which,state", [("unverified", "was never verified"), ("failed", "failed verification")]
)
def test_unverified_artifact_is_refused_unless_forced(cli, hub, artifacts, which, state):
    folder = artifacts[which]
    result = cli("push", folder, "--repo", REPO, ok=False)
    assert result.exit_code == 2
    assert result.stderr == (
        f"Error: {folder}: the artifact {state}; run qconv verify, or push anyway with --force\n"
    )
    assert hub.requests == [] and pushes() == []
    _, doc = cli.json("push", folder, "--repo", REPO, "--force")
    assert doc["status"] == "committed" and len(pushes()) == 1


def test_dry_run_touches_nothing(cli, hub, artifacts, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")  # not even needed
    result = cli("push", artifacts["verified"], "--repo", REPO, "--dry-run")
    assert hub.requests == [] and pushes() == []
    assert "would push to qconv-test/tiny-nf4@main" in result.stdout
    assert "model-00001-of-00002.safetensors" in result.stdout and "## Provenance" in result.stdout
    _, doc = cli.json("push", artifacts["verified"], "--repo", REPO, "--dry-run")
    assert doc["status"] == "dry-run" and doc["card"].startswith("---\n")
    assert {f["name"] for f in doc["files"]} >= {"README.md", "qconv.json", "config.json"}


def test_bad_repo_name(cli, hub, artifacts):
    result = cli("push", artifacts["verified"], "--repo", "no-namespace", ok=False)
    assert result.exit_code == 2
    assert result.stderr == "Error: --repo 'no-namespace': expected NAMESPACE/NAME\n"


def test_token_appears_nowhere(cli, hub, artifacts, caplog, qconv_home):
    caplog.set_level(logging.DEBUG)
    hub.fail_next("commit", status=500)
    outputs = [cli("push", artifacts["verified"], "--repo", REPO)]
    outputs.append(cli("push", artifacts["verified"], "--repo", REPO, "--json"))
    # the client did send it (the server checks it)...
    assert all(r.authorization == f"Bearer {HUB_TOKEN}" for r in hub.requests if r.op == "commit")
    # ...and qconv wrote it nowhere
    assert_token_absent(HUB_TOKEN, outputs, caplog, qconv_home, [artifacts["verified"]], hub, REPO)


def assert_token_absent(token, outputs, caplog, qconv_home, folders, hub, repo) -> None:
    needle = token.encode()
    for result in outputs:
        assert token not in result.stdout and token not in result.stderr
    for record in caplog.records:
        assert token not in record.getMessage()
    files = [p for p in Path(qconv_home).rglob("*") if p.is_file()]
    assert any(p.name == "registry.db" for p in files)
    for folder in folders:
        files += [p for p in Path(folder).rglob("*") if p.is_file()]
    for path in files:
        assert needle not in path.read_bytes(), path
    for name in hub.files(repo):
        assert needle not in hub.file_bytes(repo, name), name
