"""The registry's schema, built by migrations applied once each, in order.

The schema (open ``registry.db`` with ``sqlite-utils tables --counts`` or Datasette to see it):

``artifacts``      one row per converted artifact folder. ``id`` is 12 hex chars (see
                   ``qconv.registry.manifest_rows.artifact_id``). The columns a listing needs are
                   plain columns (method, bits, label, base_model, size_bytes, bits_per_weight,
                   worst_rel_error, verified...); the nested parts of the manifest are JSON columns
                   (``recipe``, ``calibration``, ``environment``, ``skipped``, ``verify``) and
                   ``manifest`` holds the whole ``qconv.json`` as recorded, so nothing is lost and a
                   later migration can backfill a new column from it with ``json_extract``.
                   ``verified`` is 1 (passed), 0 (failed) or NULL (never verified); ``verify`` is the
                   latest verify result, which may be newer than the one inside ``manifest``.
                   The source: ``source_kind`` (hf, gguf, hub), ``source_ref`` (its path or Hub repo
                   id), ``source_revision`` (the resolved commit sha, for a Hub source),
                   ``source_architecture``; its files are in ``source_files``.
                   ``base_model`` (m003 made it so): the Hub id ``ORG/NAME`` of the model the
                   artifact quantizes when one is known (``--base-model``, or the source's Hub
                   repo), else the source's short name (no '/'); ``base_model_revision`` its
                   revision, when known.
                   Plain copies (m002) of what users filter on: ``calibration_sha256``,
                   ``calibration_tokens``, ``calibration_source`` (the calibration fingerprint, NULL
                   for data-free methods); ``python_version``, ``torch_version``,
                   ``transformers_version``, ``method_library`` and ``method_library_version`` (the
                   method's own library: bitsandbytes, hqq, aqlm...), ``device`` and ``gpu`` (the
                   GPU's name) of the conversion.
``source_files``   the source's files (name, sha256, size): which weights an artifact came from.
``files``          the artifact's own files. A file's sha256 equals the Hub's LFS oid, so a pushed
                   file can be matched back to its artifact (hence the index on sha256).
``layers``         one row per quantized tensor: shape (JSON), rel_error, max_abs, snr_db, format.
``metrics``        one row per measurement (``qconv eval``: ppl, nll, kl, top1): name, value,
                   ``protocol`` (JSON: how it was measured, so numbers stay comparable) and, copied
                   from it (m002), ``dataset``, ``dataset_sha256``, ``seqlen``, ``windows`` and
                   ``tokens`` (tokens predicted).
``pushes``         uploads of an artifact to a hub: repo, revision, commit_sha, url, created.

Why the environment is a JSON column and not an ``environment(artifact_id, key, value)`` table: it
is a small flat record that is always read whole with its artifact, and its keys change with the
method's library (bitsandbytes, hqq, aqlm...). One column keeps one row per artifact, keeps the
values' JSON types (a key/value table would turn them all into text), and is still easy to query:
``select json_extract(environment, '$.torch'), count(*) from artifacts group by 1``.

Every child table has a foreign key to ``artifacts(id)`` with ON DELETE CASCADE (the registry turns
``PRAGMA foreign_keys`` on for each connection). ``source_files``, ``files`` and ``layers`` have the
primary key (artifact_id, name), whose index also serves lookups and cascades by artifact_id;
``metrics`` and ``pushes`` have a rowid key and an explicit index on artifact_id.

Changing the schema: add one function decorated with ``@migrations()`` at the END of this file
(``m003_...``), never edit one that has shipped, and add a test that upgrades a file made by the
migrations before it. Applied migrations are recorded in ``_sqlite_migrations`` (set "qconv").
This file imports only sqlite-utils, so ``sqlite-utils migrate registry.db registry/migrations.py``
(with ``--list`` to inspect) works on its own too.
"""

from __future__ import annotations

import json
from pathlib import PurePosixPath

from sqlite_utils import Database, Migrations
from sqlite_utils.db import ForeignKey

MIGRATION_SET = "qconv"

migrations = Migrations(MIGRATION_SET)


def _child_of_artifacts(table: str) -> list[ForeignKey]:
    return [ForeignKey(table, "artifact_id", "artifacts", "id", on_delete="CASCADE")]


@migrations()
def m001_initial(db: Database) -> None:
    db["artifacts"].create(
        {
            "id": str,
            "path": str,
            "created": str,
            "qconv_version": str,
            "method": str,
            "bits": int,
            "label": str,
            "recipe": str,
            "base_model": str,
            "source_kind": str,
            "source_ref": str,
            "source_revision": str,
            "calibration": str,
            "environment": str,
            "skipped": str,
            "size_bytes": int,
            "bits_per_weight": float,
            "quantized_params": int,
            "total_params": int,
            "worst_layer": str,
            "worst_rel_error": float,
            "verified": int,
            "verify": str,
            "manifest": str,
        },
        pk="id",
        not_null=["path", "created"],
    )
    db["artifacts"].create_index(["created"])
    db["artifacts"].create_index(["method"])
    db["artifacts"].create_index(["path"])

    for table in ("source_files", "files"):
        db[table].create(
            {"artifact_id": str, "name": str, "sha256": str, "size": int},
            pk=("artifact_id", "name"),
            # SQLite lets a composite primary key hold NULLs unless told otherwise.
            not_null=["artifact_id", "name"],
            foreign_keys=_child_of_artifacts(table),
        )
        db[table].create_index(["sha256"])

    db["layers"].create(
        {
            "artifact_id": str,
            "name": str,
            "shape": str,
            "rel_error": float,
            "max_abs": float,
            "snr_db": float,
            "format": str,
        },
        pk=("artifact_id", "name"),
        not_null=["artifact_id", "name"],
        foreign_keys=_child_of_artifacts("layers"),
    )

    db["metrics"].create(
        {
            "id": int,
            "artifact_id": str,
            "name": str,
            "value": float,
            "protocol": str,
            "created": str,
        },
        pk="id",
        not_null=["artifact_id", "name"],
        foreign_keys=_child_of_artifacts("metrics"),
    )
    db["metrics"].create_index(["artifact_id"])
    db["metrics"].create_index(["name"])

    db["pushes"].create(
        {
            "id": int,
            "artifact_id": str,
            "repo": str,
            "revision": str,
            "commit_sha": str,
            "url": str,
            "created": str,
        },
        pk="id",
        not_null=["artifact_id", "repo"],
        foreign_keys=_child_of_artifacts("pushes"),
    )
    db["pushes"].create_index(["artifact_id"])


# -- m002: provenance as plain columns ------------------------------------------------------------
# The environment keys every manifest has; any other key names the method's own library
# (bitsandbytes, hqq, aqlm...) with its version.
STANDARD_ENVIRONMENT_KEYS = frozenset(
    {"qconv", "python", "platform", "torch", "transformers", "safetensors", "device", "gpu"}
)
# New artifacts columns -> the JSON path in the manifest they are copied from.
ARTIFACT_COLUMNS_FROM_MANIFEST = {
    "source_architecture": (str, "$.source.architecture"),
    "calibration_sha256": (str, "$.calibration.sha256"),
    "calibration_tokens": (int, "$.calibration.tokens"),
    "calibration_source": (str, "$.calibration.source"),
    "python_version": (str, "$.environment.python"),
    "torch_version": (str, "$.environment.torch"),
    "transformers_version": (str, "$.environment.transformers"),
    "device": (str, "$.environment.device"),
    "gpu": (str, "$.environment.gpu"),
}
# New metrics columns -> the key in the metric's protocol (JSON) they are copied from.
METRIC_COLUMNS_FROM_PROTOCOL = {
    "dataset": (str, "$.dataset"),
    "dataset_sha256": (str, "$.dataset_sha256"),
    "seqlen": (int, "$.seqlen"),
    "windows": (int, "$.windows"),
    "tokens": (int, "$.tokens"),
}


def method_library(environment: dict | None) -> tuple[str | None, str | None]:
    """(name, version) of the method's library in a manifest's environment, or (None, None)."""
    for key, value in (environment or {}).items():
        if key not in STANDARD_ENVIRONMENT_KEYS:
            return key, value if value is None else str(value)
    return None, None


def _json_extract(column: str, path: str) -> str:
    # json_valid first: json_extract raises on text that is not JSON, which would stop the upgrade
    return f"case when json_valid([{column}]) then json_extract([{column}], '{path}') end"


@migrations()
def m002_provenance_columns(db: Database) -> None:
    """What a user filters on, as plain columns (the JSON columns stay the full record):
    the source's architecture, the calibration fingerprint, the environment's versions and GPU,
    the method's library; and each metric's protocol (dataset, its sha256, seqlen, windows,
    tokens). Existing rows are backfilled from the JSON they already hold."""
    artifacts = db["artifacts"]
    for column, (kind, _) in ARTIFACT_COLUMNS_FROM_MANIFEST.items():
        artifacts.add_column(column, kind)
    artifacts.add_column("method_library", str)
    artifacts.add_column("method_library_version", str)
    assignments = ", ".join(
        f"[{column}] = {_json_extract('manifest', path)}"
        for column, (_, path) in ARTIFACT_COLUMNS_FROM_MANIFEST.items()
    )
    db.execute(f"update artifacts set {assignments}")
    for ident, environment in db.execute("select id, environment from artifacts").fetchall():
        try:
            parsed = json.loads(environment) if environment else None
        except ValueError:
            parsed = None
        name, version = method_library(parsed if isinstance(parsed, dict) else None)
        if name is not None:
            db.execute(
                "update artifacts set method_library = ?, method_library_version = ? where id = ?",
                [name, version, ident],
            )
    artifacts.create_index(["base_model"])

    metrics = db["metrics"]
    for column, (kind, _) in METRIC_COLUMNS_FROM_PROTOCOL.items():
        metrics.add_column(column, kind)
    assignments = ", ".join(
        f"[{column}] = {_json_extract('protocol', path)}"
        for column, (_, path) in METRIC_COLUMNS_FROM_PROTOCOL.items()
    )
    db.execute(f"update metrics set {assignments}")
    db["pushes"].create_index(["repo"])


@migrations()
def m003_base_model_revision(db: Database) -> None:
    """``base_model_revision``: the revision of the base model (issue 18). ``base_model`` holds
    the Hub id ``ORG/NAME`` of the model the artifact quantizes when one is known (given with
    --base-model, or detected from the source), else the source's short name as before (a name
    without '/'). Existing rows are backfilled where the source says it: a Hub source's commit,
    or the commit folder of a source in the Hugging Face cache."""
    db["artifacts"].add_column("base_model_revision", str)
    db.execute(
        "update artifacts set base_model_revision = source_revision "
        "where source_kind = 'hub' and source_revision is not null"
    )
    rows = db.execute(
        "select id, source_ref from artifacts where source_kind != 'hub' and source_ref like '%/snapshots/%'"
    ).fetchall()
    for ident, ref in rows:
        path = PurePosixPath(ref)
        if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
            db.execute("update artifacts set base_model_revision = ? where id = ?", [path.name, ident])
