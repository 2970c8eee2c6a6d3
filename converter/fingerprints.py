"""The sha256 qconv computed of a source file, remembered with the file's stat, so that
``qconv release --dry-run`` can tell an unchanged source from a changed one without reading it.

Why a stat can stand for the bytes (the same test git's index uses to skip re-reading files,
git's Documentation/technical/racy-git.txt): every write to a file sets its ctime (and mtime) to
the current time, and replacing it (a copy, a download, a rename over it) gives a new inode or a
new ctime. A user can set mtime back (``touch -r``, ``cp -p``, ``rsync -t``) but not ctime, which
``utime()`` itself sets. So a file whose (device, inode, size, mtime, ctime) is what it was when
qconv hashed it has not been written since. Two more guards:

- The stat is taken before the hash and compared after it; a file written meanwhile is not
  remembered. A file changed less than ``RACY_NS`` before that first stat is not remembered
  either: a second write in the same timestamp tick would leave the stat as it was ("racily
  clean" in git's words; ``RACY_NS`` is far above Linux's coarse clock tick and FAT's 2 s mtime).
- The sha256 of the file's first and last MiB is kept too and compared, for file systems whose
  inode numbers or ctimes are not stable (some network and FUSE file systems).

What is left (a file edited in the middle on a file system that keeps neither mtime nor ctime, a
clock set back) is why only a dry run relies on it: the real run hashes every file wholly. The
store is a cache beside the registry (``source-fingerprints.db``); losing it, or any error
reading or writing it, only makes a dry run say it cannot tell.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from pathlib import Path

from qconv.registry.location import registry_path

STORE_NAME = "source-fingerprints.db"
EDGE_BYTES = 1 << 20  # the first and the last MiB
RACY_NS = 2_000_000_000  # see the module docstring
SCHEMA = """create table if not exists files (
    path text primary key, dev integer, ino integer, size integer, mtime_ns integer,
    ctime_ns integer, edges text, sha256 text, hashed_at real)"""

StatKey = tuple[int, int, int, int, int]  # dev, ino, size, mtime_ns, ctime_ns


def stat_key(path: Path) -> StatKey | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def taken_before_hashing(paths: list[Path]) -> dict[str, tuple[Path, StatKey | None, int]]:
    """``{file name: (path, its stat, when)}`` taken before hashing ``paths``, for :func:`remember`."""
    now = time.time_ns()
    return {p.name: (p, stat_key(p), now) for p in paths}


def edge_digest(path: Path, size: int) -> str:
    """sha256 of the first and the last ``EDGE_BYTES`` of a file (the whole file when smaller)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(EDGE_BYTES))
        if size > EDGE_BYTES:
            f.seek(max(EDGE_BYTES, size - EDGE_BYTES))
            digest.update(f.read(EDGE_BYTES))
    return digest.hexdigest()


def store_path(home: str | Path | None = None) -> Path:

    return registry_path(home).parent / STORE_NAME


def remember(before: dict[str, tuple[Path, StatKey | None, int]], hashes: dict[str, dict]) -> None:
    """Keep ``hashes`` (``{file name: {"sha256", "size"}}``) of files unchanged since ``before``."""
    rows = []
    for name, (path, key, taken) in before.items():
        found = hashes.get(name)
        if key is None or found is None or found.get("size") != key[2]:
            continue
        if taken - max(key[3], key[4]) < RACY_NS or stat_key(path) != key:
            continue
        try:
            edges = edge_digest(path, key[2])
        except OSError:
            continue
        rows.append((str(path.resolve()), *key, edges, found["sha256"], time.time()))
    if not rows:
        return
    try:
        path = store_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        with _connect(path) as db:
            db.executemany("insert or replace into files values (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    except (sqlite3.Error, OSError):
        pass  # a cache: a dry run then hashes or says it cannot tell


def recall(path: Path) -> str | None:
    """The sha256 qconv computed of ``path`` when it was as it is now, else None."""
    key = stat_key(path)
    store = store_path()
    if key is None or not store.is_file():
        return None
    try:
        with _connect(store) as db:
            row = db.execute(
                "select dev, ino, size, mtime_ns, ctime_ns, edges, sha256 from files where path = ?",
                (str(path.resolve()),),
            ).fetchone()
    except (sqlite3.Error, OSError):
        return None
    if row is None or tuple(row[:5]) != key:
        return None
    try:
        if edge_digest(path, key[2]) != row[5]:
            return None
    except OSError:
        return None
    return row[6]


class _connect:
    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> sqlite3.Connection:
        self.db = sqlite3.connect(self.path, timeout=10)
        self.db.execute(SCHEMA)
        return self.db

    def __exit__(self, kind, exc, tb) -> None:
        if kind is None:
            self.db.commit()
        self.db.close()
