"""From a manifest (``qconv.json``) to the registry's rows: pure functions, no database.

The artifact row is built and checked up front; the rows of ``source_files``, ``files`` and
``layers`` are generators, consumed inside the recording transaction, so a bad entry met half-way
rolls back everything recorded before it (pinned by ``test_record_is_all_or_nothing``).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from qconv.errors import RegistryError
from qconv.manifest import base_model_name, base_model_of, finite
from qconv.registry.migrations import method_library


@dataclass
class ArtifactRows:
    artifact: dict[str, Any]
    source_files: Iterator[dict[str, Any]]
    files: Iterator[dict[str, Any]]
    layers: Iterator[dict[str, Any]]


def artifact_id(manifest: dict, path: str | Path) -> str:
    """12 hex chars of sha256 over the canonical JSON of ``manifest["files"]``, the artifact's
    absolute path and ``manifest["created"]``: the same folder, converted once, always gets the
    same id; a re-conversion (new ``created``) or a copy elsewhere (new path) gets a new one."""
    files = _section(manifest, "files", path, required=True)
    created = _created(manifest, path)
    try:
        canonical = json.dumps(files, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise RegistryError(f"cannot record {path}: manifest 'files' is not JSON ({exc})") from None
    text = "\n".join([canonical, str(absolute_path(path)), created])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def absolute_path(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def rows_from_manifest(manifest: dict, path: str | Path) -> ArtifactRows:
    if not isinstance(manifest, dict):
        raise RegistryError(f"cannot record {path}: the manifest is {type(manifest).__name__}, not an object")
    ident = artifact_id(manifest, path)
    source = _section(manifest, "source", path)
    recipe = _section(manifest, "recipe", path)
    summary = _section(manifest, "summary", path)
    files = _section(manifest, "files", path, required=True)
    source_files = source.get("files") or {}
    layers = _section(manifest, "layers", path)
    verify = manifest.get("verify")
    worst_layer, worst_rel_error = _worst_layer(layers, summary)
    calibration = _section(manifest, "calibration", path)
    environment = _section(manifest, "environment", path)
    library, library_version = method_library(environment)
    base = base_model_of(manifest)
    artifact = {
        "id": ident,
        "path": str(absolute_path(path)),
        "created": utc_iso(_created(manifest, path)),
        "qconv_version": manifest.get("qconv"),
        "method": recipe.get("method"),
        "bits": recipe.get("bits"),
        "label": recipe.get("label"),
        "recipe": to_json(recipe),
        # the Hub id of the base model when known, else the source's short name as before (m003)
        "base_model": base["repo_id"] if base else base_model_name(source.get("kind"), source.get("ref")),
        "base_model_revision": base.get("revision") if base else None,
        "source_kind": source.get("kind"),
        "source_ref": source.get("ref"),
        "source_revision": source.get("revision"),
        "calibration": to_json(manifest.get("calibration")),
        "environment": to_json(manifest.get("environment")),
        "skipped": to_json(manifest.get("skipped")),
        "size_bytes": _total_size(files),
        "bits_per_weight": summary.get("bits_per_weight"),
        "quantized_params": summary.get("quantized_params"),
        "total_params": summary.get("total_params"),
        "worst_layer": worst_layer,
        "worst_rel_error": worst_rel_error,
        "verified": None if verify is None else verified_flag(verify),
        "verify": to_json(verify),
        "manifest": to_json(manifest),
        # m002: plain copies of what users filter on (the JSON columns above stay the record)
        "source_architecture": _scalar(source.get("architecture")),
        "calibration_sha256": _scalar(calibration.get("sha256")),
        "calibration_tokens": _scalar(calibration.get("tokens")),
        "calibration_source": _scalar(calibration.get("text") or calibration.get("source")),
        "python_version": _scalar(environment.get("python")),
        "torch_version": _scalar(environment.get("torch")),
        "transformers_version": _scalar(environment.get("transformers")),
        "device": _scalar(environment.get("device")),
        "gpu": _scalar(environment.get("gpu")),
        "method_library": library,
        "method_library_version": library_version,
    }
    return ArtifactRows(
        artifact=artifact,
        source_files=_file_rows(ident, source_files, "source.files", path),
        files=_file_rows(ident, files, "files", path),
        layers=_layer_rows(ident, layers, path),
    )


def verified_flag(verify: Any) -> int:
    """1 or 0 from a verify result, which must say ``"passed": true`` or ``false``."""
    if not isinstance(verify, dict) or not isinstance(verify.get("passed"), bool):
        raise RegistryError('a verify result must be an object with "passed": true or false')
    return int(verify["passed"])


def to_json(value: Any) -> str | None:
    """JSON text for a JSON column, None for None. NaN and infinities become null: SQLite's JSON
    functions (and so Datasette) reject the bare ``NaN`` that Python's json writes."""
    if value is None:
        return None
    return json.dumps(finite(value), ensure_ascii=False, allow_nan=False)


def utc_iso(created: str) -> str:
    """``created`` as an ISO time in UTC, so that sorting the column as text sorts by time.
    A time without an offset, or one that does not parse, is kept as written."""
    try:
        when = datetime.fromisoformat(created.replace("Z", "+00:00"))
    except ValueError:
        return created
    if when.tzinfo is None:
        return created
    return when.astimezone(timezone.utc).isoformat()


# -- helpers ---------------------------------------------------------------------------------
def _section(manifest: dict, key: str, path, required: bool = False) -> dict:
    value = manifest.get(key)
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        what = "has no" if value is None else f"has a {type(value).__name__} for"
        raise RegistryError(f"cannot record {path}: the manifest {what} '{key}' (expected an object)")
    return value


def _created(manifest: dict, path) -> str:
    created = manifest.get("created")
    if not isinstance(created, str) or not created:
        raise RegistryError(f"cannot record {path}: the manifest has no 'created' time")
    return created


def _total_size(files: dict) -> int:
    return sum(
        entry["size"]
        for entry in files.values()
        if isinstance(entry, dict) and isinstance(entry.get("size"), int)
    )


def _scalar(value: Any) -> Any:
    """A value for a plain column: numbers and text as they are, anything else as JSON text."""
    if value is None or isinstance(value, (str, int, float)):
        return value
    return to_json(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _worst_layer(layers: dict, summary: dict) -> tuple[str | None, float | None]:
    """The layer with the largest rel_error; the summary's values when no layer has one.
    A NaN error (not measurable) ranks worst and is stored as inf: SQLite stores NaN as NULL,
    which would read as "no layers"."""
    measured = [
        (name, float(entry["rel_error"]))
        for name, entry in layers.items()
        if isinstance(entry, dict) and _is_number(entry.get("rel_error"))
    ]
    if not measured:
        return summary.get("worst_layer"), summary.get("worst_rel_error")
    name, error = max(measured, key=lambda item: math.inf if math.isnan(item[1]) else item[1])
    return name, math.inf if math.isnan(error) else error


def _file_rows(ident: str, files: Any, where: str, path) -> Iterator[dict[str, Any]]:
    if not isinstance(files, dict):
        raise RegistryError(
            f"cannot record {path}: manifest '{where}' is {type(files).__name__}, not an object"
        )
    for name, entry in files.items():
        if not isinstance(entry, dict):
            raise RegistryError(
                f"cannot record {path}: manifest {where}[{name!r}] is {type(entry).__name__}, "
                'expected {"sha256": ..., "size": ...}'
            )
        yield {"artifact_id": ident, "name": name, "sha256": entry.get("sha256"), "size": entry.get("size")}


def _layer_rows(ident: str, layers: dict, path) -> Iterator[dict[str, Any]]:
    for name, entry in layers.items():
        if not isinstance(entry, dict):
            raise RegistryError(
                f"cannot record {path}: manifest layers[{name!r}] is {type(entry).__name__}, "
                "expected an object with rel_error, max_abs, snr_db, shape, format"
            )
        yield {
            "artifact_id": ident,
            "name": name,
            "shape": to_json(entry.get("shape")),
            "rel_error": entry.get("rel_error"),
            "max_abs": entry.get("max_abs"),
            "snr_db": entry.get("snr_db"),
            "format": entry.get("format"),
        }
