"""The registry: recording, listing, ids, transactions, migrations, concurrency."""

from __future__ import annotations

import copy
import hashlib
import json
import multiprocessing
import sqlite3
import sys
from pathlib import Path

import pytest
from sqlite_utils import Migrations

from qconv.errors import RegistryError
from qconv.manifest import base_model_name
from qconv.registry import artifact_id, open_registry, registry_path
from qconv.registry import db as registry_db
from qconv.registry.migrations import MIGRATION_SET, migrations

TABLES = ["artifacts", "source_files", "files", "layers", "metrics", "pushes"]
MIGRATIONS = [
    ("qconv", "m001_initial"),
    ("qconv", "m002_provenance_columns"),
    ("qconv", "m003_base_model_revision"),
]


def make_manifest(method="bnb", created="2026-11-24T21:00:00+00:00", verify=None, layers=None):
    return {
        "qconv": "0.1.0",
        "created": created,
        "source": {
            "kind": "hf",
            "ref": "/models/SmolLM2-135M",
            "revision": None,
            "files": {"model.safetensors": {"sha256": "a" * 64, "size": 1000}},
        },
        "recipe": {
            "method": method,
            "bits": 4,
            "quant_type": "nf4",
            "double_quant": True,
            "blocksize": 64,
            "dtype": "bfloat16",
            "skip": [],
            "label": f"{method} nf4+dq",
        },
        "calibration": None,
        "environment": {
            "python": "3.11.7",
            "torch": "2.13.0",
            "transformers": "5.24.0",
            "bitsandbytes": "0.50.2",
            "device": "cpu",
            "gpu": None,
        },
        "layers": layers
        if layers is not None
        else {
            "model.layers.0.self_attn.q_proj": {
                "rel_error": 0.09,
                "max_abs": 0.01,
                "snr_db": 20.1,
                "shape": [576, 576],
                "format": "bnb nf4+dq",
            },
            "model.layers.0.mlp.down_proj": {
                "rel_error": 0.11,
                "max_abs": 0.02,
                "snr_db": 19.0,
                "shape": [576, 1536],
                "format": "bnb nf4+dq",
            },
        },
        "skipped": {"lm_head": "output embeddings stay unquantized by default"},
        "files": {
            "model.safetensors": {"sha256": "b" * 64, "size": 300},
            "config.json": {"sha256": "c" * 64, "size": 20},
        },
        "summary": {
            "quantized_params": 1000,
            "total_params": 2000,
            "bits_per_weight": 4.13,
            "worst_layer": "model.layers.0.mlp.down_proj",
            "worst_rel_error": 0.11,
        },
        "verify": verify,
    }


PASSED = {"passed": True, "checks": [{"name": "sha256", "passed": True, "detail": "2 files"}]}
FAILED = {"passed": False, "checks": [{"name": "sha256", "passed": False, "detail": "config.json"}]}


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("QCONV_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def registry(home):
    with open_registry() as registry:
        yield registry


def counts(registry) -> dict[str, int]:
    return {table: registry.db.table(table).count for table in TABLES}


# -- where ------------------------------------------------------------------------------------
def test_registry_path_prefers_argument_then_qconv_home_then_xdg(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.setenv("QCONV_HOME", str(tmp_path / "qh"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert registry_path(tmp_path / "arg") == tmp_path / "arg" / "registry.db"
    assert registry_path() == tmp_path / "qh" / "registry.db"
    monkeypatch.delenv("QCONV_HOME")
    assert registry_path() == tmp_path / "xdg" / "qconv" / "registry.db"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/is/ignored")
    assert registry_path() == tmp_path / "user" / ".local" / "share" / "qconv" / "registry.db"


def test_open_registry_creates_the_file_under_qconv_home(home):
    with open_registry() as registry:
        assert registry.path == home / "registry.db"
    assert (home / "registry.db").is_file()


# -- record, list, get ------------------------------------------------------------------------
def test_record_list_and_get_by_prefix(registry, tmp_path):
    out = tmp_path / "out" / "smol-nf4"
    ident = registry.record_artifact(make_manifest(), out)
    assert ident == artifact_id(make_manifest(), out)
    assert registry.list_artifacts() == [
        {
            "id": ident,
            "path": str(out.resolve()),
            "base_model": "SmolLM2-135M",
            "source_ref": "/models/SmolLM2-135M",
            "method": "bnb",
            "bits": 4,
            "label": "bnb nf4+dq",
            "size_bytes": 320,
            "bits_per_weight": 4.13,
            "worst_rel_error": 0.11,
            "verified": None,
            "created": "2026-11-24T21:00:00+00:00",
            "pushes": 0,
            "ppl": None,
        }
    ]
    record = registry.get_artifact(ident[:5])
    assert record["id"] == ident
    assert record["worst_layer"] == "model.layers.0.mlp.down_proj"
    assert record["recipe"] == make_manifest()["recipe"]
    assert record["environment"] == make_manifest()["environment"]
    assert record["skipped"] == make_manifest()["skipped"]
    assert record["calibration"] is None
    assert record["files"] == make_manifest()["files"]
    assert record["source_files"] == make_manifest()["source"]["files"]
    assert record["layers"] == make_manifest()["layers"]
    assert list(record["layers"]) == list(make_manifest()["layers"])  # manifest order kept
    assert record["manifest"] == make_manifest()
    assert (record["quantized_params"], record["total_params"]) == (1000, 2000)
    assert (record["metrics"], record["pushes"]) == ([], [])
    # m002's plain columns
    assert (record["python_version"], record["torch_version"], record["transformers_version"]) == (
        "3.11.7",
        "2.13.0",
        "5.24.0",
    )
    assert (record["method_library"], record["method_library_version"]) == ("bitsandbytes", "0.50.2")
    assert (record["device"], record["gpu"], record["calibration_sha256"]) == ("cpu", None, None)


def test_artifact_id_is_pinned(tmp_path):
    # The formula is part of the registry's contract: ids written by one version must be
    # recomputable by the next.
    manifest = make_manifest()
    out = tmp_path / "out"
    canonical = json.dumps(manifest["files"], sort_keys=True, separators=(",", ":"))
    text = f"{canonical}\n{out.resolve()}\n{manifest['created']}"
    assert artifact_id(manifest, out) == hashlib.sha256(text.encode()).hexdigest()[:12]
    assert artifact_id(manifest, out) != artifact_id(manifest, tmp_path / "elsewhere")
    assert artifact_id(manifest, out) != artifact_id(make_manifest(created="2026-11-25T00:00:00+00:00"), out)


def test_unknown_and_ambiguous_prefix(registry, tmp_path):
    ids = [registry.record_artifact(make_manifest(), tmp_path / f"a{i}") for i in range(20)]
    with pytest.raises(RegistryError) as excinfo:
        registry.get_artifact("xyz")
    assert str(excinfo.value) == f"no artifact with id 'xyz' in {registry.path}"
    # 20 ids, 16 hex digits: at least two share their first character.
    first = sorted(ids, key=lambda i: [x[0] for x in ids].count(i[0]))[-1][0]
    matching = sorted(i for i in ids if i.startswith(first))
    with pytest.raises(RegistryError) as excinfo:
        registry.get_artifact(first)
    message = str(excinfo.value)
    assert message.startswith(f"artifact id '{first}' is ambiguous, it matches {len(matching)} artifacts: ")
    assert f"{matching[0]} ({(tmp_path / ('a' + str(ids.index(matching[0])))).resolve()})" in message
    assert "\n" not in message
    with pytest.raises(RegistryError, match="an artifact id"):
        registry.get_artifact("  ")


def test_rerecord_replaces_manifest_rows_and_keeps_metrics_and_verify(registry, tmp_path):
    manifest = make_manifest()
    ident = registry.record_artifact(manifest, tmp_path / "out")
    registry.db.table("metrics").insert({"artifact_id": ident, "name": "ppl", "value": 12.5})
    registry.set_verify(ident, PASSED)
    before = counts(registry)
    assert registry.record_artifact(manifest, tmp_path / "out") == ident
    assert counts(registry) == before

    fewer = make_manifest(
        layers={"model.layers.0.self_attn.q_proj": manifest["layers"]["model.layers.0.self_attn.q_proj"]}
    )
    assert registry.record_artifact(fewer, tmp_path / "out") == ident
    record = registry.get_artifact(ident)
    assert list(record["layers"]) == ["model.layers.0.self_attn.q_proj"]
    assert record["worst_rel_error"] == 0.09
    assert record["verified"] is True  # stored since, kept: the manifest carries no verify
    assert [m["name"] for m in record["metrics"]] == ["ppl"]
    assert counts(registry)["artifacts"] == 1


def test_verified_is_none_true_or_false(registry, tmp_path):
    never = registry.record_artifact(make_manifest(), tmp_path / "never")
    passed = registry.record_artifact(make_manifest(verify=PASSED), tmp_path / "passed")
    failed = registry.record_artifact(make_manifest(verify=FAILED), tmp_path / "failed")
    verified = {row["id"]: row["verified"] for row in registry.list_artifacts()}
    assert verified == {never: None, passed: True, failed: False}
    assert registry.get_artifact(failed)["verify"] == FAILED

    assert registry.set_verify(never[:6], PASSED) == never
    assert registry.get_artifact(never)["verified"] is True
    assert registry.get_artifact(never)["verify"] == PASSED
    with pytest.raises(RegistryError) as excinfo:
        registry.set_verify(never, {"checks": []})
    assert str(excinfo.value) == 'a verify result must be an object with "passed": true or false'


def test_record_verify_for_path_updates_the_newest_artifact_there(registry, tmp_path):
    registry.record_artifact(make_manifest(created="2026-11-24T20:00:00+00:00"), tmp_path / "out")
    newest = registry.record_artifact(make_manifest(created="2026-11-24T21:00:00+00:00"), tmp_path / "out")
    assert registry.record_verify_for_path(tmp_path / "out", FAILED) == newest
    assert [row["verified"] for row in registry.list_artifacts()] == [False, None]
    assert registry.record_verify_for_path(tmp_path / "unrecorded", PASSED) is None


def test_list_filters_by_method_newest_first(registry, tmp_path):
    old = registry.record_artifact(make_manifest("bnb", "2026-11-24T20:00:00+00:00"), tmp_path / "a")
    hqq = registry.record_artifact(make_manifest("hqq", "2026-11-24T21:00:00+00:00"), tmp_path / "b")
    # Written with another offset: stored in UTC, so it sorts by time (22:30 UTC is newest).
    new = registry.record_artifact(make_manifest("bnb", "2026-11-25T00:30:00+02:00"), tmp_path / "c")
    assert [row["id"] for row in registry.list_artifacts()] == [new, hqq, old]
    assert [row["id"] for row in registry.list_artifacts(method="bnb")] == [new, old]
    assert [row["id"] for row in registry.list_artifacts(method="hqq")] == [hqq]
    assert registry.list_artifacts(method="aqlm") == []
    assert registry.get_artifact(new)["created"] == "2026-11-24T22:30:00+00:00"


@pytest.mark.parametrize(
    ("kind", "ref", "name"),
    [
        ("hub", "HuggingFaceTB/SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M"),
        ("gguf", "/models/SmolLM2-135M-Q8_0.gguf", "SmolLM2-135M-Q8_0"),
        ("hf", "/models/SmolLM2-135M/", "SmolLM2-135M"),
        ("hf", "/hf/hub/models--HuggingFaceTB--SmolLM2-135M/snapshots/12ab34", "HuggingFaceTB/SmolLM2-135M"),
    ],
)
def test_base_model_is_the_short_human_name(kind, ref, name):
    assert base_model_name(kind, ref) == name


# -- transactions -----------------------------------------------------------------------------
def test_record_is_all_or_nothing(registry, tmp_path):
    manifest = make_manifest()
    manifest["layers"]["model.layers.1.mlp.up_proj"] = 0.3  # a bad type, met after other rows
    statements = []
    with registry.db.tracer(lambda sql, params: statements.append(sql)):
        with pytest.raises(RegistryError) as excinfo:
            registry.record_artifact(manifest, tmp_path / "out")
    assert str(excinfo.value) == (
        f"cannot record {tmp_path / 'out'}: manifest layers['model.layers.1.mlp.up_proj'] is float, "
        "expected an object with rel_error, max_abs, snr_db, shape, format"
    )
    # It failed half-way: the artifact and its files had been inserted, then rolled back.
    assert any(sql.startswith('INSERT INTO "artifacts"') for sql in statements)
    assert any(sql.startswith('INSERT INTO "files"') for sql in statements)
    assert counts(registry) == dict.fromkeys(TABLES, 0)


def test_failed_rerecord_leaves_the_old_record(registry, tmp_path):
    ident = registry.record_artifact(make_manifest(), tmp_path / "out")
    before = registry.get_artifact(ident)
    broken = make_manifest()
    broken["layers"]["x"] = {"rel_error": 2**70}  # too large for SQLite: fails when bound
    with pytest.raises(RegistryError, match=r"^cannot record .* \(Python int too large"):
        registry.record_artifact(broken, tmp_path / "out")
    assert registry.get_artifact(ident) == before


def test_remove_artifact_removes_every_row(registry, tmp_path):
    keep = registry.record_artifact(make_manifest(), tmp_path / "keep")
    gone = registry.record_artifact(make_manifest(), tmp_path / "gone")
    for ident in (keep, gone):
        registry.db.table("metrics").insert({"artifact_id": ident, "name": "ppl", "value": 12.5})
        registry.db.table("pushes").insert({"artifact_id": ident, "repo": "me/smol-nf4"})
    one = counts(registry)["layers"] // 2
    assert registry.remove_artifact(gone[:8]) == {
        "id": gone,
        "path": str((tmp_path / "gone").resolve()),
        "files_deleted": False,
    }
    assert counts(registry) == {
        "artifacts": 1,
        "source_files": 1,
        "files": 2,
        "layers": one,
        "metrics": 1,
        "pushes": 1,
    }
    assert [row["id"] for row in registry.list_artifacts()] == [keep]
    with pytest.raises(RegistryError, match="no artifact with id"):
        registry.remove_artifact(gone)


# -- the file ---------------------------------------------------------------------------------
def test_a_file_that_is_not_sqlite_is_refused(tmp_path):
    path = tmp_path / "registry.db"
    path.write_bytes(b"this is not a database\n" * 100)
    with pytest.raises(RegistryError) as excinfo:
        open_registry(path)
    assert str(excinfo.value) == f"{path}: not a qconv registry (file is not a database)"


def test_another_sqlite_database_is_refused_untouched(tmp_path):
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("create table dogs (name text)")
    conn.close()
    with pytest.raises(RegistryError) as excinfo:
        open_registry(path)
    assert str(excinfo.value) == f"{path}: not a qconv registry (a SQLite database with other tables: dogs)"
    conn = sqlite3.connect(path)
    assert [row[0] for row in conn.execute("select name from sqlite_master")] == ["dogs"]
    conn.close()


def test_a_path_that_cannot_be_created_is_refused(tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(RegistryError, match=r"a-file/registry.db: cannot open the registry \("):
        open_registry(tmp_path / "a-file" / "registry.db")


def test_wal_mode_and_busy_timeout(registry):
    assert registry.db.execute("PRAGMA busy_timeout").fetchone()[0] == 30000
    assert registry.db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    conn = sqlite3.connect(registry.path)  # a fresh connection: WAL is a property of the file
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def migration_rows(path):
    conn = sqlite3.connect(path)
    rows = conn.execute("select migration_set, name from _sqlite_migrations order by id").fetchall()
    conn.close()
    return rows


def test_migrations_are_applied_once(home):
    open_registry().close()
    with open_registry() as registry:
        assert set(TABLES) <= set(registry.db.table_names())
        assert counts(registry)["metrics"] == counts(registry)["pushes"] == 0
        path = registry.path
    assert migration_rows(path) == MIGRATIONS


def test_a_second_migration_is_one_decorated_function(home, tmp_path, monkeypatch):
    with open_registry() as registry:
        ident = registry.record_artifact(make_manifest(), tmp_path / "out")
        path = registry.path
    # What a later release does: the same set, one more decorated function at the end.
    upgraded = Migrations(MIGRATION_SET)
    for migration in migrations._migrations:
        upgraded(name=migration.name)(migration.fn)

    @upgraded()
    def m999_add_note(db):
        db["artifacts"].add_column("note", str)

    monkeypatch.setattr(registry_db, "migrations", upgraded)
    for _ in range(2):
        with open_registry() as registry:
            assert registry.get_artifact(ident)["note"] is None
    assert migration_rows(path) == [*MIGRATIONS, ("qconv", "m999_add_note")]


# -- several processes ------------------------------------------------------------------------
def _record_50(home: str, worker: int, barrier) -> None:
    barrier.wait()  # all eight open the new file at once: creation and migration race too
    with open_registry(Path(home) / "registry.db") as registry:
        for i in range(50):
            manifest = make_manifest(created=f"2026-11-24T21:{worker:02d}:{i:02d}+00:00")
            ident = registry.record_artifact(manifest, Path(home) / f"w{worker}-{i}")
            if i % 10 == 0:  # the other writers too, interleaved with the recording
                registry.record_metric(ident, "ppl", 20.0 + i, {"dataset": "x", "seqlen": 16})
                registry.record_push(ident, f"me/w{worker}-{i}", "main", "c" * 40, None)


def test_concurrent_processes_record(tmp_path):
    """The issue's bar: 8 processes recording 50 artifacts each into one new registry at once."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(8)
    workers = [ctx.Process(target=_record_50, args=(str(tmp_path), w, barrier)) for w in range(8)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(timeout=120)
    assert [p.exitcode for p in workers] == [0] * 8
    with open_registry(tmp_path / "registry.db") as registry:
        assert len(registry.list_artifacts()) == 400
        assert counts(registry) == {
            "artifacts": 400,
            "source_files": 400,
            "files": 800,
            "layers": 800,
            "metrics": 40,
            "pushes": 40,
        }
        assert registry.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert migration_rows(tmp_path / "registry.db") == MIGRATIONS


def test_records_do_not_share_mutable_state(registry, tmp_path):
    manifest = make_manifest()
    snapshot = copy.deepcopy(manifest)
    registry.record_artifact(manifest, tmp_path / "out")
    assert manifest == snapshot  # recording never changes the caller's manifest


# -- upgrading a first-cut registry -----------------------------------------------------------
M001_ARTIFACT_COLUMNS = [
    "id", "path", "created", "qconv_version", "method", "bits", "label", "recipe", "base_model",
    "source_kind", "source_ref", "source_revision", "calibration", "environment", "skipped",
    "size_bytes", "bits_per_weight", "quantized_params", "total_params", "worst_layer",
    "worst_rel_error", "verified", "verify", "manifest",
]  # fmt: skip


def test_a_first_cut_registry_is_upgraded_keeping_every_row(tmp_path):
    """A file made by the first release (m001 only, rows as it wrote them) opens with this
    version: every row kept, the new columns backfilled from the JSON already there."""
    from sqlite_utils import Database

    from qconv.registry.manifest_rows import rows_from_manifest

    path = tmp_path / "registry.db"
    db = Database(path)
    migrations.apply(db, stop_before="m002_provenance_columns")
    calibrated = make_manifest(method="aqlm", created="2026-11-24T22:00:00+00:00")
    calibrated["calibration"] = {"sha256": "d" * 64, "tokens": 4096, "source": "wikitext2-valid"}
    calibrated["environment"] = {"python": "3.12.3", "torch": "2.11.0", "aqlm": "1.1.7", "gpu": "H100"}
    calibrated["source"]["architecture"] = "LlamaForCausalLM"
    ids = []
    for manifest, where in ((make_manifest(), "a"), (calibrated, "b")):
        rows = rows_from_manifest(manifest, tmp_path / where)
        db["artifacts"].insert({k: rows.artifact[k] for k in M001_ARTIFACT_COLUMNS})
        for table in ("source_files", "files", "layers"):
            db[table].insert_all(getattr(rows, table))
        ids.append(rows.artifact["id"])
    protocol = {"dataset": "wikitext-2", "dataset_sha256": "e" * 64, "seqlen": 2048, "windows": 148}
    db["metrics"].insert(
        {"artifact_id": ids[1], "name": "ppl", "value": 21.6, "protocol": json.dumps(protocol)}
    )
    db["metrics"].insert({"artifact_id": ids[1], "name": "odd", "value": 1.0, "protocol": "not json"})
    db["pushes"].insert({"artifact_id": ids[0], "repo": "me/a", "revision": "main", "commit_sha": "f" * 40})
    before = {table: list(db[table].rows) for table in TABLES}
    db.close()
    assert migration_rows(path) == MIGRATIONS[:1]

    with open_registry(path) as registry:
        assert migration_rows(path) == MIGRATIONS
        after = {table: list(registry.db[table].rows) for table in TABLES}
        for table in TABLES:  # every row, every old value
            assert [{k: row[k] for k in before[table][0]} for row in after[table]] == before[table]
        plain, aqlm = (registry.get_artifact(i) for i in ids)
        assert (plain["method_library"], plain["method_library_version"]) == ("bitsandbytes", "0.50.2")
        assert (plain["python_version"], plain["transformers_version"]) == ("3.11.7", "5.24.0")
        assert (plain["calibration_sha256"], plain["calibration_tokens"]) == (None, None)
        assert (aqlm["calibration_sha256"], aqlm["calibration_tokens"]) == ("d" * 64, 4096)
        assert aqlm["calibration_source"] == "wikitext2-valid"
        assert (aqlm["method_library"], aqlm["gpu"], aqlm["device"]) == ("aqlm", "H100", None)
        assert aqlm["source_architecture"] == "LlamaForCausalLM"
        ppl, odd = aqlm["metrics"]
        assert (ppl["dataset"], ppl["dataset_sha256"], ppl["seqlen"], ppl["windows"], ppl["tokens"]) == (
            "wikitext-2",
            "e" * 64,
            2048,
            148,
            None,
        )
        assert odd["dataset"] is None  # a protocol that is not JSON is kept, not backfilled
        assert registry.list_pushes(ids[0])[0]["commit_sha"] == "f" * 40
        # and the upgraded file records as a new one does
        registry.record_artifact(make_manifest(created="2026-11-25T00:00:00+00:00"), tmp_path / "c")
        assert len(registry.list_artifacts()) == 3


# -- pushes and metrics -----------------------------------------------------------------------
def test_record_push_and_list_pushes(registry, tmp_path):
    ident = registry.record_artifact(make_manifest(), tmp_path / "out")
    other = registry.record_artifact(make_manifest(), tmp_path / "other")
    push = registry.record_push(ident[:6], "me/smol-nf4", "main", "a" * 40, "https://hf.co/me/smol-nf4")
    assert push["artifact_id"] == ident and push["repo"] == "me/smol-nf4" and push["id"] == 1
    assert push["created"].endswith("+00:00")
    registry.record_push(ident, "me/smol-nf4", "v2", "b" * 40, None)
    registry.record_push(other, "me/other", "main", None, None)
    assert [p["revision"] for p in registry.list_pushes(ident)] == ["main", "v2"]
    assert len(registry.list_pushes()) == 3
    assert registry.get_artifact(ident)["pushes"][0]["url"] == "https://hf.co/me/smol-nf4"
    with pytest.raises(RegistryError, match="no artifact with id 'abcdef'"):
        registry.record_push("abcdef", "me/x", "main", None, None)
    with pytest.raises(RegistryError, match="a push needs the repo"):
        registry.record_push(ident, "", "main", None, None)
    assert len(registry.list_pushes()) == 3


def test_record_metric_keeps_the_protocol(registry, tmp_path):
    ident = registry.record_artifact(make_manifest(), tmp_path / "out")
    protocol = {"dataset": "wikitext-2", "dataset_sha256": "e" * 64, "seqlen": 2048, "windows": 148,
                "tokens": 302956, "device": "cuda:0"}  # fmt: skip
    row = registry.record_metric(ident, "ppl", 21.61, protocol)
    assert (row["name"], row["value"], row["seqlen"], row["tokens"]) == ("ppl", 21.61, 2048, 302956)
    registry.record_metrics(ident, {"kl": 0.05, "top1": 0.9}, protocol)
    metrics = registry.get_artifact(ident)["metrics"]
    assert [(m["name"], m["value"]) for m in metrics] == [("ppl", 21.61), ("kl", 0.05), ("top1", 0.9)]
    assert metrics[0]["protocol"] == protocol and metrics[0]["dataset_sha256"] == "e" * 64
    assert registry.list_artifacts()[0]["ppl"] == 21.61
    with pytest.raises(RegistryError, match="protocol must be an object"):
        registry.record_metric(ident, "ppl", 1.0, "wikitext")


# -- listing, resolving, removing -------------------------------------------------------------
def test_list_filters_and_sorts(registry, tmp_path):
    small = make_manifest("bnb", "2026-11-24T20:00:00+00:00")
    small["recipe"]["bits"] = 8
    small["summary"]["bits_per_weight"] = 8.0
    small["files"]["model.safetensors"]["size"] = 900
    a = registry.record_artifact(small, tmp_path / "a")
    hub = make_manifest("hqq", "2026-11-24T21:00:00+00:00")
    hub["source"].update(kind="hub", ref="HuggingFaceTB/SmolLM2-360M")
    hub["summary"]["worst_rel_error"] = 0.05
    hub["layers"] = {}
    b = registry.record_artifact(hub, tmp_path / "b")
    c = registry.record_artifact(make_manifest("bnb", "2026-11-24T22:00:00+00:00"), tmp_path / "c")
    registry.record_push(b, "me/b", "main", None, None)
    registry.record_metric(c, "ppl", 27.0, {})
    registry.record_metric(a, "ppl", 22.0, {})

    def ids(**kwargs):
        return [row["id"] for row in registry.list_artifacts(**kwargs)]

    assert ids() == [c, b, a]
    assert ids(method="bnb") == [c, a]
    assert ids(bits=8) == [a] and ids(bits=4) == [c, b]
    assert ids(base="smollm2-360") == [b] and ids(base="models/SmolLM2-135M") == [c, a]
    assert ids(pushed=True) == [b] and ids(pushed=False) == [c, a]
    assert ids(method="bnb", bits=4, pushed=False) == [c]
    assert ids(sort="size") == [c, b, a] and ids(sort="size", reverse=True) == [a, c, b]
    assert ids(sort="error") == [b, c, a]  # 0.05, then 0.11 newest first among equals
    assert ids(sort="bits") == [c, b, a]
    assert ids(sort="ppl") == [a, c, b]  # no ppl: last
    assert ids(sort="created", reverse=True) == [a, b, c]
    with pytest.raises(RegistryError, match="cannot sort by 'colour'; choose from created, size"):
        registry.list_artifacts(sort="colour")


def test_resolve_by_id_prefix_or_path(registry, tmp_path, monkeypatch):
    from qconv.registry import resolve_artifact

    out = tmp_path / "out"
    out.mkdir()
    old = registry.record_artifact(make_manifest(created="2026-11-24T20:00:00+00:00"), out)
    new = registry.record_artifact(make_manifest(created="2026-11-24T21:00:00+00:00"), out)
    assert registry.resolve(new)["id"] == new
    assert registry.resolve(old[:7].upper())["id"] == old
    assert registry.resolve(out)["id"] == new  # a folder: the newest recorded there
    assert registry.resolve(str(out))["path"] == str(out.resolve())
    monkeypatch.chdir(tmp_path)
    assert registry.resolve("out")["id"] == new  # "out" is not hex: a path
    with pytest.raises(RegistryError) as excinfo:
        registry.resolve(tmp_path / "elsewhere")
    assert str(excinfo.value) == (
        f"{tmp_path / 'elsewhere'}: no artifact recorded at {tmp_path / 'elsewhere'} in {registry.path}"
    )
    with pytest.raises(RegistryError, match="no artifact with id 'abc123'"):
        registry.resolve("abc123")

    unrecorded = tmp_path / "unrecorded"
    assert resolve_artifact(registry, str(unrecorded)) == registry_db.ResolvedArtifact(unrecorded, None)
    assert resolve_artifact(None, str(unrecorded)).id is None
    # a folder's id is the one its own qconv.json gives (none here: no manifest, whatever was
    # recorded at that path); an id must find its folder still holding that artifact
    assert resolve_artifact(registry, out) == registry_db.ResolvedArtifact(out, None)
    with pytest.raises(RegistryError) as excinfo:
        resolve_artifact(registry, new[:5])
    assert str(excinfo.value) == (
        f"{new[:5]}: artifact {new} was recorded at {out.resolve()}, which now holds no qconv artifact "
        "(replaced or removed since it was recorded)"
    )


def test_resolve_artifact_finds_the_folders_own_artifact(registry, tmp_path):
    from qconv.registry import resolve_artifact

    folder, manifest = artifact_folder(tmp_path)
    ident = registry.record_artifact(manifest, folder)
    expected = registry_db.ResolvedArtifact(folder.resolve(), ident, manifest, None)
    assert resolve_artifact(registry, ident[:6]) == expected
    assert resolve_artifact(registry, folder) == registry_db.ResolvedArtifact(folder, ident, manifest, None)
    registry.set_verify(ident, PASSED)
    assert resolve_artifact(registry, ident).verified is True
    assert resolve_artifact(None, folder) == registry_db.ResolvedArtifact(folder, None, manifest, None)


def test_resolve_artifact_refuses_a_stale_row(registry, tmp_path):
    """An artifact recorded, then its folder replaced by another (unrecorded) conversion, then
    deleted: the id never hands back the folder as if it still held that artifact, and the
    folder is never taken for the artifact recorded there before."""
    from qconv.registry import resolve_artifact

    folder, manifest = artifact_folder(tmp_path)
    ident = registry.record_artifact(manifest, folder)
    newer = make_manifest(created="2026-11-25T09:00:00+00:00")
    (folder / "qconv.json").write_text(json.dumps(newer))
    with pytest.raises(RegistryError) as excinfo:
        resolve_artifact(registry, ident)
    assert str(excinfo.value) == (
        f"{ident}: artifact {ident} was recorded at {folder.resolve()}, which now holds artifact "
        f"{artifact_id(newer, folder)} (replaced or removed since it was recorded)"
    )
    assert resolve_artifact(registry, folder) == registry_db.ResolvedArtifact(folder, None, newer, None)
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()
    with pytest.raises(RegistryError) as excinfo:
        resolve_artifact(registry, ident[:4])
    assert str(excinfo.value) == (
        f"{ident[:4]}: artifact {ident} was recorded at {folder.resolve()}, which no longer exists"
    )


def artifact_folder(tmp_path, name="out", created="2026-11-24T21:00:00+00:00"):
    """A folder whose files are what its manifest lists."""
    folder = tmp_path / name
    folder.mkdir()
    manifest = make_manifest(created=created)
    for file_name in manifest["files"]:
        (folder / file_name).write_text(file_name)
    (folder / "qconv.json").write_text(json.dumps(manifest))
    return folder, manifest


def test_remove_artifact_deletes_its_folder_only_when_it_is_that_artifact(registry, tmp_path):
    folder, manifest = artifact_folder(tmp_path)
    ident = registry.record_artifact(manifest, folder)
    registry.record_push(ident, "me/x", "main", None, None)

    (folder / "notes.txt").write_text("mine")  # something that is not the artifact's
    with pytest.raises(RegistryError) as excinfo:
        registry.remove_artifact(ident, delete_files=True)
    assert str(excinfo.value) == (
        f"{folder.resolve()}: holds notes.txt, which is not one of the artifact's files; not deleting it"
    )
    (folder / "notes.txt").unlink()

    # the folder now holds a newer conversion: its qconv.json names another id
    newer = make_manifest(created="2026-11-25T09:00:00+00:00")
    (folder / "qconv.json").write_text(json.dumps(newer))
    with pytest.raises(RegistryError, match=rf"its qconv.json describes artifact {artifact_id(newer, folder)}, not {ident}; not deleting it"):  # fmt: skip
        registry.remove_artifact(ident, delete_files=True)
    (folder / "qconv.json").unlink()
    with pytest.raises(RegistryError, match="no qconv.json, not a qconv artifact; not deleting it"):
        registry.remove_artifact(ident, delete_files=True)
    assert folder.is_dir() and counts(registry)["artifacts"] == 1 and counts(registry)["pushes"] == 1

    (folder / "qconv.json").write_text(json.dumps(manifest))
    assert registry.remove_artifact(ident[:6], delete_files=True) == {
        "id": ident,
        "path": str(folder.resolve()),
        "files_deleted": True,
    }
    assert not folder.exists() and not list(tmp_path.glob(".out.qconv-rm-*"))
    assert counts(registry) == dict.fromkeys(TABLES, 0)


def test_remove_artifact_keeps_files_unless_asked_and_copes_with_a_gone_folder(registry, tmp_path):
    folder, manifest = artifact_folder(tmp_path)
    ident = registry.record_artifact(manifest, folder)
    assert registry.remove_artifact(folder)["files_deleted"] is False
    assert folder.is_dir() and counts(registry)["artifacts"] == 0
    ident = registry.record_artifact(manifest, folder)
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()
    assert registry.remove_artifact(ident, delete_files=True)["files_deleted"] is False
    assert counts(registry)["artifacts"] == 0


def test_m003_backfills_the_base_model_revision_where_the_source_says_it(tmp_path):
    """A registry of m001 + m002 (rows written before manifests recorded a base model): the new
    column holds a Hub source's commit and a Hub-cache folder's commit; other rows stay NULL."""
    from sqlite_utils import Database

    from qconv.registry.manifest_rows import rows_from_manifest

    path = tmp_path / "registry.db"
    db = Database(path)
    migrations.apply(db, stop_before="m003_base_model_revision")
    commit = "c" * 40
    cached = f"/cache/hub/models--tiny-org--tiny-llama/snapshots/{commit}"
    sources = {
        "hub": {"kind": "hub", "ref": "tiny-org/tiny-llama", "revision": "d" * 40},
        "cache": {"kind": "hf", "ref": cached, "revision": None},
        "plain": {"kind": "hf", "ref": "/models/tiny-llama", "revision": None},
    }
    ids = {}
    for name, source in sources.items():
        manifest = make_manifest(created=f"2026-11-24T2{len(ids)}:00:00+00:00")
        manifest["source"].update(source)
        assert "base_model" not in manifest  # as qconv wrote them before issue 18
        row = rows_from_manifest(manifest, tmp_path / name).artifact
        del row["base_model_revision"]
        db["artifacts"].insert(row)
        ids[name] = row["id"]
    db.close()

    with open_registry(path) as registry:
        assert migration_rows(path) == MIGRATIONS
        got = {name: registry.get_artifact(i) for name, i in ids.items()}
    assert {name: (r["base_model"], r["base_model_revision"]) for name, r in got.items()} == {
        "hub": ("tiny-org/tiny-llama", "d" * 40),
        "cache": ("tiny-org/tiny-llama", commit),
        "plain": ("tiny-llama", None),
    }
