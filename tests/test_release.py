"""`qconv release`: a 3-entry plan on a tiny random Llama served by the loopback Hub."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
from conftest import HUB_TOKEN
from test_eval import add_byte_tokenizer
from test_push import assert_token_absent

from qconv import hub as hub_module
from qconv.errors import UsageError
from qconv.registry import open_registry
from qconv.release import load_plan

SOURCE = "tiny-org/tiny-llama"
PLAN = """
base = "tiny-org/tiny-llama"
namespace = "rel"
repo = "{namespace}/{base_name}-{label}"
output_dir = "out"
device = "cpu"

[gates]
max_layer_error = 0.3
max_ppl_increase = 0.5

[eval]
seqlen = 32
max_windows = 2

[[matrix]]
label = "nf4"
method = "bnb"
options = { bits = 4 }

[[matrix]]
label = "hqq4"
method = "hqq"
options = { bits = 4, group_size = 64 }

[[matrix]]
label = "hqq2"
method = "hqq"
options = { bits = 2, group_size = 64 }
"""


@pytest.fixture(scope="module")
def tiny_llama_with_tokenizer(tiny_llama, tmp_path_factory) -> Path:
    """The release measures perplexity on the shipped WikiText-2 text: the source needs a tokenizer."""
    folder = tmp_path_factory.mktemp("src") / "tiny-llama-tok"
    shutil.copytree(tiny_llama, folder)
    return add_byte_tokenizer(folder)


@pytest.fixture
def plan(hub, tiny_llama_with_tokenizer, tmp_path, monkeypatch) -> Path:
    monkeypatch.setattr(hub_module, "RETRY_BACKOFF_S", 0.01)
    files = {p.name: p.read_bytes() for p in tiny_llama_with_tokenizer.iterdir() if p.is_file()}
    hub.add_model(SOURCE, {**files, "README.md": b"---\nlicense: apache-2.0\n---\n"})
    path = tmp_path / "plan.toml"
    path.write_text(PLAN)
    return path


def registry_rows(sql: str) -> list[dict]:
    with open_registry() as registry:
        return [dict(r) for r in registry.db.query(sql)]


def by_label(doc) -> dict[str, dict]:
    return {e["label"]: e for e in doc["entries"]}


def test_release_gates_continues_resumes_and_skips(cli, hub, plan, caplog, qconv_home):
    caplog.set_level(logging.DEBUG)
    outputs = []
    # 1st run: the first entry's push keeps failing (a crash, as far as the plan is concerned),
    # the second is released, the third fails its layer-error gate.
    hub.fail_next("commit", status=500, times=hub_module.RETRY_ATTEMPTS)
    result, doc = cli.json("release", plan, ok=False)
    outputs.append(result)
    assert result.exit_code == 1
    e = by_label(doc)
    assert (e["nf4"]["status"], e["nf4"]["stage"]) == ("failed", "push")
    assert e["hqq4"]["status"] == "released" and e["hqq4"]["ppl_increase"] < 0.5
    assert (e["hqq2"]["status"], e["hqq2"]["stage"]) == ("failed", "gate")
    assert (
        e["hqq2"]["message"].startswith("worst layer error 0.")
        and "> max_layer_error 0.3" in e["hqq2"]["message"]
    )
    assert doc["source_kind"] == "hub" and len(doc["source_revision"]) == 40
    assert set(hub.repos) == {SOURCE, "rel/tiny-llama-nf4", "rel/tiny-llama-hqq4"}
    assert len(hub.commits("rel/tiny-llama-nf4")) == 1 and len(hub.commits("rel/tiny-llama-hqq4")) == 2
    assert [r["repo"] for r in registry_rows("select repo from pushes")] == ["rel/tiny-llama-hqq4"]
    card = hub.file_bytes("rel/tiny-llama-hqq4", "README.md").decode()
    assert "base_model: tiny-org/tiny-llama\nbase_model_relation: quantized\nlicense: apache-2.0\n" in card
    assert "| ppl |" in card and "| ppl_source |" in card
    assert "non-overlapping windows" in card and "qconv.load_model" in card
    assert "dataset: wikitext-2-raw-v1 test" in card  # no [eval] text: the shipped WikiText-2 test text
    # recorded under qconv eval's names, so `qconv ls` shows the perplexity it measured
    listed = {row["id"]: row for row in cli.json("ls")[1]}
    hqq4 = listed[e["hqq4"]["artifact_id"]]
    assert hqq4["ppl"] == pytest.approx(e["hqq4"]["ppl"])
    assert listed[e["nf4"]["artifact_id"]]["ppl"] == pytest.approx(e["nf4"]["ppl"])
    metrics = {r["name"]: r for r in cli.json("show", e["hqq4"]["artifact_id"])[1]["metrics"]}
    assert set(metrics) == {"ppl", "nll", "ppl_source", "nll_source"}
    assert metrics["ppl_source"]["value"] == pytest.approx(e["hqq4"]["ppl_source"])
    assert metrics["nll"]["value"] == pytest.approx(math.log(e["hqq4"]["ppl"]))
    assert metrics["ppl"]["protocol"]["dataset"] == "wikitext-2-raw-v1 test"
    assert (metrics["ppl"]["seqlen"], metrics["ppl"]["windows"]) == (32, 2)
    assert metrics["ppl_source"]["protocol"]["reference"].startswith(f"{SOURCE}@")
    assert e["hqq4"]["ppl_increase"] == pytest.approx(e["hqq4"]["ppl"] / e["hqq4"]["ppl_source"] - 1)
    nf4_id = e["nf4"]["artifact_id"]

    # 2nd run (resume): nf4 resumes from its verified artifact and is pushed; hqq4 is skipped.
    result, doc = cli.json("release", plan, ok=False)
    outputs.append(result)
    e = by_label(doc)
    assert e["nf4"]["status"] == "released" and e["nf4"]["resumed"] and e["nf4"]["artifact_id"] == nf4_id
    assert e["hqq4"]["status"] == "skipped" and e["hqq2"]["status"] == "failed"
    assert len(registry_rows("select id from artifacts")) == 3  # nothing converted twice

    # 3rd run: nothing new anywhere.
    commits_before = sum(1 for r in hub.requests if r.op == "commit")
    result = cli("release", plan, ok=False)
    outputs.append(result)
    assert sum(1 for r in hub.requests if r.op == "commit") == commits_before
    assert "skipped" in result.stdout and "failed (gate)" in result.stdout
    rows = registry_rows(
        "select a.label, p.repo, p.commit_sha from pushes p join artifacts a on a.id = p.artifact_id"
    )
    assert sorted((r["label"], r["repo"]) for r in rows) == [
        ("bnb nf4+dq", "rel/tiny-llama-nf4"),
        ("hqq 4-bit g64", "rel/tiny-llama-hqq4"),
    ]
    for r in rows:
        assert r["commit_sha"] == hub.commits(r["repo"])[0].sha
    folders = [Path(p["path"]) for p in registry_rows("select path from artifacts")]
    assert_token_absent(HUB_TOKEN, outputs, caplog, qconv_home, folders, hub, "rel/tiny-llama-hqq4")


def test_dry_run(cli, hub, plan):
    result, doc = cli.json("release", plan, "--dry-run")
    assert [e["status"] for e in doc["entries"]] == ["would-run"] * 3
    assert not any(r.op not in ("info", "resolve") for r in hub.requests)  # read the source only
    assert registry_rows("select id from artifacts") == []


@pytest.mark.parametrize(
    "old,new,message",
    [
        ('namespace = "rel"', "", "'namespace' is required"),
        ("[gates]", "[gates]\nmax_typo = 1", "unknown gate 'max_typo'"),
        ('label = "hqq2"', 'label = "hqq4"', "label 'hqq4' is used twice"),
    ],
)
def test_plan_errors(cli, tmp_path, old, new, message):
    path = tmp_path / "plan.toml"
    path.write_text(PLAN.replace(old, new))
    with pytest.raises(UsageError, match=message):
        load_plan(path)
    result = cli("release", path, ok=False)
    assert result.exit_code == 2 and result.stderr == f"Error: {path}: " + result.stderr.split(": ", 2)[2]
    assert message in result.stderr


def test_example_plan_parses():
    plan = load_plan(Path(__file__).parent.parent / "examples" / "release-smollm2.toml")
    assert [e.repo for e in plan.entries] == [
        "my-org/SmolLM2-135M-Instruct-nf4",
        "my-org/SmolLM2-135M-Instruct-int8",
        "my-org/SmolLM2-135M-Instruct-hqq4",
        "my-org/SmolLM2-135M-Instruct-hqq3",
    ]
    assert plan.entries[3].gates == {"max_layer_error": 0.25, "max_ppl_increase": 2.0}
    json.dumps([e.options for e in plan.entries])


def test_example_plan_names_the_shipped_text(tmp_path):
    """The example runs from any clone: its eval text is the shipped one, by name, and a plan
    moved elsewhere still means it (a file name stays relative to the plan)."""
    example = Path(__file__).parent.parent / "examples" / "release-smollm2.toml"
    assert load_plan(example).eval["text"] == "wikitext2"
    moved = tmp_path / "plan.toml"
    moved.write_text(example.read_text().replace('text = "wikitext2"', 'text = "mine.txt"'))
    assert load_plan(moved).eval["text"] == str(tmp_path / "mine.txt")
