"""Several GGUF file types in one Hub repo (the Hub's convention: ``NAME-Q8_0.gguf``,
``NAME-Q4_0.gguf``... side by side), pushed one `qconv push` at a time to the loopback Hub
(tests/loopback_hub.py) with the real huggingface_hub client: each type's manifest beside its
file, one card for all of them, read back by huggingface_hub's own ModelCard."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import gguf_reference
import pytest
from test_gguf import tiny_source  # noqa: F401 - the module's source model, a fixture
from test_push_resume import kill_when

from qconv import hub as hub_module
from qconv.registry import open_registry

pytestmark = pytest.mark.skipif(not gguf_reference.available(), reason=gguf_reference.MISSING)

REPO = "qconv-test/tiny-llama-GGUF"
BASE = "tiny-org/tiny-llama"
Q8, Q4 = "tiny-llama-Q8_0.gguf", "tiny-llama-Q4_0.gguf"


@pytest.fixture(scope="module")
def made(tiny_source, tmp_path_factory) -> dict[str, Path]:  # noqa: F811
    """Verified Q8_0 and Q4_0 artifacts of one source (llama.cpp's solver: fast), and a second
    Q4_0 made by qconv's solver (other bytes, same file name)."""
    from click.testing import CliRunner

    from qconv.cli import main

    root = tmp_path_factory.mktemp("gguf-push")
    out = {}
    for name, args in {
        "Q8_0": ["--type", "Q8_0", "--solver", "llama"],
        "Q4_0": ["--type", "Q4_0", "--solver", "llama"],
        "Q4_0-qconv": ["--type", "Q4_0", "--solver", "qconv"],
    }.items():
        out[name] = root / name
        result = CliRunner().invoke(
            main,
            ["convert", str(tiny_source), "-o", str(out[name]), "--method", "gguf", *args, "--device", "cpu"],
        )
        assert result.exit_code == 0, result.output
    return out


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setattr(hub_module, "RETRY_BACKOFF_S", 0.01)


def pushes() -> list[dict]:
    with open_registry() as registry:
        return [dict(r) for r in registry.db.query("select * from pushes order by id")]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def commit_requests(hub) -> int:
    return sum(1 for r in hub.requests if r.op == "commit")


def card_of(hub, tmp_path: Path):
    from huggingface_hub import ModelCard, metadata_load

    path = tmp_path / "README.md"
    path.write_bytes(hub.file_bytes(REPO, "README.md"))
    assert metadata_load(path) == ModelCard.load(path).data.to_dict()
    return path.read_text(), metadata_load(path)


def push(cli, folder: Path, *args: str):
    return cli.json("push", folder, "--repo", REPO, "--base-model", BASE, *args)


def test_two_types_share_one_repo_and_one_card(cli, hub, made, tmp_path):
    with open_registry() as registry:  # this test's registry: the Q8_0 artifact and its perplexity
        registry.record_artifact(json.loads((made["Q8_0"] / "qconv.json").read_text()), made["Q8_0"])
    _, q8_eval = cli.json("eval", made["Q8_0"], "--seqlen", "64", "--max-windows", "2")
    assert q8_eval["recorded"]
    result = cli("push", made["Q8_0"], "--repo", REPO, "--base-model", BASE)
    (row,) = pushes()
    first = {"id": row["artifact_id"], "commit_sha": hub.commits(REPO)[0].sha}
    assert result.stdout == (
        f"pushed {made['Q8_0']} to {hub.endpoint}/{REPO}/commit/{first['commit_sha']}\n"
        f"recorded the push of {first['id']}\n"
    )
    assert result.stderr == ""
    # the second type, and the commit's response lost: the retry finds the commit, no second one
    hub.commit_then_drop_response()
    _, second = push(cli, made["Q4_0"])
    assert second["status"] == "committed" and second["attempts"] == 2
    commits = hub.commits(REPO)
    assert len(commits) == 3 and commit_requests(hub) == 2  # the initial commit, then one per push
    assert [first["commit_sha"], second["commit_sha"]] == [commits[1].sha, commits[0].sha]
    assert [(r["artifact_id"], r["commit_sha"]) for r in pushes()] == [
        (first["id"], first["commit_sha"]),
        (second["id"], second["commit_sha"]),
    ]

    remote = hub.files(REPO)
    assert sorted(remote) == sorted(
        [".gitattributes", "README.md", Q4, "tiny-llama-Q4_0.qconv.json", Q8, "tiny-llama-Q8_0.qconv.json"]
    )
    manifests = {t: json.loads((made[t] / "qconv.json").read_text()) for t in ("Q8_0", "Q4_0")}
    for file_type, name in (("Q8_0", Q8), ("Q4_0", Q4)):
        assert sha256(hub.file_bytes(REPO, name)) == manifests[file_type]["files"][name]["sha256"]
    # each type's manifest beside its file: the artifact's own, with the base model of the push
    # and the metrics its card row shows (Q4_0 has none)
    given = {"repo_id": BASE, "revision": None, "origin": "given"}
    pushed_q4 = json.loads(hub.file_bytes(REPO, "tiny-llama-Q4_0.qconv.json"))
    assert pushed_q4 == {**manifests["Q4_0"], "base_model": given}
    pushed_q8 = json.loads(hub.file_bytes(REPO, "tiny-llama-Q8_0.qconv.json"))
    assert {k: v for k, v in pushed_q8.items() if k != "metrics"} == {
        **manifests["Q8_0"],
        "base_model": given,
    }
    ppl = q8_eval["metrics"]["ppl"]
    assert [(m["name"], m["protocol"]["engine"]) for m in pushed_q8["metrics"] if m["name"] == "ppl"] == [
        ("ppl", q8_eval["protocol"]["engine"])
    ]

    card, front = card_of(hub, tmp_path)
    assert front["tags"] == ["qconv", "gguf", "quantized", "Q4_0", "Q8_0"]
    assert (front["base_model"], front["base_model_relation"]) == (BASE, "quantized")
    assert "library_name" not in front
    loader = manifests["Q8_0"]["verify"]["logits"]["loader"]
    assert loader.startswith("llama.cpp (llama-cpp-python ")
    rows = [line for line in card.splitlines() if line.startswith("| `tiny-llama-")]
    assert [row.split(" | ")[:2] for row in rows[:2]] == [[f"| `{Q4}`", "Q4_0"], [f"| `{Q8}`", "Q8_0"]]
    for row, file_type in zip(rows[:2], ("Q4_0", "Q8_0"), strict=True):
        summary = manifests[file_type]["summary"]
        assert f" | {summary['bits_per_weight']:.3f} | " in row and row.endswith(f" | {loader} |")
        assert f" | {summary['worst_rel_error']:.4f} (`{summary['worst_layer']}`) | " in row
    assert f" | {ppl:.4g} | " in rows[1] and " | - | " in rows[0]  # Q4_0: perplexity not measured
    assert f"Verified with {loader}: `{Q4}`, `{Q8}`." in card
    for file_type in ("Q4_0", "Q8_0"):
        assert f"llama-cli -hf {REPO}:{file_type} -p 'Hello'" in card
        assert f"ollama run hf.co/{REPO}:{file_type}" in card
    assert f'llm = Llama.from_pretrained(repo_id="{REPO}", filename="{Q4}")  # Q4_0' in card
    assert f'# llm = Llama.from_pretrained(repo_id="{REPO}", filename="{Q8}")  # Q8_0' in card
    assert f"| `{Q8}` | ppl | {ppl:.4g} | " in card and "engine: llama.cpp (llama-cpp-python " in card

    # pushing either again changes nothing: the card rebuilt from the repo is the same bytes
    for file_type in ("Q8_0", "Q4_0"):
        _, again = push(cli, made[file_type])
        assert again["status"] == "unchanged"
    assert commit_requests(hub) == 2
    # as for any push found unchanged: the registry learns that the Q8_0 artifact is also at the
    # Q4_0 push's commit (the head); Q4_0's own commit is not recorded twice
    assert [(r["artifact_id"], r["commit_sha"]) for r in pushes()][2:] == [
        (first["id"], second["commit_sha"])
    ]


def test_pushing_a_type_again_replaces_only_its_files(cli, hub, made, tmp_path):
    push(cli, made["Q8_0"])
    push(cli, made["Q4_0"])
    before = hub.files(REPO)
    _, doc = push(cli, made["Q4_0-qconv"])
    assert doc["status"] == "committed" and len(hub.commits(REPO)) == 4
    after = hub.files(REPO)
    assert sorted(after) == sorted(before)
    changed = {
        name
        for name in after
        if (after[name].lfs_oid, after[name].blob_id) != (before[name].lfs_oid, before[name].blob_id)
    }
    assert changed == {Q4, "tiny-llama-Q4_0.qconv.json", "README.md"}
    manifest = json.loads((made["Q4_0-qconv"] / "qconv.json").read_text())
    assert sha256(hub.file_bytes(REPO, Q4)) == manifest["files"][Q4]["sha256"]
    assert json.loads(hub.file_bytes(REPO, "tiny-llama-Q4_0.qconv.json"))["recipe"]["solver"] == "qconv"
    card, front = card_of(hub, tmp_path)
    assert front["tags"] == ["qconv", "gguf", "quantized", "Q4_0", "Q8_0"]
    assert "`solver=qconv`" in card and "`solver=llama`" in card  # the new Q4_0, the old Q8_0
    assert len(pushes()) == 3


def test_a_repo_pushed_before_per_type_manifests_keeps_its_type(cli, hub, made, tmp_path):
    """A GGUF repo whose one type's manifest is ``qconv.json`` (qconv's layout before per-type
    manifests): a new type joins it, the card lists both."""
    folder = made["Q8_0"]
    hub.add_model(
        REPO,
        {name: (folder / name).read_bytes() for name in ("qconv.json", "README.md", Q8)},
    )
    _, doc = push(cli, made["Q4_0"])
    assert doc["status"] == "committed"
    card, front = card_of(hub, tmp_path)
    assert front["tags"] == ["qconv", "gguf", "quantized", "Q4_0", "Q8_0"]
    assert f"| `{Q8}` | Q8_0 | " in card and f"| `{Q4}` | Q4_0 | " in card


def test_gguf_push_into_a_safetensors_repo_is_refused_unless_forced(cli, hub, made, tiny_llama, tmp_path):
    bnb = tmp_path / "bnb"
    cli("convert", tiny_llama, "-o", bnb, "--method", "bnb", "--device", "cpu")
    push(cli, bnb)
    label = json.loads((bnb / "qconv.json").read_text())["recipe"]["label"]
    result = cli("push", made["Q4_0"], "--repo", REPO, ok=False)
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == (
        f"Error: {REPO}: holds a {label} artifact (its README.md and qconv.json); a GGUF push would "
        "replace its model card: push to another repo, or mix them with --force\n"
    )
    assert len(hub.commits(REPO)) == 2 and len(pushes()) == 1
    # --force: the GGUF file and its card go in; the safetensors artifact's files stay
    _, doc = push(cli, made["Q4_0"], "--force")
    assert doc["status"] == "committed" and len(pushes()) == 2
    remote = hub.files(REPO)
    assert {"qconv.json", "tiny-llama-Q4_0.qconv.json", Q4} <= set(remote)
    assert any(name.endswith(".safetensors") for name in remote)
    assert card_of(hub, tmp_path)[1]["tags"] == ["qconv", "gguf", "quantized", "Q4_0"]


def test_gguf_push_into_a_repo_with_a_card_qconv_did_not_write_is_refused(cli, hub, made):
    hub.add_model(REPO, {"README.md": b"# my model\n", "model.safetensors": b"\0" * 16})
    result = cli("push", made["Q4_0"], "--repo", REPO, ok=False)
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == (
        f"Error: {REPO}: holds README.md, model.safetensors, not written by qconv; a GGUF push would "
        "replace its model card: push to another repo, or with --force\n"
    )
    assert commit_requests(hub) == 0 and pushes() == []


def test_dry_run_names_the_per_type_manifest(cli, hub, made, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    _, doc = cli.json("push", made["Q4_0"], "--repo", REPO, "--dry-run")
    assert sorted(f["name"] for f in doc["files"]) == ["README.md", Q4, "tiny-llama-Q4_0.qconv.json"]
    assert doc["card"].startswith("---\ntags:\n- qconv\n- gguf\n- quantized\n- Q4_0\n---\n")
    assert hub.requests == []


def test_a_type_without_a_base_model_takes_the_repos(cli, hub, made, tmp_path):
    push(cli, made["Q8_0"])
    result, doc = cli.json("push", made["Q4_0"], "--repo", REPO)
    assert doc["status"] == "committed"
    # the card names the Q8_0 push's base model, so there is nothing to warn about
    assert result.stderr == ""
    assert card_of(hub, tmp_path)[1]["base_model"] == BASE
    assert json.loads(hub.file_bytes(REPO, "tiny-llama-Q4_0.qconv.json"))["base_model"] is None


@pytest.mark.parametrize("which", ["not json", "a bnb manifest"])
def test_a_per_type_manifest_that_is_not_a_gguf_ones_is_refused(cli, hub, made, tiny_llama, tmp_path, which):
    if which == "not json":
        data, why = (
            b"{not json",
            (
                "is not a qconv manifest (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"
            ),
        )
    else:
        bnb = tmp_path / "bnb"
        cli("convert", tiny_llama, "-o", bnb, "--method", "bnb", "--device", "cpu", "--no-verify")
        data, why = (bnb / "qconv.json").read_bytes(), "is not the manifest of a GGUF artifact"
    hub.add_model(REPO, {"other-Q8_0.qconv.json": data})
    head = hub.commits(REPO)[0].sha
    result = cli("push", made["Q4_0"], "--repo", REPO, ok=False)
    assert result.exit_code == 2 and result.stdout == ""
    at = f" at {head[:12]}" if which == "not json" else ""
    assert result.stderr == f"Error: {REPO}: other-Q8_0.qconv.json{at} {why}\n"
    assert commit_requests(hub) == 0 and pushes() == []


def start_push(folder: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "qconv", "push", str(folder), "--repo", REPO, "--base-model", BASE, "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def wait_for(stall, process: subprocess.Popen) -> None:
    while not stall.reached.wait(0.05):
        assert process.poll() is None, process.stderr.read().decode()[-2000:]


def test_a_type_pushed_while_another_push_runs_is_kept(cli, hub, made, tmp_path):
    """Two types pushed at once: the later commit names a stale parent, the Hub refuses it (HTTP
    412), and its retry rebuilds the card at the new head, with the other type in it."""
    stall = hub.stall_next("preupload")  # the Q4_0 push has read the head, then waits here
    process = start_push(made["Q4_0"])
    try:
        wait_for(stall, process)
        _, q8 = push(cli, made["Q8_0"])
        assert q8["status"] == "committed"
        stall.release.set()
        out, err = process.communicate(timeout=240)
    finally:
        stall.release.set()
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err.decode()
    q4 = json.loads(out)
    assert (q4["status"], q4["attempts"]) == ("committed", 2)
    assert q4["retried_errors"] == [
        f"{REPO}: the Hub answered HTTP 412: A commit has happened since. Please refresh and try again."
    ]
    assert [c.sha for c in hub.commits(REPO)[:2]] == [q4["commit_sha"], q8["commit_sha"]]
    assert {Q4, Q8, "tiny-llama-Q4_0.qconv.json", "tiny-llama-Q8_0.qconv.json"} <= set(hub.files(REPO))
    assert card_of(hub, tmp_path)[1]["tags"] == ["qconv", "gguf", "quantized", "Q4_0", "Q8_0"]
    assert len(pushes()) == 2


def test_a_gguf_push_killed_after_its_commit_is_finished_by_running_it_again(cli, hub, made, tmp_path):
    push(cli, made["Q8_0"])
    stall = hub.stall_next("commit", after_commit=True)
    process = start_push(made["Q4_0"])
    try:
        kill_when(hub, process, stall, "the commit")
    finally:
        stall.release.set()
        if process.poll() is None:
            process.kill()
            process.wait()
    commits = hub.commits(REPO)
    assert len(commits) == 3 and len(pushes()) == 1  # its commit landed, unrecorded
    _, doc = push(cli, made["Q4_0"])
    assert (doc["status"], doc["commit_sha"], doc["recorded"]) == ("unchanged", commits[0].sha, True)
    assert len(hub.commits(REPO)) == 3 and commit_requests(hub) == 2
    assert card_of(hub, tmp_path)[1]["tags"] == ["qconv", "gguf", "quantized", "Q4_0", "Q8_0"]
    assert [r["commit_sha"] for r in pushes()] == [commits[1].sha, commits[0].sha]
