"""Ctrl-C (SIGINT) and SIGTERM during a real `qconv` process (issue 18): one line on stderr, exit
130 / 143, the temporary folder gone, no registry row, no traceback; a calibrated run's
checkpoint kept, and `--resume` finishes it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import add_tiny_tokenizer, make_tiny_llama

DATA_FREE = ["--method", "aqlm", "--calibration", "none", "--device", "cpu"]  # ~0.3 s a layer, 28 layers
CALIBRATED = ["--method", "aqlm", "--device", "cpu", "--calib-tokens", "2048", "--max-epochs", "0"]


@pytest.fixture(scope="module")
def four_blocks(tmp_path_factory) -> Path:
    # 8 blocks (56 layers): quantizing lasts seconds even on a quiet machine, so the signal
    # lands while the temporary folder is being filled (with 4 a fast machine finished first)
    return make_tiny_llama(tmp_path_factory.mktemp("src") / "tiny-8", layers=8)


@pytest.fixture(scope="module")
def two_blocks_text(tmp_path_factory) -> Path:
    return add_tiny_tokenizer(make_tiny_llama(tmp_path_factory.mktemp("src") / "tiny-text"))


STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def no_process_left():
    """A test that fails before its process exits must not leave it running."""
    yield
    while STARTED:
        process = STARTED.pop()
        if process.poll() is None:
            process.kill()
            process.wait()


def start(*args, program: tuple = ("-m", "qconv")) -> subprocess.Popen:
    """``python -m qconv ARGS`` with SIGINT handled by default, as in a terminal's foreground (a
    test run started in the background by a shell without job control ignores SIGINT, and its
    children would inherit that: qconv leaves an ignored signal ignored)."""
    process = subprocess.Popen(
        [sys.executable, *map(str, program), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    STARTED.append(process)
    return process


def wait_for(process: subprocess.Popen, ready, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            pytest.fail(
                f"exited {process.returncode} before {what}: {process.stderr.read().decode()[-2000:]}"
            )
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.01)


def stop(process: subprocess.Popen, signum: int) -> tuple[int, str, str]:
    """Send ``signum``; the process must be gone within seconds (cleanup, no waiting for work)."""
    sent = time.monotonic()
    process.send_signal(signum)
    out, err = process.communicate(timeout=60)
    assert time.monotonic() - sent < 10, f"{time.monotonic() - sent:.1f} s to stop"
    return process.returncode, out.decode(), err.decode()


def temp_folders(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".qconv-tmp-" in p.name)


def registry_rows(cli) -> list:
    return cli.json("ls")[1]


@pytest.mark.parametrize(
    "signum,code,line",
    [
        (signal.SIGINT, 130, "Interrupted (SIGINT): convert stopped; its temporary files were removed"),
        (signal.SIGTERM, 143, "Terminated (SIGTERM): convert stopped; its temporary files were removed"),
    ],
)
def test_a_signal_while_quantizing(cli, four_blocks, tmp_path, signum, code, line):
    out = tmp_path / "out"
    process = start("convert", four_blocks, "-o", out, *DATA_FREE)
    wait_for(process, lambda: temp_folders(tmp_path), "the temporary folder")  # quantizing into it
    time.sleep(0.1)
    returncode, stdout, stderr = stop(process, signum)
    assert (returncode, stdout, stderr) == (code, "", line + "\n")
    assert not out.exists() and temp_folders(tmp_path) == []
    assert registry_rows(cli) == []


def test_json_says_it_on_stdout_too(cli, four_blocks, tmp_path):
    """Signalled the instant the temporary folder appears: this once left the folder behind (made
    before the try that removes it) and hung at exit (a pool worker started as the signal came)."""
    process = start("convert", four_blocks, "-o", tmp_path / "out", *DATA_FREE, "--json")
    wait_for(process, lambda: temp_folders(tmp_path), "the temporary folder")
    returncode, stdout, stderr = stop(process, signal.SIGTERM)
    line = "Terminated (SIGTERM): convert stopped; its temporary files were removed"
    assert (returncode, json.loads(stdout), stderr) == (143, {"error": line, "exit_code": 143}, line + "\n")
    assert temp_folders(tmp_path) == []


def test_sigterm_keeps_the_checkpoint_and_resume_finishes(cli, two_blocks_text, tmp_path):
    out = tmp_path / "out"
    checkpoint = tmp_path / ".out.qconv-checkpoint"

    def blocks_done() -> int:  # state.json is replaced atomically after each block's file
        try:
            return json.loads((checkpoint / "state.json").read_text())["blocks_done"]
        except (OSError, ValueError, KeyError):
            return 0

    process = start("convert", two_blocks_text, "-o", out, *CALIBRATED)
    wait_for(process, lambda: blocks_done() >= 1, "the first block's checkpoint")
    returncode, stdout, stderr = stop(process, signal.SIGTERM)
    assert (returncode, stdout) == (143, ""), stderr
    assert stderr == (
        "Terminated (SIGTERM): convert stopped; its temporary files were removed; the calibration "
        f"checkpoint {checkpoint} is kept: add --resume to continue\n"
    )
    assert blocks_done() == 1 and not out.exists() and temp_folders(tmp_path) == []
    assert registry_rows(cli) == []

    _, doc = cli.json("convert", two_blocks_text, "-o", out, *CALIBRATED, "--resume")
    assert doc["verify"]["passed"] and not checkpoint.exists()
    assert [row["id"] for row in registry_rows(cli)] == [doc["id"]]


def test_sigint_during_a_push(cli, hub, tiny_llama, tmp_path):
    """The Hub holds the commit request: Ctrl-C then removes the staging folder of hard links and
    records no push."""
    folder = tmp_path / "art"
    cli("convert", tiny_llama, "-o", folder, "--method", "bnb", "--device", "cpu")
    hub.delay_next("commit", 20)

    def staging() -> list[str]:
        return sorted(p.name for p in tmp_path.iterdir() if ".qconv-push-" in p.name)

    process = start("push", folder, "--repo", "sig-org/art")
    wait_for(process, lambda: staging() and any(r.op == "preupload" for r in hub.requests), "the upload")
    time.sleep(0.5)  # the commit request is on its way
    returncode, stdout, stderr = stop(process, signal.SIGINT)
    assert (returncode, stdout, stderr) == (
        130,
        "",
        "Interrupted (SIGINT): push stopped; its temporary files were removed\n",
    )
    assert staging() == []
    assert len(registry_rows(cli)) == 1 and cli.json("ls", "--pushed")[1] == []  # no push recorded


def test_the_handlers_are_the_callers_again_afterwards(cli):
    """A program (or pytest) calling qconv's main() gets its own SIGINT and SIGTERM handlers back."""
    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    cli("ls")
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


# qconv's command line, with the registry's recording held for a minute after it begins (a file
# says when): where a signal lands after the artifact is in place and before it is recorded
SLOW_RECORDING = """
import sys, time
from pathlib import Path

from qconv.registry.db import Registry

record = Registry.record_artifact
flag = Path(sys.argv[1])


def slow(self, manifest, path):
    flag.touch()
    time.sleep(60)
    return record(self, manifest, path)


Registry.record_artifact = slow
from qconv.cli import main

sys.argv = ["qconv", *sys.argv[2:]]
main()
"""


@pytest.mark.parametrize(
    "signum,code,what",
    [(signal.SIGINT, 130, "Interrupted (SIGINT)"), (signal.SIGTERM, 143, "Terminated (SIGTERM)")],
)
def test_a_signal_while_recording_leaves_the_artifact_complete(cli, tiny_llama, tmp_path, signum, code, what):
    """The artifact is in place when the signal comes: the line says so, and how to record it
    (`qconv verify OUT --record`), instead of "its temporary files were removed"."""
    out, recording = tmp_path / "out", tmp_path / "recording"
    script = tmp_path / "slow_recording.py"
    script.write_text(SLOW_RECORDING)
    process = start(recording, "convert", tiny_llama, "-o", out, "--method", "bnb", "--device", "cpu", "--no-logits",
                    program=(script,))  # fmt: skip
    wait_for(process, recording.exists, "the recording")
    returncode, stdout, stderr = stop(process, signum)
    assert (returncode, stdout, stderr) == (
        code,
        "",
        f"{what}: convert stopped after writing {out}: the artifact there is complete but not recorded "
        f"in the registry (`qconv verify {out} --record` records it)\n",
    )
    assert temp_folders(tmp_path) == [] and registry_rows(cli) == []

    result = cli("verify", out, "--device", "cpu", "--record")
    ident = result.stdout.strip().splitlines()[-1].removeprefix("recorded as ")
    assert [(row["id"], row["path"], row["verified"]) for row in registry_rows(cli)] == [
        (ident, str(out.resolve()), True)
    ]
