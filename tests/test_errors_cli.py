"""Bad input: one line on stderr, exit 2, and nothing written (no folder, no temp, no registry row)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import qconv.formats.format_bnb as format_bnb
from qconv import pipeline


def nothing_written(parent: Path, out: Path, cli) -> None:
    assert not out.exists()
    assert not [p.name for p in parent.iterdir() if ".qconv-tmp" in p.name]
    _, rows = cli.json("ls")
    assert rows == []


def run_error(cli, *args):
    result = cli(*args, ok=None)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
    return result.stderr.strip()


def test_missing_source(cli, tmp_path):
    out = tmp_path / "out"
    assert run_error(cli, "convert", tmp_path / "nope", "-o", out, "--method", "bnb") == (
        f"Error: {tmp_path / 'nope'}: no such file or folder"
    )
    nothing_written(tmp_path, out, cli)


def test_json_error_document(cli, tmp_path):
    result = cli("convert", tmp_path / "nope", "-o", tmp_path / "o", "--method", "bnb", "--json", ok=None)
    assert result.exit_code == 2
    assert json.loads(result.stdout) == {
        "error": f"{tmp_path / 'nope'}: no such file or folder",
        "exit_code": 2,
    }


@pytest.fixture
def source_copy(tiny_llama, tmp_path) -> Path:
    dest = tmp_path / "src"
    shutil.copytree(tiny_llama, dest)
    return dest


def test_truncated_safetensors(cli, source_copy, tmp_path):
    weights = source_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    message = run_error(cli, "convert", source_copy, "-o", tmp_path / "out", "--method", "bnb")
    assert message.startswith(f"Error: {weights}: truncated: tensor ")
    nothing_written(tmp_path, tmp_path / "out", cli)


def test_corrupt_safetensors_header(cli, source_copy, tmp_path):
    weights = source_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:16] = b"\xff\xfe garb"
    weights.write_bytes(bytes(data))
    message = run_error(cli, "convert", source_copy, "-o", tmp_path / "out", "--method", "bnb")
    assert message == f"Error: {weights}: corrupt safetensors header (not JSON)"
    nothing_written(tmp_path, tmp_path / "out", cli)


def test_not_a_model(cli, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    message = run_error(cli, "convert", tmp_path / "notes.txt", "-o", tmp_path / "out", "--method", "bnb")
    assert message == f"Error: {tmp_path / 'notes.txt'}: not a model folder or a .gguf file"
    empty = tmp_path / "empty"
    empty.mkdir()
    message = run_error(cli, "convert", empty, "-o", tmp_path / "out", "--method", "bnb")
    assert message == f"Error: {empty}: no config.json (not a Hugging Face model folder)"


def test_pickle_only_folder_is_refused(cli, source_copy, tmp_path):
    (source_copy / "model.safetensors").unlink()
    (source_copy / "pytorch_model.bin").write_bytes(b"not read")
    message = run_error(cli, "convert", source_copy, "-o", tmp_path / "out", "--method", "bnb")
    assert "only pickle weights (.bin/.pt); qconv reads safetensors only (no pickle)" in message


def test_unknown_architecture(cli, source_copy, tmp_path):
    config = json.loads((source_copy / "config.json").read_text())
    config["model_type"] = "no-such-arch"
    (source_copy / "config.json").write_text(json.dumps(config))
    message = run_error(cli, "convert", source_copy, "-o", tmp_path / "out", "--method", "bnb")
    assert message == f"Error: {source_copy}: architecture 'no-such-arch' is not known to transformers"


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--method", "gptq"], "Error: unknown method 'gptq'; valid methods: "),
        (
            ["--method", "bnb", "--bits", "3"],
            "Error: --method bnb: --bits 3 is not supported; choose from 4, 8",
        ),
        (
            ["--method", "bnb", "--bits", "8", "--quant-type", "fp4"],
            "Error: --quant-type does not apply to --method bnb",
        ),
        (["--method", "bnb", "--max-shard-size", "huge"], "Error: --max-shard-size: not a size: 'huge'"),
        (
            ["--method", "bnb", "--dtype", "int4"],
            "Error: --dtype 'int4': choose auto, bfloat16, float16, float32",
        ),
        (
            ["--method", "bnb", "--device", "mps"],
            "Error: --device mps: only cpu and cuda devices are supported",
        ),
        (
            ["--method", "bnb", "--device", "tpu"],
            "Error: --device 'tpu' is not a device; use auto, cpu, cuda or cuda:N",
        ),
        (
            ["--method", "bnb", "--skip", "re:(unclosed"],
            "Error: --skip 're:(unclosed' is not a valid pattern",
        ),
        (["--method", "bnb", "--skip", "*"], "no layer to quantize (every Linear is skipped or absent)"),
        (["--method", "bnb", "--max-rel-error", "0"], "Error: --max-rel-error must be positive"),
    ],
)
def test_bad_options(cli, tiny_llama, tmp_path, flags, message):
    got = run_error(cli, "convert", tiny_llama, "-o", tmp_path / "out", *flags)
    assert got.startswith(message) or message in got, got
    nothing_written(tmp_path, tmp_path / "out", cli)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_gpu(cli, tiny_llama, tmp_path):
    got = run_error(cli, "convert", tiny_llama, "-o", tmp_path / "out", "--method", "bnb", "--device", "cuda")
    assert got == "Error: --device cuda: no CUDA GPU is available here"


def test_existing_destination_needs_force(cli, tiny_llama, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    got = run_error(cli, "convert", tiny_llama, "-o", out, "--method", "bnb", "--device", "cpu")
    assert got == f"Error: {out}: already exists (use --force to replace it)"
    # --force never replaces a folder that is not a qconv artifact
    got = run_error(cli, "convert", tiny_llama, "-o", out, "--method", "bnb", "--device", "cpu", "--force")
    assert got == f"Error: {out}: exists and is not a qconv artifact; not replacing it"
    assert (out / "keep.txt").read_text() == "mine"
    shutil.rmtree(out)
    cli("convert", tiny_llama, "-o", out, "--method", "bnb", "--device", "cpu", "--no-verify")
    first = json.loads((out / "qconv.json").read_text())
    run_error(cli, "convert", tiny_llama, "-o", out, "--method", "bnb", "--bits", "8", "--device", "cpu")
    cli(
        "convert",
        tiny_llama,
        "-o",
        out,
        "--method",
        "bnb",
        "--bits",
        "8",
        "--device",
        "cpu",
        "--force",
        "--no-verify",
    )
    second = json.loads((out / "qconv.json").read_text())
    assert first["recipe"]["bits"] == 4 and second["recipe"]["bits"] == 8
    assert not [p for p in tmp_path.iterdir() if ".qconv-" in p.name]


def test_force_never_deletes_the_source(cli, source_copy, tmp_path):
    (source_copy / "qconv.json").write_text("{}")
    got = run_error(cli, "convert", source_copy, "-o", source_copy, "--method", "bnb", "--force")
    assert got == f"Error: {source_copy}: --force would delete the source itself"
    assert (source_copy / "model.safetensors").is_file()


def test_failure_midway_leaves_nothing(cli, tiny_llama, tmp_path, monkeypatch):
    calls = []
    real = format_bnb.BitsAndBytesFormat._quantize_4bit

    def failing(self, weight, recipe):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("simulated crash in the middle")
        return real(self, weight, recipe)

    monkeypatch.setattr(format_bnb.BitsAndBytesFormat, "_quantize_4bit", failing)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="simulated crash"):
        pipeline.convert(str(tiny_llama), out, "bnb", {}, device="cpu")
    assert len(calls) == 5
    nothing_written(tmp_path, out, cli)


def test_verify_errors(cli, tmp_path):
    assert (
        run_error(cli, "verify", tmp_path / "nope") == f"Error: {tmp_path / 'nope'}: no such artifact folder"
    )
    assert run_error(cli, "verify", tmp_path) == f"Error: {tmp_path}: no qconv.json (not a qconv artifact)"
    (tmp_path / "qconv.json").write_text("{not json")
    assert (
        run_error(cli, "verify", tmp_path) == f"Error: {tmp_path / 'qconv.json'}: not a valid qconv manifest"
    )


def test_broken_registry_fails_before_any_work(cli, tiny_llama, tmp_path, qconv_home):
    qconv_home.mkdir(parents=True)
    (qconv_home / "registry.db").write_bytes(b"this is not sqlite" * 100)
    out = tmp_path / "out"
    got = run_error(cli, "convert", tiny_llama, "-o", out, "--method", "bnb", "--device", "cpu")
    assert got.startswith(f"Error: {qconv_home / 'registry.db'}: not a qconv registry")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "qconv-tmp" in p.name]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["ls", "--bogus"],
            "Error: No such option '--bogus'. (Did you mean one of: '--base', '--bits'?) (see 'qconv ls --help')",
        ),
        (["convert"], "Error: Missing argument 'SOURCE'. (see 'qconv convert --help')"),
        (["rm", "abc", "--nope"], "Error: No such option '--nope'. (see 'qconv rm --help')"),
        (["frobnicate"], "Error: No such command 'frobnicate'. (see 'qconv --help')"),
    ],
)
def test_usage_mistakes_are_one_line(cli, args, expected):
    """Click's own answer (usage, hint, blank line, error) is folded into one line, exit 2."""
    assert run_error(cli, *args) == expected


def test_usage_mistake_with_json_prints_the_error_document(cli):
    result = cli("ls", "--sort", "size-ish", "--json", ok=None)
    assert result.exit_code == 2
    document = json.loads(result.stdout)
    assert document["exit_code"] == 2 and document["error"].startswith(
        "Invalid value for '--sort': 'size-ish'"
    )
    assert result.stderr.count("\n") == 1


def _rewrite_weights(folder: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_source_model_is_the_sources_weights(tiny_llama):
    """verify's float32 source model, filled tensor by tensor, holds the source's values."""
    from safetensors.torch import load_file

    from qconv.modeling import reference_model
    from qconv.sources import open_source

    expected = load_file(str(tiny_llama / "model.safetensors"))
    with open_source(str(tiny_llama)) as source:
        model = reference_model(source, torch.device("cpu"), torch.float32)
    state = model.state_dict()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor.float()), name


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda t: t.pop("model.layers.0.mlp.up_proj.weight"),
            "the source lacks tensor 'model.layers.0.mlp.up_proj.weight' the architecture needs",
        ),
        (
            lambda t: t.update({"model.norm.weight": torch.ones(3)}),
            "tensor 'model.norm.weight' has shape [3], the architecture expects [128]",
        ),
    ],
)
def test_source_model_refuses_a_source_that_does_not_fit(source_copy, change, message):
    from qconv.errors import SourceError
    from qconv.modeling import reference_model
    from qconv.sources import open_source

    _rewrite_weights(source_copy, change)
    with open_source(str(source_copy)) as source, pytest.raises(SourceError) as error:
        reference_model(source, torch.device("cpu"), torch.float32)
    assert str(error.value) == f"{source_copy}: {message}"


@pytest.mark.parametrize("method", [["bnb"], ["bnb", "--bits", "8"], ["hqq"], ["eetq"]])
def test_nan_in_a_weight_is_refused(cli, source_copy, tmp_path, method):
    def poison(tensors):
        tensors["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")

    _rewrite_weights(source_copy, poison)
    out = tmp_path / "out"
    message = run_error(cli, "convert", source_copy, "-o", out, "--method", *method, "--device", "cpu")
    assert message == "Error: model.layers.0.mlp.up_proj.weight: the weight has NaN or infinite values"
    nothing_written(tmp_path, out, cli)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda t: t.update(
                {"model.layers.0.mlp.up_proj.weight": torch.zeros(7, 7, dtype=torch.bfloat16)}
            ),
            "tensor 'model.layers.0.mlp.up_proj.weight' has shape [7, 7], the architecture (LlamaForCausalLM) "
            "expects [256, 128]",
        ),
        (
            lambda t: t.pop("model.norm.weight"),
            "the source lacks tensor 'model.norm.weight' the architecture (LlamaForCausalLM) needs",
        ),
    ],
)
def test_a_source_that_does_not_fit_its_architecture_is_refused_before_writing(
    cli, source_copy, tmp_path, change, message
):
    _rewrite_weights(source_copy, change)
    out = tmp_path / "out"
    assert (
        run_error(cli, "convert", source_copy, "-o", out, "--method", "bnb")
        == f"Error: {source_copy}: {message}"
    )
    nothing_written(tmp_path, out, cli)


def test_library_errors_name_options_not_flags(tmp_path):
    """From Python an option is named as the argument it is; the CLI prints the flag (above).
    Text put into a message as it is (a path, another error) keeps its braces."""
    from qconv.errors import UsageError, literal
    from qconv.pipeline import convert

    with pytest.raises(UsageError) as caught:
        convert("nowhere", tmp_path / "out", "bnb", max_shard_size="huge")
    assert str(caught.value) == "max_shard_size: not a size: 'huge' (use e.g. 5GB or 500MB)"
    assert caught.value.cli_message() == "--max-shard-size: not a size: 'huge' (use e.g. 5GB or 500MB)"
    error = UsageError("{option} " + literal("{odd}/path: no such file or folder"), option="source")
    assert str(error) == "source {odd}/path: no such file or folder"
    assert error.cli_message() == "--source {odd}/path: no such file or folder"
