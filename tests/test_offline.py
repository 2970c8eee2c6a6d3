"""An unreachable Hub is said as such, in one line, at once (issue 18): not as five retry lines
over ~25 s followed by "no config.json", which is what a repo without a model says."""

from __future__ import annotations

import time

import pytest
from loopback_hub import free_port

SOURCE = "tiny-org/tiny-llama"
PLAN = """
base = "tiny-org/tiny-llama"
namespace = "rel"
output_dir = "out"
device = "cpu"

[[matrix]]
label = "nf4"
method = "bnb"
options = { bits = 4 }
"""


@pytest.fixture
def closed_endpoint(hub, monkeypatch) -> str:
    """HF_ENDPOINT pointing at a local port nothing listens on (the client reads the constant at
    call time; the variable was read when it was imported)."""
    import huggingface_hub.constants as constants

    endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    return endpoint


def unreachable(where: str, endpoint: str) -> str:
    return (
        f"Error: {where}: cannot reach the Hub at {endpoint} (Connection refused); to use a copy in "
        "the local Hugging Face cache without the network, set HF_HUB_OFFLINE=1\n"
    )


@pytest.mark.parametrize("ref", [SOURCE, f"{SOURCE}@main"])
def test_convert_from_an_unreachable_hub(cli, closed_endpoint, tmp_path, ref):
    started = time.monotonic()
    result = cli("convert", ref, "-o", tmp_path / "out", "--method", "bnb", "--device", "cpu", ok=False)
    elapsed = time.monotonic() - started
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == unreachable(ref, closed_endpoint)  # one line, no "Retrying in 1s"
    assert elapsed < 3, f"took {elapsed:.1f} s (the client's retries?)"
    assert not (tmp_path / "out").exists()
    assert cli.json("ls")[1] == []


def test_release_dry_run_with_an_unreachable_hub(cli, closed_endpoint, tmp_path):
    plan = tmp_path / "plan.toml"
    plan.write_text(PLAN)
    started = time.monotonic()
    result = cli("release", plan, "--dry-run", ok=False)
    elapsed = time.monotonic() - started
    assert result.exit_code == 2
    assert result.stderr == unreachable(SOURCE, closed_endpoint)
    assert elapsed < 3, f"took {elapsed:.1f} s (the client's retries?)"


def test_json_says_it_too(cli, closed_endpoint, tmp_path):
    result, doc = cli.json("convert", SOURCE, "-o", tmp_path / "out", "--method", "bnb", ok=False)
    assert doc == {"error": unreachable(SOURCE, closed_endpoint)[len("Error: ") : -1], "exit_code": 2}


def test_a_reachable_repo_without_config_is_told_apart(cli, hub, tiny_llama, tmp_path):
    hub.add_model(
        "tiny-org/weights-only", {"model.safetensors": (tiny_llama / "model.safetensors").read_bytes()}
    )
    result = cli("convert", "tiny-org/weights-only", "-o", tmp_path / "out", "--method", "bnb", ok=False)
    assert result.exit_code == 2
    assert result.stderr == "Error: tiny-org/weights-only: no config.json (not a transformers model repo)\n"


def test_the_way_out_works(cli, hub, tiny_llama, tmp_path, monkeypatch):
    """What the message advises: with HF_HUB_OFFLINE=1 a model already in the cache converts
    although the endpoint is closed."""
    import huggingface_hub.constants as constants

    hub.add_model(SOURCE, {p.name: p.read_bytes() for p in tiny_llama.iterdir() if p.is_file()})
    cli("convert", SOURCE, "-o", tmp_path / "a", "--method", "bnb", "--device", "cpu", "--no-verify")
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cli("convert", SOURCE, "-o", tmp_path / "b", "--method", "bnb", "--device", "cpu", "--no-verify")


def test_push_to_an_unreachable_hub(cli, hub, tiny_llama, tmp_path, monkeypatch):
    """The first request finds no Hub: said at once (not after the retries' backoff), nothing
    recorded; a fault once the upload has begun is retried as before (tests/test_push.py)."""
    import huggingface_hub.constants as constants

    folder = tmp_path / "art"
    cli("convert", tiny_llama, "-o", folder, "--method", "bnb", "--device", "cpu")
    endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    started = time.monotonic()
    result = cli("push", folder, "--repo", "off-org/art", ok=False)
    assert time.monotonic() - started < 3
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == (
        f"Error: off-org/art: cannot reach the Hub at {endpoint} (Connection refused); nothing was pushed\n"
    )
    assert cli.json("ls", "--pushed")[1] == []
    assert not [p for p in tmp_path.iterdir() if ".qconv-push-" in p.name]
