"""The registry's schema, built by migrations applied once each, in order.

The schema (open ``registry.db`` with ``sqlite-utils tables --counts`` or Datasette to see it):

``artifacts``      one row per converted artifact folder. ``id`` is 12 hex chars (see
                   ``qconv.registry.db.artifact_id``). The columns a listing needs are plain
                   columns (method, bits, label, base_model, size_bytes, bits_per_weight,
                   worst_rel_error, verified...); the nested parts of the manifest are JSON columns
                   (``recipe``, ``calibration``, ``environment``, ``skipped``, ``verify``) and
                   ``manifest`` holds the whole ``qconv.json`` as recorded, so nothing is lost and a
                   later migration can backfill a new column from it with ``json_extract``.
                   ``verified`` is 1 (passed), 0 (failed) or NULL (never verified); ``verify`` is the
                   latest verify result, which may be newer than the one inside ``manifest``.
``source_files``   the source's files (name, sha256, size): which weights an artifact came from.
``files``          the artifact's own files. A file's sha256 equals the Hub's LFS oid, so a pushed
                   file can be matched back to its artifact (hence the index on sha256).
``layers``         one row per quantized tensor: shape (JSON), rel_error, max_abs, snr_db, format.
``metrics``        empty for now: evaluation results to come (perplexity, task scores...), one row per
                   measurement, ``protocol`` (JSON) says how it was measured so numbers stay comparable.
``pushes``         empty for now: uploads of an artifact to a hub (repo, revision, commit_sha, url).

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
(``m002_...``), never edit one that has shipped, and add a test that upgrades a file made by the
migrations before it. Applied migrations are recorded in ``_sqlite_migrations`` (set "qconv").
This file imports only sqlite-utils, so ``sqlite-utils migrate registry.db registry/migrations.py``
(with ``--list`` to inspect) works on its own too.
"""

from __future__ import annotations

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
