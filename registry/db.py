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
import os
import random
import re
import shutil
import sqlite3
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from qconv.errors import ArtifactError, RegistryError
from qconv.manifest import MANIFEST_NAME, read_manifest
from qconv.registry.location import registry_path
from qconv.registry.manifest_rows import (
    absolute_path,
    artifact_id,
    rows_from_manifest,
    to_json,
    verified_flag,
)
from qconv.registry.migrations import METRIC_COLUMNS_FROM_PROTOCOL, migrations

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
# Computed for each listed artifact besides LIST_COLUMNS: how many pushes it has, and its latest
# perplexity (whatever the protocol: `qconv show` has the protocol of each).
LIST_EXTRA_COLUMNS = ("pushes", "ppl")
# --sort keys -> the column, and whether the natural order is descending (NULLs always last).
SORTS = {
    "created": ("created", True),
    "size": ("size_bytes", False),
    "bits": ("bits_per_weight", False),
    "error": ("worst_rel_error", False),
    "ppl": ("ppl", False),
    "method": ("method", False),
    "base": ("base_model", False),
}
PUSH_COLUMNS = ("id", "artifact_id", "repo", "revision", "commit_sha", "url", "created")
# What a bare reference that is an id (or the start of one) looks like; anything else is a path.
ID_PREFIX = re.compile(r"[0-9a-fA-F]{1,12}")
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
        newer = _unknown_migrations(db)
        if newer:  # never apply this qconv's migrations to a schema it does not know
            db.enable_wal()
        else:
            _prepare_schema(db)
    except sqlite3.DatabaseError as exc:
        conn.close()
        if _is_not_a_database(exc):
            raise RegistryError(f"{path}: not a qconv registry ({exc})") from exc
        raise RegistryError(f"{path}: cannot open the registry ({exc})") from exc
    except BaseException:
        conn.close()
        raise
    return Registry(db, path, newer)


def open_registry_readonly(path: str | Path | None = None) -> Registry:
    """Open the registry at ``path`` (default :func:`registry_path`) for reading only: SQLite
    itself refuses every write on this connection (``mode=ro``), and nothing is created or
    migrated. Raises RegistryError when there is no registry there or the file is not one."""
    path = Path(path).expanduser() if path is not None else registry_path()
    if not path.is_file():
        raise RegistryError(f"{path}: no registry there (nothing has been recorded yet)")
    # a URI, so that mode=ro applies; the path quoted, as a file name may hold '?' or '#'
    uri = f"file:{urllib.parse.quote(str(path.resolve()))}?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S)
    except sqlite3.Error as exc:
        raise RegistryError(f"{path}: cannot open the registry ({exc})") from exc
    try:
        db = Database(conn)
        _check_is_registry(db, path)
        if not migrations.applied(db):
            raise RegistryError(f"{path}: not a qconv registry (no tables)")
        newer = _unknown_migrations(db)
    except sqlite3.DatabaseError as exc:
        conn.close()
        if _is_not_a_database(exc):
            raise RegistryError(f"{path}: not a qconv registry ({exc})") from exc
        raise RegistryError(f"{path}: cannot open the registry ({exc})") from exc
    except BaseException:
        conn.close()
        raise
    return Registry(db, path, newer)


def _unknown_migrations(db: Database) -> tuple[str, ...]:
    """Migrations recorded in the file that this qconv does not have: a newer qconv wrote it."""
    known = set(known_migrations())
    return tuple(sorted(m.name for m in migrations.applied(db) if m.name not in known))


def known_migrations() -> tuple[str, ...]:
    """This qconv's migrations, in order: all of them are pending on an empty database
    (sqlite-utils' public view of the set, rather than its private list)."""
    return tuple(m.name for m in migrations.pending(Database(memory=True)))


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

    def __init__(self, db: Database, path: Path, newer: tuple[str, ...] = ()):
        self.db = db
        self.path = path
        #: migrations a newer qconv recorded in this file (then it is only read, never written)
        self.newer = newer

    def check_writable(self) -> None:
        """Refuse to write into a registry a newer qconv wrote: its schema may hold columns and
        rules this qconv would leave inconsistent. Reading it stays possible."""
        if self.newer:
            raise RegistryError(
                f"{self.path}: written by a newer qconv (migration {', '.join(self.newer)}; this qconv "
                f"knows {', '.join(known_migrations())}); not writing to it: upgrade qconv"
            )

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
        self.check_writable()
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
        self.check_writable()
        flag = verified_flag(verify)
        with self._writing(f"cannot store the verify result for {artifact_id}"):
            ident = self.resolve_id(artifact_id)
            self.db.table("artifacts").update(ident, {"verify": to_json(verify), "verified": flag})
        return ident

    def record_verify_for_path(self, path: str | Path, verify: dict) -> str | None:
        """Store a verify result for the newest artifact recorded at ``path`` (the folder there
        now); return its id, or None when nothing was recorded there."""
        self.check_writable()
        flag = verified_flag(verify)
        with self._writing(f"cannot store the verify result for {path}"):
            ident = self._newest_at_path(path)
            if ident is None:
                return None
            self.db.table("artifacts").update(ident, {"verify": to_json(verify), "verified": flag})
        return ident

    def record_push(
        self, artifact_id: str, repo: str, revision: str | None, commit_sha: str | None, url: str | None
    ) -> dict[str, Any]:
        """Record an upload of an artifact (id or unique prefix) to a hub: the repo id, the
        revision (branch or tag) pushed to, the commit it made, a url to it. Returns the stored
        row (keys ``PUSH_COLUMNS``); ``created`` is now, in UTC."""
        self.check_writable()
        if not isinstance(repo, str) or not repo.strip():
            raise RegistryError("a push needs the repo it went to")
        row = {
            "repo": repo,
            "revision": revision,
            "commit_sha": commit_sha,
            "url": url,
            "created": _now(),
        }
        with self._writing(f"cannot record a push of {artifact_id}"):
            row["artifact_id"] = self.resolve_id(artifact_id)
            row["id"] = self.db.table("pushes").insert(row).last_pk
        return {column: row[column] for column in PUSH_COLUMNS}

    def record_metric(self, artifact_id: str, name: str, value: float, protocol: dict) -> dict[str, Any]:
        """Record one measurement of an artifact (id or unique prefix): ``name`` (ppl, nll, kl,
        top1...), its value, and the protocol it was measured with (a JSON object; its keys
        dataset, dataset_sha256, seqlen, windows and tokens are copied into columns too).
        Returns the stored row."""
        self.check_writable()
        return self.record_metrics(artifact_id, {name: value}, protocol)[0]

    def record_metrics(self, artifact_id: str, values: dict[str, float], protocol: dict) -> list[dict]:
        """Several measurements made together under one protocol, in one transaction."""
        self.check_writable()
        if not isinstance(protocol, dict):
            raise RegistryError("a metric's protocol must be an object (dict)")
        columns = {
            column: protocol.get(path.removeprefix("$."))
            for column, (_, path) in METRIC_COLUMNS_FROM_PROTOCOL.items()
        }
        created = _now()
        rows = []
        with self._writing(f"cannot record metrics of {artifact_id}"):
            ident = self.resolve_id(artifact_id)
            for name, value in values.items():
                row = {
                    "artifact_id": ident,
                    "name": name,
                    "value": None if value is None else float(value),
                    "protocol": to_json(protocol),
                    "created": created,
                    **columns,
                }
                row["id"] = self.db.table("metrics").insert(row).last_pk
                rows.append(row)
        return rows

    def remove_artifact(self, ref: str | Path, delete_files: bool = False) -> dict[str, Any]:
        """Remove the artifact ``ref`` names (see :meth:`resolve`) with all its rows; with
        ``delete_files`` its folder too, but only when that folder really is this artifact: a
        folder whose ``qconv.json`` gives this id, holding nothing but the files it lists.
        Otherwise RegistryError, and nothing is removed. Returns ``{"id", "path",
        "files_deleted"}`` (False when the folder was gone already)."""
        self.check_writable()
        row = self.resolve(ref)
        ident, folder = row["id"], Path(row["path"])
        if not delete_files:
            self._delete_rows(ident)
            return {"id": ident, "path": str(folder), "files_deleted": False}
        if not folder.exists() and not folder.is_symlink():
            self._delete_rows(ident)
            return {"id": ident, "path": str(folder), "files_deleted": False}
        _check_is_this_artifact(folder, ident)
        # Out of the way first, so the row and the folder go together: if deleting the row
        # fails, the folder is put back.
        doomed = folder.parent / f".{folder.name}.qconv-rm-{os.getpid()}"
        os.replace(folder, doomed)
        try:
            self._delete_rows(ident)
        except BaseException:
            os.replace(doomed, folder)
            raise
        shutil.rmtree(doomed)
        return {"id": ident, "path": str(folder), "files_deleted": True}

    # -- reading ------------------------------------------------------------------------------
    def list_artifacts(
        self,
        method: str | None = None,
        *,
        bits: int | None = None,
        base: str | None = None,
        pushed: bool | None = None,
        sort: str = "created",
        reverse: bool = False,
    ) -> list[dict[str, Any]]:
        """One summary dict per artifact (keys: ``LIST_COLUMNS`` + ``LIST_EXTRA_COLUMNS``).

        Filters: ``method``; ``bits`` (the recipe's); ``base``, a case-insensitive part of the
        base model's name or the source's path/repo id; ``pushed`` True (pushed at least once) or
        False (never). ``sort``: a key of ``SORTS`` (created: newest first; the others smallest
        first), ``reverse`` flips it; NULLs last. ``verified`` is True, False or None (never)."""
        if sort not in SORTS:
            raise RegistryError(f"cannot sort by {sort!r}; choose from {', '.join(SORTS)}")
        where, params = [], {}
        if method is not None:
            where.append("method = :method")
            params["method"] = method
        if bits is not None:
            where.append("bits = :bits")
            params["bits"] = bits
        if base:
            where.append(
                "(instr(lower(coalesce(base_model, '')), lower(:base)) > 0 "
                "or instr(lower(coalesce(source_ref, '')), lower(:base)) > 0)"
            )
            params["base"] = base
        if pushed is not None:
            where.append(
                f"{'' if pushed else 'not '}exists (select 1 from pushes p where p.artifact_id = a.id)"
            )
        column, descending = SORTS[sort]
        direction = "desc" if descending != reverse else "asc"
        order = f"({column} is null), {column} {direction}, created desc, rowid desc"  # ties: newest first
        return self._list(where, params, order)

    def _list(self, where: list[str], params: dict, order: str) -> list[dict[str, Any]]:
        sql = (
            f"select {', '.join(LIST_COLUMNS)}, "
            "(select count(*) from pushes p where p.artifact_id = a.id) as pushes, "
            "(select value from metrics m where m.artifact_id = a.id and m.name = 'ppl' "
            "order by m.created desc, m.id desc limit 1) as ppl "
            f"from artifacts a {'where ' + ' and '.join(where) if where else ''} order by {order}"
        )
        return [_with_verified_bool(row) for row in self._query(sql, params)]

    def resolve(self, ref: str | Path) -> dict[str, Any]:
        """The artifact ``ref`` names, as a ``list_artifacts`` row: a full id, a unique id prefix
        (up to 12 hex digits), or the path of a recorded artifact folder (the newest artifact
        recorded there). A ``Path``, or text that is not hex or names an existing file or
        folder, is a path. Raises RegistryError, naming the candidates of an ambiguous prefix."""
        if is_path_ref(ref):
            ident = self._newest_at_path(ref)
            if ident is None:
                raise RegistryError(f"{ref}: no artifact recorded at {absolute_path(ref)} in {self.path}")
        else:
            ident = self.resolve_id(str(ref))
        return self._list(["id = :id"], {"id": ident}, "id")[0]

    def list_pushes(self, artifact_id: str | None = None) -> list[dict[str, Any]]:
        """Every recorded push (keys ``PUSH_COLUMNS``), oldest first; only those of one artifact
        (id or unique prefix) when given."""
        where, params = "", []
        if artifact_id is not None:
            where, params = "where artifact_id = ?", [self.resolve_id(artifact_id)]
        return self._query(
            f"select {', '.join(PUSH_COLUMNS)} from pushes {where} order by created, id", params
        )

    def get_artifact(self, id_or_prefix: str) -> dict[str, Any]:
        """Everything recorded about one artifact (id or unique prefix): the columns of
        ``artifacts`` with JSON decoded, plus ``source_files`` and ``files`` ({name: {sha256,
        size}}), ``layers`` ({name: {...}}), ``metrics`` and ``pushes`` (lists)."""
        ident = self.resolve_id(id_or_prefix)
        record = self._query("select * from artifacts where id = ?", [ident])[0]
        for column in JSON_COLUMNS:
            record[column] = _loads(record[column])
        record = _with_verified_bool(record)
        for table in ("source_files", "files"):
            record[table] = {
                row["name"]: {"sha256": row["sha256"], "size": row["size"]}
                for row in self._children(table, ident)
            }
        record["layers"] = {}
        for row in self._children("layers", ident):
            row["shape"] = _loads(row["shape"])
            record["layers"][row.pop("name")] = row
        record["metrics"] = self._children("metrics", ident)
        for row in record["metrics"]:
            row["protocol"] = _loads(row["protocol"])
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
    def _newest_at_path(self, path: str | Path) -> str | None:
        """The id of the newest artifact recorded at ``path``, or None."""
        found = self._query(
            "select id from artifacts where path = ? order by created desc, rowid desc limit 1",
            [str(absolute_path(path))],
        )
        return found[0]["id"] if found else None

    def _delete_rows(self, ident: str) -> None:
        """The artifact's row and every row that refers to it (files, layers, metrics, pushes:
        ON DELETE CASCADE). Files on disk stay."""
        with self._writing(f"cannot remove {ident}"):
            self.db.execute("delete from artifacts where id = ?", [ident])

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


@dataclass(frozen=True)
class ResolvedArtifact:
    """What a command given an artifact works on: its folder (or a ``.gguf`` file), its registry
    id when the registry knows it, its manifest (None for a folder or file qconv did not write)
    and whether it passed verification (the registry's latest result, else the manifest's; None:
    never verified)."""

    path: Path
    id: str | None
    manifest: dict[str, Any] | None = None
    verified: bool | None = None


def resolve_artifact(registry: Registry | None, ref: str | Path) -> ResolvedArtifact:
    """The one way a command turns ``ref`` (an id, a unique id prefix, or a path) into an artifact.

    A path (see :meth:`Registry.resolve`) is taken as it is, recorded or not; the folder itself is
    not checked here. Its id is the one its own ``qconv.json`` gives, when the registry holds
    that id: a folder replaced by an unrecorded conversion is not the artifact recorded there
    before, and gets no id (nothing is recorded against the old row).

    An id or prefix must name a recorded artifact whose folder still holds it: RegistryError when
    the id is unknown or ambiguous, when the folder is gone, or when the ``qconv.json`` there now
    describes another artifact (the folder was replaced, or deleted and written again); the stale
    row is never handed back as if it were the folder's artifact."""
    if is_path_ref(ref):
        path = Path(ref).expanduser()
        manifest = _manifest_or_none(path)
        ident = _manifest_id(manifest, path)
        row = None
        if ident is not None and registry is not None:
            row = registry._row(ident, "verified")
        if row is None:
            passed = ((manifest or {}).get("verify") or {}).get("passed")
            return ResolvedArtifact(path, None, manifest, passed if isinstance(passed, bool) else None)
        return ResolvedArtifact(path, ident, manifest, _with_verified_bool(row)["verified"])
    if registry is None:
        raise RegistryError(f"{ref}: no such folder (and no registry to look the id up in)")
    row = registry.resolve(ref)
    path = Path(row["path"])
    if not path.exists():
        raise RegistryError(f"{ref}: artifact {row['id']} was recorded at {path}, which no longer exists")
    manifest = _manifest_or_none(path)
    found = _manifest_id(manifest, path)
    if found != row["id"]:
        what = f"artifact {found}" if found else "no qconv artifact"
        raise RegistryError(
            f"{ref}: artifact {row['id']} was recorded at {path}, which now holds {what} "
            "(replaced or removed since it was recorded)"
        )
    return ResolvedArtifact(path, row["id"], manifest, row["verified"])


def _manifest_or_none(path: Path) -> dict[str, Any] | None:
    """The manifest of the folder ``path``, or None (no folder, no manifest, or a broken one:
    the caller that needs one says what is wrong with the folder)."""
    try:
        return read_manifest(path)
    except ArtifactError:
        return None


def _manifest_id(manifest: dict[str, Any] | None, path: Path) -> str | None:
    if manifest is None:
        return None
    try:
        return artifact_id(manifest, path)
    except RegistryError:  # a manifest without the files or time an id is made from
        return None


def is_path_ref(ref: str | Path) -> bool:
    """Whether a command's artifact argument names a path (a ``Path``, text that is not up to 12
    hex digits, or names an existing file or folder) rather than an id or id prefix."""
    if isinstance(ref, Path):
        return True
    text = str(ref).strip()
    return not ID_PREFIX.fullmatch(text) or Path(text).expanduser().exists()


def _check_is_this_artifact(folder: Path, ident: str) -> None:
    """Refuse (RegistryError) to delete a folder that is not exactly the artifact ``ident``."""
    keep = "; not deleting it"
    if folder.is_symlink() or not folder.is_dir():
        raise RegistryError(f"{folder}: not a folder{keep}")
    manifest_path = folder / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RegistryError(f"{folder}: no {MANIFEST_NAME}, not a qconv artifact{keep}") from None
    except (OSError, ValueError) as exc:
        raise RegistryError(f"{manifest_path}: not a readable qconv manifest ({exc}){keep}") from None
    try:
        found = artifact_id(manifest, folder) if isinstance(manifest, dict) else None
    except RegistryError:
        found = None
    if found != ident:
        what = f"artifact {found}" if found else "something else"
        raise RegistryError(f"{folder}: its {MANIFEST_NAME} describes {what}, not {ident}{keep}")
    listed = set(manifest["files"]) | {MANIFEST_NAME}
    extra = sorted(p.name for p in folder.iterdir() if p.name not in listed or not p.is_file())
    if extra:
        raise RegistryError(f"{folder}: holds {extra[0]}, which is not one of the artifact's files{keep}")


def _loads(text: str | None) -> Any:
    """A JSON column's value; text that is not JSON (written by hand, say) as it is."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
