"""`qconv release --dry-run` matches earlier releases without reading the source's weights: a
local source by the sha256 qconv remembered with the file's stat (qconv.fingerprints), a Hub
source by the sha256 the Hub lists (or the cache names) for its shards. The bytes the dry run feeds
to sha256 are counted; the real run, counted the same way, hashes every weight byte."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from test_release import SOURCE, tiny_llama_with_tokenizer  # noqa: F401 - a fixture

from qconv import fingerprints
from qconv import hub as hub_module

LOCAL_PLAN = """
base = "tiny-src"
namespace = "rel"
output_dir = "out"
device = "cpu"

[eval]
seqlen = 32
max_windows = 2

[[matrix]]
label = "nf4"
method = "bnb"
options = { bits = 4 }

[[matrix]]
label = "hqq2"
method = "hqq"
options = { bits = 2, group_size = 64 }
gates = { max_layer_error = 0.001 }
"""
HQQ4 = """
[[matrix]]
label = "hqq4"
method = "hqq"
options = { bits = 4, group_size = 64 }
"""


class HashedBytes:
    """Counts the bytes fed to hashlib.sha256 (every sha256 qconv computes goes through it)."""

    def __init__(self, monkeypatch):
        self.count = 0
        real = hashlib.sha256
        counter = self

        class Counting:
            def __init__(self, data=b""):
                self._digest = real()
                if data:
                    self.update(data)

            def update(self, data):
                counter.count += memoryview(data).nbytes
                self._digest.update(data)

            def hexdigest(self):
                return self._digest.hexdigest()

            def digest(self):
                return self._digest.digest()

        monkeypatch.setattr(hashlib, "sha256", Counting)


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(hub_module, "RETRY_BACKOFF_S", 0.01)
    # edges of 4 KiB, so that the tiny model's weights (~0.7 MB) are much more than their edges
    monkeypatch.setattr(fingerprints, "EDGE_BYTES", 4096)


@pytest.fixture
def local_plan(hub, fast, tiny_llama_with_tokenizer, tmp_path, monkeypatch) -> Path:  # noqa: F811
    # the source was copied a moment ago: without this its hash would not be remembered (racy)
    monkeypatch.setattr(fingerprints, "RACY_NS", 0)
    shutil.copytree(tiny_llama_with_tokenizer, tmp_path / "tiny-src")
    path = tmp_path / "plan.toml"
    path.write_text(LOCAL_PLAN)
    return path


def weights_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def statuses(doc) -> dict[str, str]:
    return {e["label"]: e["status"] for e in doc["entries"]}


def test_dry_run_of_a_local_source_reads_no_weights(cli, local_plan, monkeypatch):
    source = local_plan.parent / "tiny-src"
    hashed = HashedBytes(monkeypatch)
    _, doc = cli.json("release", local_plan, ok=False)  # hqq2 fails its gate (kept to resume)
    assert statuses(doc) == {"nf4": "released", "hqq2": "failed"}
    assert hashed.count >= weights_size(source)  # the real run hashed the weights wholly

    local_plan.write_text(LOCAL_PLAN + HQQ4)
    hashed.count = 0
    result = cli("release", local_plan, "--dry-run")
    assert hashed.count < weights_size(source) / 4  # config, tokenizer, the weights' edges
    assert result.stdout.splitlines()[:3] == [
        "nf4: would-skip (already released from this source and recipe)",
        "hqq2: would-resume",
        "hqq4: would-run",
    ]
    # the same plan as the full hash gives (what the real run then does)
    _, doc = cli.json("release", local_plan, ok=False)
    assert statuses(doc) == {"nf4": "skipped", "hqq2": "failed", "hqq4": "released"}
    assert by_label(doc)["hqq2"]["resumed"]


def test_dry_run_of_an_edited_source_says_it_will_check(cli, local_plan, monkeypatch):
    """The same size, a few bytes swapped in the middle, mtime set back: the ctime tells."""
    source = local_plan.parent / "tiny-src"
    cli("release", local_plan, ok=False)
    weights = source / "model.safetensors"
    before = weights.stat()
    middle = before.st_size // 2 // 8 * 8
    with open(weights, "r+b") as f:
        f.seek(middle)
        chunk = f.read(128)
        f.seek(middle)
        f.write(chunk[64:] + chunk[:64])
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert weights.stat().st_size == before.st_size and weights.stat().st_mtime_ns == before.st_mtime_ns

    hashed = HashedBytes(monkeypatch)
    result, doc = cli.json("release", local_plan, "--dry-run")
    assert hashed.count < weights_size(source) / 4
    assert [(e["label"], e["status"], e["message"]) for e in doc["entries"]] == [
        (
            "nf4",
            "would-check",
            "model.safetensors changed since qconv last hashed it, or was never hashed here: "
            "the run hashes the source, then skips this entry if it is unchanged",
        ),
        (
            "hqq2",
            "would-check",
            "model.safetensors changed since qconv last hashed it, or was never hashed here: "
            "the run hashes the source, then resumes this entry if it is unchanged",
        ),
    ]
    # the real run (of nf4 alone, to be quick) hashes it wholly, finds it changed, converts again
    local_plan.write_text(LOCAL_PLAN.split('[[matrix]]\nlabel = "hqq2"')[0])
    _, doc = cli.json("release", local_plan)
    assert statuses(doc) == {"nf4": "released"} and not by_label(doc)["nf4"]["resumed"]
    # and now remembers the new bytes
    assert statuses(cli.json("release", local_plan, "--dry-run")[1]) == {"nf4": "would-skip"}


def test_convert_remembers_the_hash_for_a_dry_run(cli, local_plan, monkeypatch):
    source = local_plan.parent / "tiny-src"
    cli(
        "convert",
        source,
        "-o",
        local_plan.parent / "art",
        "--method",
        "bnb",
        "--bits",
        "4",
        "--device",
        "cpu",
    )
    hashed = HashedBytes(monkeypatch)
    _, doc = cli.json("release", local_plan, "--dry-run")
    assert statuses(doc) == {"nf4": "would-resume", "hqq2": "would-run"}
    assert hashed.count < weights_size(source) / 4


def test_a_file_changed_just_before_it_was_hashed_is_not_remembered(cli, local_plan, monkeypatch):
    """Racily clean (git's term): a write in the same timestamp tick as the stat would go unseen."""
    monkeypatch.setattr(fingerprints, "RACY_NS", 3600 * 10**9)  # everything is recent
    source = local_plan.parent / "tiny-src"
    cli(
        "convert",
        source,
        "-o",
        local_plan.parent / "art",
        "--method",
        "bnb",
        "--bits",
        "4",
        "--device",
        "cpu",
    )
    _, doc = cli.json("release", local_plan, "--dry-run")
    assert statuses(doc) == {"nf4": "would-check", "hqq2": "would-run"}


HUB_PLAN = """
base = "tiny-org/tiny-llama"
namespace = "rel"
output_dir = "out"
device = "cpu"

[eval]
seqlen = 32
max_windows = 2

[[matrix]]
label = "nf4"
method = "bnb"
options = { bits = 4 }
"""


def test_dry_run_of_a_hub_source_fetches_no_weights(
    cli,
    hub,
    fast,
    tiny_llama_with_tokenizer,  # noqa: F811 - the fixture imported above
    tmp_path,
    monkeypatch,
):
    import huggingface_hub.constants as constants

    files = {p.name: p.read_bytes() for p in tiny_llama_with_tokenizer.iterdir() if p.is_file()}
    hub.add_model(SOURCE, files)
    plan = tmp_path / "plan.toml"
    plan.write_text(HUB_PLAN)
    _, doc = cli.json("release", plan)
    assert statuses(doc) == {"nf4": "released"}
    weights = len(files["model.safetensors"])
    hashed = HashedBytes(monkeypatch)

    # offline: the cached blob's name is the shard's sha256; no request at all
    assert hub.wait_idle()
    hub.requests.clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _, doc = cli.json("release", plan, "--dry-run")
    assert statuses(doc) == {"nf4": "would-skip"} and hub.requests == []
    assert hashed.count < weights / 4
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    # online, the weights gone from the cache: the Hub's listing says their sha256; not fetched
    for blob in Path(constants.HF_HUB_CACHE).rglob("blobs/*"):
        if blob.stat().st_size == weights:
            blob.unlink()
    hashed.count = 0
    _, doc = cli.json("release", plan, "--dry-run")
    assert statuses(doc) == {"nf4": "would-skip"} and hashed.count < weights / 4
    assert doc["source_revision"] == hub.commits(SOURCE)[0].sha and hub.wait_idle()
    assert not [r.path for r in hub.requests if r.path.endswith(".safetensors")]


def by_label(doc) -> dict[str, dict]:
    return {e["label"]: e for e in doc["entries"]}
