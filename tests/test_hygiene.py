"""Guards for the test suite and the scripts beside the library: bench/*.py must import, and no
test may reach the developer's own registry."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import SESSION_QCONV_HOME

BENCH = Path(__file__).resolve().parent.parent / "bench"
BENCH_SCRIPTS = sorted(BENCH.glob("*.py"))


def test_there_are_bench_scripts():
    assert len(BENCH_SCRIPTS) >= 5


@pytest.mark.parametrize("script", BENCH_SCRIPTS, ids=[p.name for p in BENCH_SCRIPTS])
def test_bench_script_imports(script, monkeypatch):
    """Each script imports (by path, as `python bench/x.py` would find it), and every name it
    imports from qconv, at the top or inside a function, exists: ruff does not check those."""
    monkeypatch.setattr(sys, "path", [str(BENCH), *sys.path])
    spec = importlib.util.spec_from_file_location(f"bench_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for node in ast.walk(ast.parse(script.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "qconv":
            imported = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(imported, alias.name) or importlib.util.find_spec(
                    f"{node.module}.{alias.name}"
                ), f"{script.name}:{node.lineno}: {node.module} has no {alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "qconv":
                    importlib.import_module(alias.name)


def test_session_registry_is_set_at_import():
    """Set by conftest.py when it is imported, before any fixture of any scope runs."""
    assert Path(SESSION_QCONV_HOME).is_relative_to(Path(tempfile.gettempdir()))
    assert Path(SESSION_QCONV_HOME).name.startswith("qconv-test-home-")


@pytest.fixture(scope="module")
def home_seen_by_module_fixture() -> str:
    return os.environ["QCONV_HOME"]


def test_module_fixtures_see_the_session_registry(home_seen_by_module_fixture, qconv_home):
    assert home_seen_by_module_fixture == SESSION_QCONV_HOME
    assert os.environ["QCONV_HOME"] == str(qconv_home) != SESSION_QCONV_HOME
