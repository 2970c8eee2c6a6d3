"""`qconv verify --report FILE.html`: the verify result as one self-contained page."""

from __future__ import annotations

import json
import os
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest


class Parsed(HTMLParser):
    """Every tag, attribute and piece of text of a page, as html.parser reads it."""

    def __init__(self, html: str):
        super().__init__()
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str | None]] = []
        self.text: list[str] = []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs.extend(attrs)

    def handle_data(self, data):
        self.text.append(data)

    @property
    def all_text(self) -> str:
        return "".join(self.text)


@pytest.fixture(scope="module")
def artifact(tiny_llama, tmp_path_factory):
    """A bnb nf4 artifact of the tiny Llama, not recorded (its registry is the session's)."""
    from click.testing import CliRunner

    from qconv.cli import main

    out = tmp_path_factory.mktemp("report") / "tiny-nf4"
    args = ["convert", str(tiny_llama), "-o", str(out), "--method", "bnb", "--device", "cpu", "--no-verify"]
    result = CliRunner().invoke(main, [*args, "--no-record"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def run_error(cli, *args) -> str:
    result = cli(*args, ok=None)
    assert result.exit_code == 2, result.output
    assert result.stdout == "" and "Traceback" not in result.output
    return result.stderr


def test_the_report_page_holds_the_chart_the_loader_check_and_the_files(cli, artifact, tmp_path):
    plain = cli("verify", artifact, "--device", "cpu")
    (tmp_path / "reports").mkdir()
    report = tmp_path / "reports" / "report.html"
    with_report = cli("verify", artifact, "--device", "cpu", "--report", report)
    # the report changes nothing of what verify prints
    assert with_report.stdout == plain.stdout
    # one line more on stderr (transformers' own loading bars may come before it)
    assert with_report.stderr.splitlines()[-1] == f"wrote the report {report}"
    assert "wrote the report" not in plain.stderr
    html = report.read_text(encoding="utf-8")
    page = Parsed(html)
    text = page.all_text
    manifest = json.loads((artifact / "qconv.json").read_text())
    assert "svg" in page.tags and page.tags.count("circle") == len(manifest["layers"])
    for name in manifest["layers"]:
        assert name in text, name
    for name, entry in manifest["files"].items():
        assert name in text and entry["sha256"] in text, name
    assert (
        "vs the source: top-1 agreement" in text and "vs the source: KL(source || artifact) per token" in text
    )
    assert "real loader vs qconv reference: rel diff" in text  # the loader check's own line
    assert "passed" in text and "FAIL" not in text
    # self-contained: nothing to fetch, nothing to run
    assert not {"script", "link", "img", "iframe"} & set(page.tags)
    assert [value for key, value in page.attrs if key in ("src", "href") and value and value != "#"] == []
    assert oct(report.stat().st_mode & 0o777) == "0o644"
    assert [p.name for p in report.parent.iterdir()] == ["report.html"]  # no temporary or probe file left


def test_a_failed_verification_still_writes_its_report(cli, artifact, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in artifact.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    config = broken / "config.json"
    config.write_text(config.read_text() + " ")
    report = tmp_path / "broken.html"
    result = cli("verify", broken, "--device", "cpu", "--no-logits", "--json", "--report", report, ok=None)
    assert result.exit_code == 1
    assert json.loads(result.stdout)["checks"][0] == {
        "name": "files",
        "passed": False,
        "detail": "config.json does not match its sha256",
    }
    text = Parsed(report.read_text(encoding="utf-8")).all_text
    assert "FAILED" in text and "config.json does not match its sha256" in text
    assert (
        "Not run: the logits check was off, there was no source to compare with, or the layers check failed first."
        in text
    )


def test_a_bad_report_path_is_refused_before_any_verify_work(cli, tmp_path):
    """The path is checked first: the artifact named here does not even exist, and the error is
    still the report's."""
    missing = tmp_path / "nowhere" / "r.html"
    assert run_error(cli, "verify", tmp_path / "no-artifact", "--report", missing) == (
        f"Error: {missing}: the folder {missing.parent} does not exist\n"
    )
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert run_error(cli, "verify", tmp_path / "no-artifact", "--report", afile / "r.html") == (
        f"Error: {afile / 'r.html'}: {afile} is not a folder\n"
    )
    assert run_error(cli, "verify", tmp_path / "no-artifact", "--report", tmp_path) == (
        f"Error: {tmp_path}: is a folder, not an .html file to write\n"
    )
    readonly = _unwritable_folder(tmp_path)
    assert run_error(cli, "verify", tmp_path / "no-artifact", "--report", readonly / "r.html") == (
        f"Error: {readonly / 'r.html'}: cannot write into {readonly} (Permission denied)\n"
    )
    # and with a good path, the artifact's own error, with no report written
    good = tmp_path / "r.html"
    assert run_error(cli, "verify", tmp_path / "no-artifact", "--report", good).startswith("Error: ")
    assert not good.exists()


def _unwritable_folder(tmp_path: Path) -> Path:
    """A folder this process cannot create a file in: a read-only one, or for root (whom
    permission bits do not stop) /sys, which the kernel refuses files in."""
    if os.geteuid() != 0:
        folder = tmp_path / "readonly"
        folder.mkdir(mode=0o555)
        return folder
    try:
        tempfile.NamedTemporaryFile(dir="/sys").close()
    except PermissionError:
        return Path("/sys")
    pytest.skip("running as root and /sys takes files: no folder refuses this process")
