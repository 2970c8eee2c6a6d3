"""The example release plans run from a fresh clone as they are: `qconv release examples/X.toml
--dry-run` in a copy of examples/ alone (no ../shared, nothing else of the developer's), its Hub base
served by the loopback Hub as a tiny model of the same name."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_eval import add_byte_tokenizer

from qconv.evaluate import is_shipped_text
from qconv.release import load_plan
from qconv.sources import parse_hub_ref

EXAMPLES = Path(__file__).parent.parent / "examples"
PLANS = sorted(EXAMPLES.glob("*.toml"))


@pytest.fixture(scope="module")
def tiny_with_tokenizer(tiny_llama, tmp_path_factory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("ex") / "tiny"
    shutil.copytree(tiny_llama, folder)
    add_byte_tokenizer(folder)
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_there_are_examples():
    assert [p.name for p in PLANS] == ["release-smollm2.toml"]


@pytest.mark.parametrize("example", PLANS, ids=lambda p: p.name)
def test_example_plan_runs_from_a_fresh_clone(cli, hub, tiny_with_tokenizer, tmp_path, monkeypatch, example):
    clone = tmp_path / "clone"
    shutil.copytree(EXAMPLES, clone / "examples")
    monkeypatch.chdir(clone)
    relative = Path("examples") / example.name
    plan = load_plan(relative)
    # everything it names is a Hub id, a text qconv ships, or lies inside the clone
    inside = clone.resolve()
    if parse_hub_ref(plan.base) is not None and not Path(plan.base).exists():
        hub.add_model(plan.base, tiny_with_tokenizer)
    else:
        assert Path(plan.base).resolve().is_relative_to(inside), plan.base
    assert is_shipped_text(plan.eval["text"]) or Path(plan.eval["text"]).resolve().is_relative_to(inside)
    assert plan.output_dir.resolve().is_relative_to(inside)

    result = cli("release", relative, "--dry-run")
    assert result.stdout.splitlines()[: len(plan.entries)] == [f"{e.label}: would-run" for e in plan.entries]
    assert sorted(p.name for p in clone.iterdir()) == ["examples"]  # a dry run writes nothing there
