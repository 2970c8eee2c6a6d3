"""The manifest, ``qconv.json``: what an artifact is, where it came from and how far it moved.

One owner for the document every other part reads: its file name, its shape (typed below), how it
is built, read, written and sealed, the NaN -> null rule, and the short name of the base model.
Part of the core: it imports nothing of qconv but ``errors`` and ``files``.

The manifest stays a JSON object (a ``TypedDict``, not a class of its own): it is hashed, pushed
and recorded verbatim in the registry, and older artifacts must keep reading; the types name every
key that code may read.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypedDict

from qconv.errors import ArtifactError, UsageError
from qconv.files import hash_file
from qconv.version import __version__

MANIFEST_NAME = "qconv.json"


class FileEntry(TypedDict):
    sha256: str
    size: int


class SourceEntry(TypedDict, total=False):
    kind: str  # hf | gguf | hub | hqq
    ref: str  # a path, or a Hub repo id
    revision: str | None  # the Hub commit, for Hub sources
    license: str | None
    architecture: str | None
    files: dict[str, FileEntry]


class LayerEntry(TypedDict, total=False):
    rel_error: float | None
    max_abs: float | None
    snr_db: float | None
    shape: list[int]
    format: str  # the recipe's label


class VerifyEntry(TypedDict, total=False):
    passed: bool
    checks: list[dict[str, Any]]


class BaseModelEntry(TypedDict):
    """The Hub model an artifact is a quantized version of (the card's ``base_model``)."""

    repo_id: str  # ORG/NAME
    revision: str | None  # the commit (or branch, tag) it was made from, when known
    origin: str  # how qconv knows it: one of BASE_MODEL_ORIGINS


#: where a base model came from: given (--base-model), the Hub source itself, the Hugging Face
#: cache folder the source sits in, or the GGUF source's metadata
BASE_MODEL_ORIGINS = ("given", "hub", "hub-cache", "gguf")


class Manifest(TypedDict, total=False):
    qconv: str
    created: str
    source: SourceEntry
    base_model: BaseModelEntry | None  # absent from manifests written before it was: base_model_of()
    recipe: dict[str, Any]  # every option of the method, defaults included; `method` names it
    calibration: dict[str, Any] | None
    environment: dict[str, Any]
    layers: dict[str, LayerEntry]
    skipped: dict[str, str]
    summary: dict[str, Any]
    files: dict[str, FileEntry]
    verify: VerifyEntry | None


def new_manifest(
    source: SourceEntry,
    recipe: dict[str, Any],
    calibration: dict[str, Any] | None,
    environment: dict[str, Any],
    layers: dict[str, LayerEntry],
    skipped: dict[str, str],
    summary: dict[str, Any],
    base_model: BaseModelEntry | None = None,
) -> Manifest:
    """An artifact's manifest before its files are listed (:func:`seal`) and it is verified."""
    return {
        "qconv": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "base_model": base_model,
        "recipe": recipe,
        "calibration": calibration,
        "environment": environment,
        "layers": layers,
        "skipped": skipped,
        "summary": summary,
        "files": {},
        "verify": None,
    }


def finite(value: Any) -> Any:
    """JSON has no inf/nan: write them as null (an error of exactly zero gives an infinite SNR).
    SQLite's JSON functions (and so Datasette) reject the bare ``NaN`` Python's json writes."""
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def is_artifact(folder: Path) -> bool:
    return (Path(folder) / MANIFEST_NAME).is_file()


def read_manifest(folder: str | Path) -> Manifest:
    """The manifest of an artifact folder; :class:`ArtifactError` when there is none or it is broken."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: no such artifact folder")
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"{folder}: no {MANIFEST_NAME} (not a qconv artifact)")
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict) or not isinstance(manifest["recipe"], dict):
            raise TypeError("not an object with a recipe")
        manifest["recipe"]["method"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{path}: not a valid qconv manifest") from exc
    return manifest


def recipe_of(folder: str | Path) -> dict[str, Any]:
    """The recipe of an artifact folder, or ``{}`` for a model folder qconv did not write."""
    return read_manifest(folder)["recipe"] if is_artifact(Path(folder)) else {}


def write_manifest(folder: Path, manifest: Manifest) -> None:
    (Path(folder) / MANIFEST_NAME).write_text(json.dumps(finite(manifest), indent=2) + "\n")


def seal(folder: Path, manifest: Manifest, files: dict[str, FileEntry], small_files: list[str]) -> None:
    """List every file of the artifact with its sha256 (``files``: those hashed already, while
    written; ``small_files``: names under ``folder`` to hash now) and write the manifest."""
    for name in small_files:
        files[name] = hash_file(Path(folder) / name)
    manifest["files"] = dict(sorted(files.items()))
    write_manifest(folder, manifest)


def imported_from(manifest: Manifest) -> str | None:
    """The form of a model another tool quantized, for an artifact qconv imported rather than
    quantized (``hqq-qmodel.pt``...): its source holds no float weights to compare with."""
    return manifest.get("recipe", {}).get("imported_from")


def base_model_name(kind: str | None, ref: str | None) -> str | None:
    """The short human name of a source: a Hub repo id as it is, a .gguf file's stem, a folder's
    name (for a folder in the Hugging Face cache, ``.../models--org--name/snapshots/<sha>``, the
    repo id ``org/name`` rather than the commit sha)."""
    if not ref:
        return None
    if kind == "hub":
        return ref
    p = Path(ref)
    if kind == "gguf" or p.suffix == ".gguf":
        return p.stem
    if p.parent.name == "snapshots" and p.parent.parent.name.startswith("models--"):
        return p.parent.parent.name[len("models--") :].replace("--", "/")
    return p.name or ref


def hub_cache_repo(folder: str | Path) -> tuple[str, str] | None:
    """``(ORG/NAME, commit)`` for a snapshot folder of the Hugging Face cache
    (``.../models--ORG--NAME/snapshots/<commit>``), else None (a repo without a namespace, such
    as the legacy ``gpt2``, is no base model id). The Hub refuses ``--`` in names, so the folder
    name splits back unambiguously."""
    p = Path(folder)
    if p.parent.name != "snapshots" or not p.parent.parent.name.startswith("models--"):
        return None
    repo_id = p.parent.parent.name[len("models--") :].replace("--", "/")
    return (repo_id, p.name) if _HUB_REPO_ID.fullmatch(repo_id) else None


# A Hub model id as the Hub accepts it (huggingface_hub's validate_repo_id: word characters, '-'
# and '.', starting and ending with a word character, at most 96 characters a part, no '--' or
# '..'), with the namespace required: a base model is always ORG/NAME.
_HUB_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_HUB_REPO_ID = re.compile(rf"{_HUB_PART}/{_HUB_PART}")
_HUB_REVISION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./-]*")  # a commit sha, branch or tag


def parse_base_model(value: str, origin: str = "given") -> BaseModelEntry:
    """``ORG/NAME[@REVISION]`` as a :class:`BaseModelEntry`; :class:`UsageError` otherwise."""
    text = value.strip() if isinstance(value, str) else ""
    repo_id, _, revision = text.partition("@")
    if (
        not _HUB_REPO_ID.fullmatch(repo_id)
        or "--" in repo_id
        or ".." in repo_id
        or repo_id.endswith(".git")
        or ("@" in text and not (_HUB_REVISION.fullmatch(revision) and ".." not in revision))
    ):
        raise UsageError(
            "{option} {value!r}: expected ORG/NAME or ORG/NAME@REVISION (a Hugging Face Hub model id)",
            option="base_model",
            value=value,
        )
    return {"repo_id": repo_id, "revision": revision or None, "origin": origin}


def base_model_of(manifest: dict) -> BaseModelEntry | None:
    """The artifact's base model: the manifest's ``base_model`` (given or detected at conversion;
    null when there was none), or for a manifest written before qconv recorded it, what its source
    says (a Hub source, or a folder in the Hugging Face cache)."""
    if "base_model" in manifest:
        entry = manifest["base_model"]
        return entry if isinstance(entry, dict) and entry.get("repo_id") else None
    source = manifest.get("source") or {}
    if source.get("kind") == "hub" and source.get("ref"):
        return {"repo_id": source["ref"], "revision": source.get("revision"), "origin": "hub"}
    cached = hub_cache_repo(source["ref"]) if source.get("ref") else None
    if cached is not None:
        return {"repo_id": cached[0], "revision": cached[1], "origin": "hub-cache"}
    return None
