"""The base model (issue 18): `--base-model ORG/NAME[@REVISION]` on convert, push and in release
plans, else detected from the source (a Hub repo, a folder in the Hugging Face cache, GGUF
metadata naming its Hub repo), else none; recorded in qconv.json and the registry; the model
cards' front matter read back by huggingface_hub's own parser."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from huggingface_hub.repocard import metadata_load

from qconv.manifest import parse_base_model
from qconv.model_card import hub_model_card, model_card

SOURCE = "tiny-org/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
CONVERT = ["--method", "bnb", "--device", "cpu", "--no-logits"]
NO_BASE = (
    "warning: {path}: no base model recorded, so the model card names none and the Hub links the repo "
    "to no base model; name it with --base-model ORG/NAME\n"
)


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "qconv.json").read_text())


def front_matter(card: str, tmp_path: Path) -> dict:
    """The card's metadata as the Hub's client reads it, both ways: ModelCard and metadata_load."""
    path = tmp_path / "card.md"
    path.write_text(card, encoding="utf-8")
    loaded = metadata_load(path)
    assert ModelCard(card).data.to_dict() == loaded
    return loaded


def registry_row(cli, out: Path) -> dict:
    _, rows = cli.json("ls")
    (row,) = [r for r in rows if r["path"] == str(out.resolve())]
    _, shown = cli.json("show", row["id"])
    return shown


# -- convert --base-model ---------------------------------------------------------------------
def test_given_base_model_is_recorded_and_named_by_both_cards(cli, tiny_llama, tmp_path):
    out = tmp_path / "out"
    cli("convert", tiny_llama, "-o", out, *CONVERT, "--base-model", f"{SOURCE}@v1.0")
    assert manifest_of(out)["base_model"] == {"repo_id": SOURCE, "revision": "v1.0", "origin": "given"}
    local = front_matter((out / "README.md").read_text(), tmp_path)
    assert (local["base_model"], local["base_model_relation"]) == (SOURCE, "quantized")
    hub_card = hub_model_card(manifest_of(out), [], "me/tiny-nf4")
    assert "- Base model: `tiny-org/tiny-llama` at `v1.0` (given with --base-model)" in hub_card
    front = front_matter(hub_card, tmp_path)
    assert (front["base_model"], front["base_model_relation"]) == (SOURCE, "quantized")
    row = registry_row(cli, out)
    assert (row["base_model"], row["base_model_revision"]) == (SOURCE, "v1.0")
    assert re.search(rf"\nbase model +{SOURCE}@v1\.0 *\n", cli("show", row["id"]).stdout)


def test_a_local_folder_has_no_base_model(cli, tiny_llama, tmp_path):
    out = tmp_path / "out"
    cli("convert", tiny_llama, "-o", out, *CONVERT)
    assert manifest_of(out)["base_model"] is None
    front = front_matter((out / "README.md").read_text(), tmp_path)
    assert (
        "base_model" not in front
        and "base_model_relation" not in front
        and front["tags"]
        == [
            "qconv",
            "bnb",
        ]
    )
    row = registry_row(cli, out)  # the short name as before, no revision
    assert (row["base_model"], row["base_model_revision"]) == ("tiny-llama", None)


def snapshot_folder(tiny_llama: Path, root: Path, repo_id: str, commit: str) -> Path:
    """A model folder where huggingface_hub's cache would put it."""
    folder = root / f"models--{repo_id.replace('/', '--')}" / "snapshots" / commit
    shutil.copytree(tiny_llama, folder)
    return folder


def test_a_folder_in_the_hub_cache_is_detected_and_the_option_wins(cli, tiny_llama, tmp_path):
    folder = snapshot_folder(tiny_llama, tmp_path / "hub", SOURCE, COMMIT)
    cli("convert", folder, "-o", tmp_path / "detected", *CONVERT)
    detected = {"repo_id": SOURCE, "revision": COMMIT, "origin": "hub-cache"}
    assert manifest_of(tmp_path / "detected")["base_model"] == detected
    row = registry_row(cli, tmp_path / "detected")
    assert (row["base_model"], row["base_model_revision"]) == (SOURCE, COMMIT)

    cli("convert", folder, "-o", tmp_path / "given", *CONVERT, "--base-model", "other-org/other")
    given = {"repo_id": "other-org/other", "revision": None, "origin": "given"}
    assert manifest_of(tmp_path / "given")["base_model"] == given
    assert front_matter((tmp_path / "given" / "README.md").read_text(), tmp_path)["base_model"] == (
        "other-org/other"
    )


def test_a_hub_source_is_its_own_base_model(cli, hub, tiny_llama, tmp_path):
    files = {p.name: p.read_bytes() for p in tiny_llama.iterdir() if p.is_file()}
    commit = hub.add_model(SOURCE, files)
    cli("convert", SOURCE, "-o", tmp_path / "out", *CONVERT)
    assert manifest_of(tmp_path / "out")["base_model"] == {
        "repo_id": SOURCE,
        "revision": commit,
        "origin": "hub",
    }


@pytest.mark.parametrize(
    "strings,expected",
    [
        # the model the file was converted from (llama.cpp's general.source.repo_url)
        (
            {"general.source.repo_url": "https://huggingface.co/tiny-org/tiny-llama"},
            {"repo_id": SOURCE, "revision": None, "origin": "gguf"},
        ),
        (
            {"general.repo_url": "https://huggingface.co/tiny-org/tiny-llama-GGUF/tree/v2"},
            {"repo_id": "tiny-org/tiny-llama-GGUF", "revision": "v2", "origin": "gguf"},
        ),
        # general.base_model.* names the model the file's model was fine-tuned from: not its base
        ({"general.base_model.0.repo_url": "https://huggingface.co/tiny-org/parent"}, None),
        ({"general.source.repo_url": "https://huggingface.co/datasets/tiny-org/text"}, None),
        ({"general.source.repo_url": "https://github.com/tiny-org/tiny-llama"}, None),
    ],
)
def test_gguf_metadata_naming_its_hub_repo(cli, tmp_path, strings, expected):
    from test_source_gguf import write_tiny_llama

    source = tmp_path / "tiny.gguf"
    write_tiny_llama(source, {}, strings=strings)
    out = tmp_path / "out"
    cli("convert", source, "-o", out, *CONVERT, "--no-verify", "--no-record")
    assert manifest_of(out)["base_model"] == expected


BAD_VALUES = [
    "tiny-llama",
    "org/name/extra",
    "org/na--me",
    "org/",
    "-org/name",
    "org/name@",
    "org/name@a..b",
    "org/x.git",
]


def bad_value_line(value: str, option: str = "--base-model") -> str:
    return f"{option} {value!r}: expected ORG/NAME or ORG/NAME@REVISION (a Hugging Face Hub model id)"


@pytest.mark.parametrize("value", BAD_VALUES)
def test_a_bad_base_model_is_refused_before_anything_is_written(cli, tiny_llama, tmp_path, value):
    out = tmp_path / "out"
    result = cli("convert", tiny_llama, "-o", out, *CONVERT, "--base-model", value, ok=False)
    assert (result.exit_code, result.stdout, result.stderr) == (2, "", f"Error: {bad_value_line(value)}\n")
    assert not out.exists() and cli.json("ls")[1] == []


@pytest.mark.parametrize(
    "value", ["tiny-org/tiny-llama", "0rg/1.5", "_a/b_", "Org.1/Name-2.0_GGUF", "a/b@main"]
)
def test_good_base_models(value):
    repo_id, _, revision = value.partition("@")
    assert parse_base_model(value) == {"repo_id": repo_id, "revision": revision or None, "origin": "given"}


# -- the cards, through huggingface_hub's parser ---------------------------------------------
@pytest.fixture(scope="module")
def made(tiny_llama, tmp_path_factory) -> dict:
    from qconv.pipeline import convert

    out = tmp_path_factory.mktemp("card") / "out"
    return convert(str(tiny_llama), out, "bnb", {"bits": 4}, device="cpu", logits=False).manifest


AWKWARD = ["0rg/1.5", "org/yes", "null/true", "_x/1e3", "Org.1/Name-2.0_GGUF", "o/0x1F"]


@pytest.mark.parametrize("repo_id", AWKWARD)
@pytest.mark.parametrize("gguf", [False, True])
def test_cards_are_yaml_the_hub_reads_back(made, tmp_path, repo_id, gguf):
    manifest = json.loads(json.dumps(made))
    manifest["base_model"] = {"repo_id": repo_id, "revision": None, "origin": "given"}
    manifest["source"]["license"] = "yes"  # a YAML 1.1 boolean if written plain
    if gguf:  # the GGUF conventions: a file type for a tag, no transformers library
        manifest["recipe"] = {"method": "gguf", "type": "Q4_K_M", "label": "Q4_K_M"}
        manifest["files"] = {"x-Q4_K_M.gguf": {"sha256": "0" * 64, "size": 1}}
    for card in (model_card(manifest), hub_model_card(manifest, [], "me/x")):
        front = front_matter(card, tmp_path)
        assert (front["base_model"], front["base_model_relation"]) == (repo_id, "quantized")
        assert all(isinstance(tag, str) for tag in front["tags"])
    hub_front = front_matter(hub_model_card(manifest, [], "me/x"), tmp_path)
    assert hub_front["license"] == "yes"
    assert ("Q4_K_M" in hub_front["tags"]) == gguf and ("library_name" in hub_front) != gguf


# -- push ------------------------------------------------------------------------------------
@pytest.fixture
def plain(cli, tiny_llama, tmp_path) -> Path:
    out = tmp_path / "art"
    cli("convert", tiny_llama, "-o", out, "--method", "bnb", "--device", "cpu")
    return out


def test_push_without_a_base_model_warns_naming_the_option(cli, hub, plain):
    result, doc = cli.json("push", plain, "--repo", "me/plain")
    assert doc["status"] == "committed"
    assert result.stderr == NO_BASE.format(path=plain)
    assert "base_model" not in front_matter(hub.file_bytes("me/plain", "README.md").decode(), plain.parent)


def test_push_base_model_sets_it_for_that_push(cli, hub, plain, tmp_path):
    before = (plain / "qconv.json").read_bytes()
    result, doc = cli.json("push", plain, "--repo", "me/plain", "--base-model", f"{SOURCE}@{COMMIT}")
    assert doc["status"] == "committed" and result.stderr == ""
    front = front_matter(hub.file_bytes("me/plain", "README.md").decode(), tmp_path)
    assert (front["base_model"], front["base_model_relation"]) == (SOURCE, "quantized")
    pushed = json.loads(hub.file_bytes("me/plain", "qconv.json"))
    assert pushed["base_model"] == {"repo_id": SOURCE, "revision": COMMIT, "origin": "given"}
    assert {k: v for k, v in pushed.items() if k != "base_model"} == {
        k: v for k, v in json.loads(before).items() if k != "base_model"
    }
    assert (plain / "qconv.json").read_bytes() == before  # the artifact itself is left as it is
    # the same push again: nothing changed, no commit
    _, again = cli.json("push", plain, "--repo", "me/plain", "--base-model", f"{SOURCE}@{COMMIT}")
    assert again["status"] == "unchanged" and len(hub.commits("me/plain")) == 2


def test_push_dry_run_warns_too_and_a_bad_value_is_refused(cli, hub, plain):
    result, doc = cli.json("push", plain, "--repo", "me/plain", "--dry-run")
    assert doc["status"] == "dry-run" and result.stderr == NO_BASE.format(path=plain)
    result = cli("push", plain, "--repo", "me/plain", "--base-model", "nope", ok=False)
    assert (result.exit_code, result.stderr) == (2, f"Error: {bad_value_line('nope')}\n")
    assert hub.requests == []


# -- release plans ---------------------------------------------------------------------------
PLAN = """
base = "{base}"
namespace = "rel"
output_dir = "out"
device = "cpu"
{base_model}

[eval]
seqlen = 32
max_windows = 1

[[matrix]]
label = "nf4"
method = "bnb"
options = {{ bits = 4 }}
"""


def test_a_release_plan_names_the_base_model(cli, hub, tiny_llama, tmp_path):
    from test_eval import add_byte_tokenizer

    base = add_byte_tokenizer(shutil.copytree(tiny_llama, tmp_path / "tiny-llama"))
    plan = tmp_path / "plan.toml"
    plan.write_text(PLAN.format(base=base, base_model=f'base_model = "{SOURCE}@v1"'))
    _, doc = cli.json("release", plan)
    (entry,) = doc["entries"]
    assert entry["status"] == "released", entry
    assert manifest_of(Path(entry["path"]))["base_model"] == {
        "repo_id": SOURCE,
        "revision": "v1",
        "origin": "given",
    }
    front = front_matter(hub.file_bytes("rel/tiny-llama-nf4", "README.md").decode(), tmp_path)
    assert front["base_model"] == SOURCE
    assert registry_row(cli, Path(entry["path"]))["base_model_revision"] == "v1"


@pytest.mark.parametrize(
    "line,message",
    [
        ('base_model = "nope"', bad_value_line("nope", "base_model")),
        ("base_model = 3", "'base_model' must be a string, ORG/NAME or ORG/NAME@REVISION"),
    ],
)
def test_a_bad_base_model_in_a_plan(cli, tiny_llama, tmp_path, line, message):
    plan = tmp_path / "plan.toml"
    plan.write_text(PLAN.format(base=tiny_llama, base_model=line))
    result = cli("release", plan, "--dry-run", ok=False)
    assert (result.exit_code, result.stderr) == (2, f"Error: {plan}: {message}\n")


def test_the_library_warning_names_the_argument_not_the_flag(plain):
    """From Python the same warning names push()'s argument; the CLI's names the flag."""
    from qconv.errors import QconvWarning
    from qconv.hub import push

    with pytest.warns(QconvWarning) as caught:
        push(plain, "me/plain", dry_run=True)
    (warning,) = caught
    assert str(warning.message) == (
        f"{plain}: no base model recorded, so the model card names none and the Hub links the repo to no "
        "base model; name it with base_model ORG/NAME"
    )
    assert "warning: " + warning.message.cli_message() + "\n" == NO_BASE.format(path=plain)
