"""A `qconv push` killed outright (SIGKILL: no handler runs) and run again: exactly one new commit
on the (loopback) Hub and one push row in the registry, whichever request the kill cut off."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qconv import hub as hub_module
from qconv.pipeline import convert
from qconv.registry import open_registry

REPO = "qconv-test/tiny-killed"
STARTED: list[subprocess.Popen] = []


@pytest.fixture(scope="module")
def artifact(tiny_llama, tmp_path_factory) -> Path:
    """A verified bnb nf4 artifact with two safetensors shards (two LFS uploads)."""
    folder = convert(
        str(tiny_llama), tmp_path_factory.mktemp("kill") / "art", "bnb", {"bits": 4}, device="cpu"
    )
    assert len(list(folder.path.glob("*.safetensors"))) == 2
    return folder.path


@pytest.fixture(autouse=True)
def no_process_left(monkeypatch):
    monkeypatch.setattr(hub_module, "RETRY_BACKOFF_S", 0.01)
    yield
    while STARTED:
        process = STARTED.pop()
        if process.poll() is None:
            process.kill()
            process.wait()


def start_push(folder: Path) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "qconv", "push", str(folder), "--repo", REPO],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    STARTED.append(process)
    return process


def kill_when(hub, process: subprocess.Popen, stall, what: str) -> None:
    """SIGKILL ``process`` once the Hub holds its stalled request, then let the request go."""
    deadline = time.monotonic() + 240
    while not stall.reached.wait(0.05):
        if process.poll() is not None:
            pytest.fail(
                f"exited {process.returncode} before {what}: {process.stderr.read().decode()[-2000:]}"
            )
        assert time.monotonic() < deadline, f"no {what} after 240 s"
    process.kill()
    process.wait(timeout=30)
    stall.release.set()
    assert stall.finished.wait(30)  # its request is logged before the test looks at the log
    assert hub.wait_idle()  # and every other request of the killed process is done with
    assert process.returncode == -signal.SIGKILL


def pushes() -> list[dict]:
    with open_registry() as registry:
        return [dict(r) for r in registry.db.query("select * from pushes order by id")]


def staging(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if ".qconv-push-" in p.name)


def shard_oids(folder: Path) -> set[str]:
    return {hub_module.sha256_file(p) for p in folder.glob("*.safetensors")}


def test_killed_mid_lfs_upload_then_run_again(cli, hub, artifact):
    stall = hub.stall_next("lfs_put")
    kill_when(hub, start_push(artifact), stall, "the first LFS upload")
    # killed outright: no commit, no row; its staging folder of hard links is left behind
    assert len(hub.commits(REPO)) == 1 and pushes() == []
    assert len(staging(artifact)) == 1
    uploaded_before = set(hub.repos[REPO].lfs)  # the other shard's PUT may have finished meanwhile
    hub.requests.clear()

    result = cli("push", artifact, "--repo", REPO)
    assert hub.wait_idle()  # every request of that run is in the log
    commits = hub.commits(REPO)
    assert len(commits) == 2  # the repo's initial commit, then exactly one of ours
    assert result.stdout == (
        f"pushed {artifact} to {hub.endpoint}/{REPO}/commit/{commits[0].sha}\n"
        f"recorded the push of {pushes()[0]['artifact_id']}\n"
    )
    # the Hub already held what the killed run had uploaded: only the rest was sent
    put = {r.path.rsplit("/", 1)[1] for r in hub.requests if r.op == "lfs_put"}
    assert put == shard_oids(artifact) - uploaded_before
    assert sum(1 for r in hub.requests if r.op == "commit") == 1
    assert [(r["repo"], r["commit_sha"]) for r in pushes()] == [(REPO, commits[0].sha)]
    assert staging(artifact) == []  # the dead run's staging folder was removed too

    result = cli("push", artifact, "--repo", REPO)  # and a third run changes nothing
    assert result.stdout.startswith(f"{REPO}@main already holds this artifact at {commits[0].sha}")
    assert len(hub.commits(REPO)) == 2 and len(pushes()) == 1


def test_killed_while_the_commit_waits_then_run_again(cli, hub, artifact):
    """Killed with every LFS file uploaded and the commit request not yet applied: the second run
    sends no file again and commits once."""
    stall = hub.stall_next("commit")
    kill_when(hub, start_push(artifact), stall, "the commit")
    assert len(hub.commits(REPO)) == 1 and set(hub.repos[REPO].lfs) == shard_oids(artifact)
    hub.requests.clear()

    _, doc = cli.json("push", artifact, "--repo", REPO)
    assert hub.wait_idle()  # every request of that run is in the log
    commits = hub.commits(REPO)
    assert (doc["status"], doc["commit_sha"], len(commits)) == ("committed", commits[0].sha, 2)
    assert [r.op for r in hub.requests if r.op in ("lfs_put", "commit")] == ["commit"]
    assert [(r["repo"], r["commit_sha"]) for r in pushes()] == [(REPO, commits[0].sha)]


def test_killed_after_the_commit_landed_then_run_again(cli, hub, artifact):
    """The commit is on the Hub but the process died before it could record it: the second run
    finds the remote head holding the artifact, makes no commit, and records that one."""
    stall = hub.stall_next("commit", after_commit=True)
    kill_when(hub, start_push(artifact), stall, "the commit")
    commits = hub.commits(REPO)
    assert len(commits) == 2 and pushes() == []
    hub.requests.clear()

    _, doc = cli.json("push", artifact, "--repo", REPO)
    assert hub.wait_idle()  # every request of that run is in the log
    assert (doc["status"], doc["commit_sha"], doc["recorded"]) == ("unchanged", commits[0].sha, True)
    assert not any(r.op in ("preupload", "lfs_put", "commit") for r in hub.requests)
    assert len(hub.commits(REPO)) == 2
    assert [(r["artifact_id"], r["commit_sha"]) for r in pushes()] == [(doc["id"], commits[0].sha)]
    result = cli("push", artifact, "--repo", REPO)
    assert result.stdout == f"{REPO}@main already holds this artifact at {commits[0].sha}: no new commit\n"
    assert len(pushes()) == 1


def test_a_running_push_keeps_its_staging_folder(artifact, tmp_path):
    """Only folders of processes that are gone are removed: a concurrent push keeps its own."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    STARTED.append(sleeper)
    live = artifact.parent / f".{artifact.name}.qconv-push-{sleeper.pid}-abc"
    dead = artifact.parent / f".{artifact.name}.qconv-push-{_dead_pid()}-def"
    other = artifact.parent / ".other.qconv-push-1-ghi"
    for folder in (live, dead, other):
        folder.mkdir()
    try:
        assert hub_module.remove_stale_staging(artifact) == [dead]
        assert live.is_dir() and other.is_dir() and not dead.exists()
    finally:
        for folder in (live, other):
            folder.rmdir()


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid
