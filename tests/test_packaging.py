"""The built wheel installs everything under one import package, `qconv`, and works outside the repo."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_wheel_maps_folders_under_qconv_and_runs_outside_the_repo(tmp_path):
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert build.returncode == 0, build.stderr
    wheel = next(tmp_path.glob("qconv-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    # converter/, formats/ and registry/ never become top-level packages that could clash
    assert top_level == {"qconv"}
    assert {"qconv/cli/__init__.py", "qconv/formats/format_bnb.py", "qconv/registry/db.py"} <= set(names)
    # the evaluation text qconv eval uses by default, with its attribution (CC BY-SA)
    assert {"qconv/data/wikitext2-test.txt", "qconv/data/README.md", "qconv/cli/evaluate.py"} <= set(names)
    entry_points = (
        zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    )
    assert "qconv = qconv.cli:main" in entry_points

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site)}
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import qconv, qconv.formats, qconv.registry; print(qconv.__file__);"
            "print(sorted(qconv.formats.all_formats()))",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.splitlines()[0].startswith(str(site))
    assert "bnb" in probe.stdout
    cli = subprocess.run(
        [sys.executable, "-m", "qconv", "--version"], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert cli.returncode == 0 and cli.stdout.strip() == "qconv, version 0.1.0"
