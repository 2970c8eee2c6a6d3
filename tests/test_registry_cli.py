"""`qconv ls` / `show` / `rm`, and commands taking an id where they take a path, through the CLI."""

from __future__ import annotations

import json
import shutil
import sqlite3

import pytest
from test_registry import PASSED, artifact_folder, make_manifest

from qconv.registry import artifact_id, open_registry


def run_error(cli, *args):
    result = cli(*args, ok=None)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
    return result.stderr.strip()


@pytest.fixture
def recorded(tmp_path, qconv_home):
    """Three artifacts: a (bnb 8-bit, pushed), b (hqq, evaluated), c (bnb 4-bit, a real folder)."""
    folder, manifest = artifact_folder(tmp_path, "c", created="2026-11-24T22:00:00+00:00")
    eight = make_manifest("bnb", "2026-11-24T20:00:00+00:00", verify=PASSED)
    eight["recipe"].update(bits=8, label="bnb int8")
    hqq = make_manifest("hqq", "2026-11-24T21:00:00+00:00")
    hqq["source"].update(kind="hub", ref="HuggingFaceTB/SmolLM2-360M", revision="f" * 40)
    with open_registry() as registry:
        a = registry.record_artifact(eight, tmp_path / "a")
        b = registry.record_artifact(hqq, tmp_path / "b")
        c = registry.record_artifact(manifest, folder)
        registry.record_push(a, "me/smol-int8", "main", "a" * 40, "https://huggingface.co/me/smol-int8")
        protocol = {"dataset": "wikitext-2", "dataset_sha256": "e" * 64, "seqlen": 2048, "windows": 148,
                    "tokens": 302956, "device": "cuda:0"}  # fmt: skip
        registry.record_metrics(b, {"ppl": 21.61, "nll": 3.0733}, protocol)
    return {"a": a, "b": b, "c": c, "folder": folder}


def ids(cli, *args):
    return [row["id"] for row in cli.json("ls", *args)[1]]


def test_ls_filters_sorts_and_json(cli, recorded):
    a, b, c = recorded["a"], recorded["b"], recorded["c"]
    assert ids(cli) == [c, b, a]
    assert ids(cli, "--method", "bnb") == [c, a]
    assert ids(cli, "--bits", "8") == [a]
    assert ids(cli, "--base", "360m") == [b]
    assert ids(cli, "--pushed") == [a] and ids(cli, "--unpushed") == [c, b]
    assert ids(cli, "--sort", "ppl") == [b, c, a]
    assert ids(cli, "--sort", "created", "--reverse") == [a, b, c]
    row = cli.json("ls", "--pushed")[1][0]
    assert (row["pushes"], row["verified"], row["label"]) == (1, True, "bnb int8")
    table = cli("ls").stdout
    assert table.splitlines()[0] == "3 artifacts"
    assert "21.61" in table and "SmolLM2-360M" in table
    assert cli("ls", "--method", "aqlm").stdout.splitlines()[0] == "0 artifacts"
    result = cli("ls", "--sort", "colour", ok=None)
    assert result.exit_code == 2 and "Invalid value for '--sort'" in result.stderr
    result = cli("ls", "--method", "bnb4", ok=None)  # a typo is an error, not an empty list
    assert result.exit_code == 2
    assert result.stderr == (
        "Error: Invalid value for '--method': 'bnb4' is not one of 'aqlm', 'bnb', 'compressed-tensors', 'eetq', 'gguf', 'hqq'. "
        "(see 'qconv ls --help')\n"
    )


def test_show_by_prefix_and_by_folder(cli, recorded, tmp_path):
    b = recorded["b"]
    _, record = cli.json("show", b[:5])
    assert record["id"] == b and record["source_revision"] == "f" * 40
    assert record["source_files"] == {"model.safetensors": {"sha256": "a" * 64, "size": 1000}}
    assert record["files"]["config.json"] == {"sha256": "c" * 64, "size": 20}
    assert [m["name"] for m in record["metrics"]] == ["ppl", "nll"]
    assert record["metrics"][0]["protocol"]["dataset_sha256"] == "e" * 64
    assert record["method_library"] == "bitsandbytes" and record["recipe"]["method"] == "hqq"
    _, by_folder = cli.json("show", recorded["folder"])
    assert by_folder["id"] == recorded["c"]

    text = cli("show", b).stdout
    assert text.splitlines()[0].startswith(f"{b}  hqq nf4+dq  {(tmp_path / 'b').resolve()}")
    for expected in (
        "HuggingFaceTB/SmolLM2-360M",  # source
        "f" * 40,  # its revision
        "a" * 64,  # a source file's sha256
        "quant_type",  # the recipe
        "none (data-free)",  # calibration
        "bitsandbytes",  # environment
        "never verified",
        "21.6100",  # metrics with their protocol
        "wikitext-2",
        "302956",
        "layers (2 of 2, worst first)",
        "files (2)",
        "c" * 64,  # a file's sha256
    ):
        assert expected in text, expected
    pushed = cli("show", recorded["a"]).stdout
    assert "me/smol-int8" in pushed and "https://huggingface.co/me/smol-int8" in pushed
    assert "sha256" in pushed and "pass" in pushed


def test_show_and_rm_errors(cli, recorded, tmp_path):
    assert run_error(cli, "show", "0000000000ff") == (
        f"Error: no artifact with id '0000000000ff' in {tmp_path / 'qconv-home' / 'registry.db'}"
    )
    assert run_error(cli, "show", tmp_path / "nowhere") == (
        f"Error: {tmp_path / 'nowhere'}: no artifact recorded at {tmp_path / 'nowhere'} in "
        f"{tmp_path / 'qconv-home' / 'registry.db'}"
    )
    # an ambiguous prefix names its candidates
    with open_registry() as registry:
        all_ids = [registry.record_artifact(make_manifest(), tmp_path / f"x{i}") for i in range(20)]
    first = max(
        "0123456789abcdef",
        key=lambda ch: sum(i.startswith(ch) for i in all_ids + list(recorded.values())[:3]),
    )
    message = run_error(cli, "rm", first)
    assert message.startswith(f"Error: artifact id '{first}' is ambiguous, it matches ")
    result = cli("show", "0000000000ff", "--json", ok=None)
    assert json.loads(result.stdout)["exit_code"] == 2
    assert len(cli.json("ls")[1]) == 23  # nothing removed


def test_rm_keeps_or_deletes_files(cli, recorded):
    folder = recorded["folder"]
    (folder / "notes.txt").write_text("mine")
    assert run_error(cli, "rm", recorded["c"], "--delete-files") == (
        f"Error: {folder.resolve()}: holds notes.txt, which is not one of the artifact's files; not deleting it"
    )
    assert len(cli.json("ls")[1]) == 3 and folder.is_dir()
    (folder / "notes.txt").unlink()
    _, doc = cli.json("rm", recorded["c"][:6], "--delete-files")
    assert doc == {"id": recorded["c"], "path": str(folder.resolve()), "files_deleted": True}
    assert not folder.exists()
    assert cli("rm", recorded["a"]).stdout.strip() == (
        f"removed {recorded['a']} (files kept in {folder.parent.resolve() / 'a'})"
    )
    assert ids(cli) == [recorded["b"]]
    with open_registry() as registry:
        assert registry.list_pushes() == []  # the push went with its artifact


def test_verify_takes_an_id_and_stores_the_result_on_that_row(cli, tiny_llama, tmp_path):
    out = tmp_path / "out"
    _, doc = cli.json("convert", tiny_llama, "-o", out, "--method", "bnb", "--device", "cpu", "--no-verify")
    ident = doc["id"]
    _, report = cli.json("verify", ident[:6], "--device", "cpu", "--no-logits")
    assert report["passed"] and report["path"] == str(out.resolve())
    assert cli.json("ls")[1][0]["verified"] is True
    assert run_error(cli, "verify", "abcdef012345") == (
        f"Error: no artifact with id 'abcdef012345' in {tmp_path / 'qconv-home' / 'registry.db'}"
    )


def test_an_id_whose_folder_was_replaced_is_refused(cli, tiny_llama, tmp_path):
    """Recorded, then the folder replaced by an unrecorded conversion: the old id is refused
    (it would hand back another artifact's files), and the folder is the new, unrecorded one,
    whose verify result lands on no row."""
    out = tmp_path / "out"
    _, doc = cli.json("convert", tiny_llama, "-o", out, "--method", "bnb", "--device", "cpu", "--no-verify")
    ident = doc["id"]
    # another recipe: the same one converted within the same second would be the same artifact
    cli("convert", tiny_llama, "-o", out, "--method", "bnb", "--bits", "8", "--device", "cpu", "--no-verify",
        "--force", "--no-record")  # fmt: skip
    new_id = artifact_id(json.loads((out / "qconv.json").read_text()), out)
    for command in ("verify", "eval", "push"):
        extra = ("--repo", "me/x") if command == "push" else ()
        assert run_error(cli, command, ident[:8], *extra) == (
            f"Error: {ident[:8]}: artifact {ident} was recorded at {out.resolve()}, which now holds "
            f"artifact {new_id} (replaced or removed since it was recorded)"
        )
    _, report = cli.json("verify", out, "--device", "cpu", "--no-logits")
    assert report["passed"]
    assert [(row["id"], row["verified"]) for row in cli.json("ls")[1]] == [(ident, None)]
    shutil.rmtree(out)
    assert run_error(cli, "verify", ident) == (
        f"Error: {ident}: artifact {ident} was recorded at {out.resolve()}, which no longer exists"
    )


def test_a_registry_written_by_a_newer_qconv_is_read_but_never_written(cli, recorded, tiny_llama, tmp_path):
    """A newer qconv recorded a migration this one does not know: ls and show still read it and
    say so; every command that would write refuses in one line naming the versions, before any
    work (convert writes no artifact)."""
    db = tmp_path / "qconv-home" / "registry.db"
    with sqlite3.connect(db) as conn:
        conn.execute(
            "INSERT INTO _sqlite_migrations (migration_set, name, applied_at) VALUES (?, ?, ?)",
            ("qconv", "m099_future", "2027-01-01 00:00:00+00:00"),
        )
    result = cli("ls", "--json")
    assert [row["id"] for row in json.loads(result.stdout)] == ids_of(recorded)
    assert (
        result.stderr.strip() == f"note: {db} was written by a newer qconv (migration m099_future): read only"
    )
    assert cli("show", recorded["b"][:6]).exit_code == 0
    refused = (
        f"Error: {db}: written by a newer qconv (migration m099_future; this qconv knows "
        "m001_initial, m002_provenance_columns, m003_base_model_revision); not writing to it: upgrade qconv"
    )
    assert run_error(cli, "rm", recorded["a"]) == refused
    assert run_error(cli, "verify", recorded["c"], "--device", "cpu") == refused
    out = tmp_path / "new"
    assert run_error(cli, "convert", tiny_llama, "-o", out, "--method", "bnb", "--device", "cpu") == refused
    assert not out.exists()
    with sqlite3.connect(db) as conn:  # nothing removed, nothing added, the future row kept
        assert conn.execute("SELECT count(*) FROM artifacts").fetchone() == (3,)
        assert conn.execute("SELECT count(*) FROM _sqlite_migrations").fetchone() == (4,)


def ids_of(recorded) -> list[str]:
    """The three recorded artifacts, newest first (as ls lists them)."""
    return [recorded["c"], recorded["b"], recorded["a"]]
