"""``qconv verify --report FILE.html``: the verify result as one self-contained page, for people
who would rather look than read: the checks, the real loader's result (and top-1 / KL against the
source when measured), the per-layer error chart and table, and the artifact's files with their
sha256. Inline CSS and SVG only: no script, nothing fetched, so the file can be mailed or
attached to a release as it is.

The page is rendered from what verify returns (:meth:`qconv.verify.VerifyReport.to_dict`) and
the artifact's manifest; it changes nothing of verify itself.
"""

from __future__ import annotations

import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from qconv.errors import ArtifactError, UsageError
from qconv.html_page import Markup, badge, fields, files_table, fmt_float, join, page, table, tag
from qconv.layer_chart import layer_error_chart, layers_table
from qconv.manifest import read_manifest
from qconv.version import __version__

# What the loader check measured (``VerifyReport.logits``), in the order shown, with a label.
LOGITS_FIELDS = (
    ("loader", "loader"),
    ("prompts", "prompts"),
    ("tokens", "tokens"),
    ("loader_rel_diff", "real loader vs qconv's reference: relative difference"),
    ("loader_max_abs_diff", "real loader vs qconv's reference: largest difference"),
    ("loader_top1_vs_reference", "real loader vs qconv's reference: top-1 agreement"),
    ("top1_agreement", "vs the source: top-1 agreement"),
    ("kl", "vs the source: KL(source || artifact) per token"),
    ("finite", "logits finite"),
)


def check_report_path(path: str | Path) -> Path:
    """The report's path, refused (UsageError) unless its folder exists and takes a new file:
    asked before any verify work, so that a typo costs nothing. A probe file is made and removed
    there (permission bits do not tell: root ignores them, a read-only mount does not)."""
    path = Path(path).expanduser()
    folder = path.parent
    if path.is_dir():
        raise UsageError(f"{path}: is a folder, not an .html file to write")
    if not folder.exists():
        raise UsageError(f"{path}: the folder {folder} does not exist")
    if not folder.is_dir():
        raise UsageError(f"{path}: {folder} is not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as exc:
        raise UsageError(f"{path}: cannot write into {folder} ({exc.strerror or exc})") from None
    return path


def write_verify_report(path: str | Path, report: dict[str, Any]) -> Path:
    """Render the page for ``report`` (``VerifyReport.to_dict()``; its artifact's manifest is read
    from the folder it names) and write it to ``path``: through a temporary file beside it,
    renamed into place, so a failed write leaves no half page under the name."""
    path = Path(path).expanduser()
    try:
        manifest = read_manifest(report["path"])
    except ArtifactError:  # verified without one (a folder qconv did not write): no file table
        manifest = None
    text = verify_report_html(report, manifest)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a report is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def verify_report_html(report: dict[str, Any], manifest: dict[str, Any] | None) -> str:
    """The page for a verify result (``VerifyReport.to_dict()``) of the artifact whose manifest is
    ``manifest`` (None: an artifact without one; its files are then not listed)."""
    manifest = manifest or {}
    recipe = manifest.get("recipe") or {}
    source = manifest.get("source") or {}
    layers = report.get("layers") or {}
    checks = report.get("checks") or []
    title = f"qconv verify: {report.get('path')}"

    body: list[Any] = [
        tag("h1", join([f"verify {report.get('path')} ", badge(report.get("passed"))])),
        fields(
            [
                ("artifact", tag("span", report.get("path"), cls="mono")),
                ("method", recipe.get("label") or recipe.get("method")),
                ("source", _source_text(source)),
                ("converted", manifest.get("created")),
                ("converted with", f"qconv {manifest.get('qconv')}" if manifest.get("qconv") else None),
                ("max rel error gate", report.get("max_rel_error")),
                ("report written", f"{_now()} by qconv {__version__}"),
            ]
        ),
        tag("h2", "checks"),
        table(
            ("check", "result", "detail"),
            ((c.get("name"), badge(c.get("passed"), "pass", "FAIL"), c.get("detail", "")) for c in checks),
        ),
        tag("h2", "the real loader"),
        _loader_section(checks, report.get("logits")),
        tag("h2", f"per-layer error ({len(layers)} layers)"),
        layer_error_chart(layers, "relative error by block, one series per module type"),
        layers_table(layers) if layers else "",
        tag("h2", f"files ({len(manifest.get('files') or {})})"),
        files_table(dict(sorted((manifest.get("files") or {}).items()))),
    ]
    return page(title, join(body), header=tag("strong", "qconv verify report"))


def _source_text(source: dict[str, Any]) -> str | None:
    ref = source.get("ref")
    if not ref:
        return None
    revision = source.get("revision")
    return f"{ref} @ {revision}" if revision else str(ref)


def _loader_section(checks: list[dict], logits: dict[str, Any] | None) -> Markup:
    loader = next((c for c in checks if c.get("name") == "loader"), None)
    if loader is None:
        return tag(
            "p",
            "Not run: the logits check was off, there was no source to compare with, or the layers check failed first.",
            cls="muted",
        )
    result = tag("p", join([badge(loader.get("passed"), "pass", "FAIL"), " ", loader.get("detail", "")]))
    if not logits:
        return result
    rows = [
        (label, _value(logits[key]))
        for key, label in LOGITS_FIELDS
        if key in logits and logits[key] is not None
    ]
    rows += [(key, _value(value)) for key, value in logits.items() if key not in dict(LOGITS_FIELDS)]
    return Markup(result + fields(rows))


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return fmt_float(value, ".4g")
    return str(value)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
