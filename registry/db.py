"""The registry: a SQLite file, owned by sqlite-utils, that records every converted artifact.

Several qconv processes may record into one file at once (a sweep of conversions): the file is in
WAL mode, each connection waits up to ``BUSY_TIMEOUT_S`` for the write lock, and every write takes
that lock up front (``BEGIN IMMEDIATE``). A deferred transaction that read first and wrote later
could fail at once with SQLITE_BUSY in WAL mode, whatever the timeout, when another process wrote
in between (pinned by ``test_concurrent_processes_record``).

The tables are described in :mod:`qconv.registry.migrations`.
"""

from __future__ import annotations

import contextlib
import json
import random
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from qconv.errors import RegistryError
from qconv.registry.location import registry_path
from qconv.registry.manifest_rows import absolute_path, rows_from_manifest, to_json, verified_flag
from qconv.registry.migrations import migrations

BUSY_TIMEOUT_S = 30.0

# What list_artifacts returns for each artifact, in this order.
LIST_COLUMNS = (
    "id",
    "path",
    "base_model",
    "source_ref",
    "method",
    "bits",
    "label",
    "size_bytes",
    "bits_per_weight",
    "worst_rel_error",
    "verified",
    "created",
)
JSON_COLUMNS = ("recipe", "calibration", "environment", "skipped", "verify", "manifest")
# Rows that come from the manifest and are replaced when an artifact is recorded again.
# metrics and pushes are not: they describe the same files and stay valid.
MANIFEST_CHILD_TABLES = ("source_files", "files", "layers")
# How many candidates an "ambiguous id" message names.
MAX_CANDIDATES_SHOWN = 8


def open_registry(path: str | Path | None = None) -> Registry:
    """Open (and create, or upgrade to the current schema) the registry at ``path``, default
    :func:`registry_path`. Raises RegistryError for a file that is not a qconv registry."""
    path = Path(path).expanduser() if path is not None else registry_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S)
    except (OSError, sqlite3.Error) as exc:
        raise RegistryError(f"{path}: cannot open the registry ({exc})") from exc
    try:
        db = Database(conn)
        # Off by default in SQLite, per connection: without it ON DELETE CASCADE does nothing.
        db.execute("PRAGMA foreign_keys = ON")
        _check_is_registry(db, path)
        _prepare_schema(db)
    except sqlite3.DatabaseError as exc:
        conn.close()
        if _is_not_a_database(exc):
            raise RegistryError(f"{path}: not a qconv registry ({exc})") from exc
        raise RegistryError(f"{path}: cannot open the registry ({exc})") from exc
    except BaseException:
        conn.close()
        raise
    return Registry(db, path)


def _prepare_schema(db: Database) -> None:
    """WAL mode and pending migrations. Switching the journal mode needs the file to itself, and
    SQLite answers "database is locked" at once (without waiting out the busy timeout) when
    waiting could deadlock, as when several processes open a new file together: retry then."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            db.enable_wal()
            if migrations.pending(db):
                with _write_transaction(db):
                    # Computes what is pending again, now under the write lock: two processes
                    # opening a new file at once apply each migration once between them.
                    migrations.apply(db)
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02 + random.random() * 0.08)


class Registry:
    """An open registry. Use :func:`open_registry` to get one; close it, or use it in ``with``."""

    def __init__(self, db: Database, path: Path):
        self.db = db
        self.path = path

    def __repr__(self) -> str:
        return f"<Registry {self.path}>"

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self.db.close()

    # -- writing ------------------------------------------------------------------------------
    def record_artifact(self, manifest: dict, path: str | Path) -> str:
        """Record the artifact folder at ``path`` described by ``manifest``; return its id.

        All its rows are written in one transaction, or none. Recording the same artifact again
        (same id) replaces the rows that come from the manifest and keeps its metrics and pushes;
        a verify result stored since is kept when the manifest carries none.
        """
        rows = rows_from_manifest(manifest, path)
        ident = rows.artifact["id"]
        with self._writing(f"cannot record {path}"):
            artifacts = self.db.table("artifacts")
            existing = self._row(ident, "verify", "verified")
            if existing is None:
                artifacts.insert(rows.artifact)
            else:
                if rows.artifact["verify"] is None:
                    rows.artifact.update(existing)
                artifacts.update(ident, rows.artifact)
                for table in MANIFEST_CHILD_TABLES:
                    self.db.table(table).delete_where("artifact_id = ?", [ident])
            self.db.table("source_files").insert_all(rows.source_files)
            self.db.table("files").insert_all(rows.files)
            self.db.table("layers").insert_all(rows.layers)
        return ident

    def set_verify(self, artifact_id: str, verify: dict) -> str:
        """Store a later verify result (``{"passed": bool, "checks": [...], ...}``) for an
        artifact (id or unique prefix); return the full id."""
        flag = verified_flag(verify)
        with self._writing(f"cannot store the verify result for {artifact_id}"):
            ident = self.resolve_id(artifact_id)
            self.db.table("artifacts").update(ident, {"verify": to_json(verify), "verified": flag})
        return ident

    def record_verify_for_path(self, path: str | Path, verify: dict) -> str | None:
        """Store a verify result for the newest artifact recorded at ``path`` (the folder there
        now); return its id, or None when nothing was recorded there."""
        flag = verified_flag(verify)
        with self._writing(f"cannot store the verify result for {path}"):
            found = self.db.execute(
                "select id from artifacts where path = ? order by created desc, rowid desc limit 1",
                [str(absolute_path(path))],
            ).fetchone()
            if found is None:
                return None
            self.db.table("artifacts").update(found[0], {"verify": to_json(verify), "verified": flag})
        return found[0]

    def record_push(self, artifact_id: str, repo: str, revision: str, commit_sha: str, url: str) -> int:
        """Record that the artifact ``artifact_id`` (a full id) is at ``commit_sha`` of ``repo``'s
        ``revision`` on a hub; return the row's id."""
        from datetime import datetime, timezone

        row = {
            "artifact_id": artifact_id,
            "repo": repo,
            "revision": revision,
            "commit_sha": commit_sha,
            "url": url,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        with self._writing(f"cannot record the push of {artifact_id}"):
            return self.db.table("pushes").insert(row).last_pk

    def delete_artifact(self, artifact_id: str) -> str:
        """Remove an artifact (id or unique prefix) and every row that refers to it (files,
        layers, metrics, pushes: ON DELETE CASCADE); return the full id. Files on disk stay."""
        with self._writing(f"cannot delete {artifact_id}"):
            ident = self.resolve_id(artifact_id)
            self.db.execute("delete from artifacts where id = ?", [ident])
        return ident

    # -- reading ------------------------------------------------------------------------------
    def list_artifacts(self, method: str | None = None) -> list[dict[str, Any]]:
        """One summary dict per artifact (keys: ``LIST_COLUMNS``), newest first; only those of
        ``method`` when given. ``verified`` is True, False or None (never verified)."""
        where, params = ("where method = ?", [method]) if method is not None else ("", [])
        rows = self._query(
            f"select {', '.join(LIST_COLUMNS)} from artifacts {where} order by created desc, rowid desc",
            params,
        )
        return [_with_verified_bool(row) for row in rows]

    def get_artifact(self, id_or_prefix: str) -> dict[str, Any]:
        """Everything recorded about one artifact (id or unique prefix): the columns of
        ``artifacts`` with JSON decoded, plus ``source_files`` and ``files`` ({name: {sha256,
        size}}), ``layers`` ({name: {...}}), ``metrics`` and ``pushes`` (lists)."""
        ident = self.resolve_id(id_or_prefix)
        record = self._query("select * from artifacts where id = ?", [ident])[0]
        for column in JSON_COLUMNS:
            if record[column] is not None:
                record[column] = json.loads(record[column])
        record = _with_verified_bool(record)
        for table in ("source_files", "files"):
            record[table] = {
                row["name"]: {"sha256": row["sha256"], "size": row["size"]}
                for row in self._children(table, ident)
            }
        record["layers"] = {}
        for row in self._children("layers", ident):
            row["shape"] = json.loads(row["shape"]) if row["shape"] is not None else None
            record["layers"][row.pop("name")] = row
        record["metrics"] = self._children("metrics", ident)
        for row in record["metrics"]:
            row["protocol"] = json.loads(row["protocol"]) if row["protocol"] is not None else None
        record["pushes"] = self._children("pushes", ident)
        return record

    def resolve_id(self, id_or_prefix: str) -> str:
        """The full id of the one artifact whose id starts with ``id_or_prefix``."""
        prefix = (id_or_prefix or "").strip().lower()
        if not prefix:
            raise RegistryError("an artifact id (or the start of one) is needed")
        rows = self._query(
            "select id, path from artifacts where substr(id, 1, length(:p)) = :p order by id",
            {"p": prefix},
        )
        if not rows:
            raise RegistryError(f"no artifact with id '{prefix}' in {self.path}")
        if len(rows) > 1:
            shown = ", ".join(f"{row['id']} ({row['path']})" for row in rows[:MAX_CANDIDATES_SHOWN])
            more = f" and {len(rows) - MAX_CANDIDATES_SHOWN} more" if len(rows) > MAX_CANDIDATES_SHOWN else ""
            raise RegistryError(
                f"artifact id '{prefix}' is ambiguous, it matches {len(rows)} artifacts: {shown}{more}"
            )
        return rows[0]["id"]

    # -- helpers ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _writing(self, what: str) -> Iterator[None]:
        """A write transaction whose SQLite errors read as RegistryError("<what> (<error>)")."""
        try:
            with _write_transaction(self.db):
                yield
        except (sqlite3.Error, OverflowError) as exc:
            # OverflowError: an int too large for SQLite, raised when binding it.
            raise RegistryError(f"{what} in {self.path} ({exc})") from exc

    def _query(self, sql: str, params: list | dict) -> list[dict[str, Any]]:
        try:
            return list(self.db.query(sql, params))
        except sqlite3.Error as exc:
            raise RegistryError(f"cannot read {self.path} ({exc})") from exc

    def _row(self, ident: str, *columns: str) -> dict[str, Any] | None:
        rows = self._query(f"select {', '.join(columns)} from artifacts where id = ?", [ident])
        return rows[0] if rows else None

    def _children(self, table: str, ident: str) -> list[dict[str, Any]]:
        rows = self._query(f"select * from [{table}] where artifact_id = ? order by rowid", [ident])
        for row in rows:
            del row["artifact_id"]
        return rows


@contextlib.contextmanager
def _write_transaction(db: Database) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error. sqlite-utils calls made inside nest
    as savepoints (``db.atomic`` sees the open transaction)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.rollback()
        raise
    else:
        db.commit()


def _check_is_registry(db: Database, path: Path) -> None:
    """Refuse to add qconv's tables to someone else's SQLite database: a file with tables must
    have qconv's migrations recorded. Reading the schema also fails for a file that is not
    SQLite at all ("file is not a database")."""
    tables = [name for name in db.table_names() if not name.startswith("sqlite_")]
    if tables and not migrations.applied(db):
        shown = ", ".join(tables[:5]) + (", ..." if len(tables) > 5 else "")
        raise RegistryError(f"{path}: not a qconv registry (a SQLite database with other tables: {shown})")


def _is_not_a_database(exc: sqlite3.DatabaseError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return code in (sqlite3.SQLITE_NOTADB, getattr(sqlite3, "SQLITE_CORRUPT", 11))
    return "not a database" in str(exc) or "malformed" in str(exc)


def _with_verified_bool(row: dict[str, Any]) -> dict[str, Any]:
    row["verified"] = None if row["verified"] is None else bool(row["verified"])
    return row
