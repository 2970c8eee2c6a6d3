"""`qconv eval` on the CPU: a tiny random Llama with a byte-level tokenizer, against an independent
computation with plain transformers; the metrics land in the registry with their protocol."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import make_tiny_llama

from qconv.evaluate import default_text
from qconv.registry import open_registry

SEQLEN = 64


def add_byte_tokenizer(folder):
    """A byte-level tokenizer without merges: 256 tokens, one a byte (the model has 320)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return add_byte_tokenizer(make_tiny_llama(tmp_path_factory.mktemp("src") / "tiny-tok", hidden=64))


@pytest.fixture
def artifact(cli, source, tmp_path):
    out = tmp_path / "nf4"
    _, doc = cli.json("convert", source, "-o", out, "--method", "bnb", "--device", "cpu", "--no-verify")
    return out, doc["id"]


def metric_rows():
    with open_registry() as registry:
        return registry.db.table("metrics").count


def independent(folder, source, text: str, seqlen: int, windows: int) -> dict:
    """Plain transformers: the artifact by stock from_pretrained, NLL token by token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(folder))(text, add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(str(folder), device_map="cpu").eval()
    for module in model.modules():
        # bnb's AVX512-BF16 CPU kernel (where the CPU has it) repacks the weight and rounds
        # differently from its plain dequantizing path, which qconv.load_model selects (see
        # format_bnb.load_pretrained); the two differ by ~1e-5 in the NLL.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    reference = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.bfloat16).eval()
    nll = kl = top1 = 0.0
    for w in range(windows):
        chunk = torch.tensor(ids[w * seqlen : (w + 1) * seqlen])[None]
        with torch.no_grad():
            log_q = torch.log_softmax(model(input_ids=chunk).logits[0].float(), -1)
            log_p = torch.log_softmax(reference(input_ids=chunk).logits[0].float(), -1)
        for i in range(seqlen - 1):
            nll -= log_q[i, chunk[0, i + 1]].item()
        kl += torch.nn.functional.kl_div(log_q[:-1], log_p[:-1], log_target=True, reduction="sum").item()
        top1 += (log_p[:-1].argmax(-1) == log_q[:-1].argmax(-1)).sum().item()
    predicted = windows * (seqlen - 1)
    return {"nll": nll / predicted, "kl": kl / predicted, "top1": top1 / predicted, "tokens": len(ids)}


def test_eval_matches_an_independent_computation_and_is_recorded(cli, artifact, source):
    out, ident = artifact
    text = default_text().read_text(encoding="utf-8")
    args = ("--max-windows", "2", "--seqlen", SEQLEN, "--device", "cpu")
    _, doc = cli.json("eval", ident[:6], "--kl", *args)
    expected = independent(out, source, text, SEQLEN, 2)
    m = doc["metrics"]
    assert m["nll"] == pytest.approx(expected["nll"], rel=1e-5)
    assert m["ppl"] == pytest.approx(math.exp(expected["nll"]), rel=1e-5)
    assert m["kl"] == pytest.approx(expected["kl"], rel=1e-4, abs=1e-7)
    assert m["top1"] == pytest.approx(expected["top1"], abs=1e-9)
    p = doc["protocol"]
    assert (p["dataset"], p["seqlen"], p["windows"], p["tokens"]) == (
        "wikitext-2-raw-v1 test",
        SEQLEN,
        2,
        126,
    )
    assert p["dataset_sha256"] == "696cca6b65a171b0a358a4be6732cdfdf2dd6164a32e20fd70e3c13fc4dfae83"
    assert p["tokens_total"] == expected["tokens"] and p["dtype"] == "bfloat16" and p["device"] == "cpu"
    assert p["reference"] == str(source) and doc["recorded"] and doc["id"] == ident

    _, record = cli.json("show", ident)
    assert {r["name"]: r["value"] for r in record["metrics"]} == pytest.approx(m)
    assert record["metrics"][0]["protocol"] == p and record["metrics"][0]["seqlen"] == SEQLEN
    assert "ppl" in cli("show", ident).stdout and cli.json("ls")[1][0]["ppl"] == pytest.approx(m["ppl"])

    # by its folder, human output: recorded on the same row
    result = cli("eval", out, *args)
    assert result.stdout.splitlines()[0] == (
        f"ppl {m['ppl']:.4f} (nll {m['nll']:.5f}) on wikitext-2-raw-v1 test: 2 windows of {SEQLEN} "
        f"tokens, 126 predicted, cpu bfloat16"
    )
    assert result.stdout.splitlines()[-1] == f"recorded on {ident}"
    assert metric_rows() == 6


def test_eval_of_an_unrecorded_folder_records_nothing(cli, source, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 10)
    result = cli("eval", source, "--text", text, "--seqlen", SEQLEN, "--device", "cpu")
    assert (
        result.stdout.startswith("ppl ")
        and "on text.txt: 7 windows of 64 tokens, 441 predicted" in result.stdout
    )
    assert result.stderr.strip() == f"note: {source} is not in the registry; nothing was recorded"
    _, doc = cli.json("eval", source, "--text", text, "--seqlen", SEQLEN, "--max-windows", "1")
    assert doc["recorded"] is False and doc["id"] is None and doc["protocol"]["dataset"] == "text.txt"
    assert metric_rows() == 0


def run_error(cli, *args):
    result = cli(*args, ok=None)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr.strip()


def test_eval_errors_leave_the_registry_unchanged(cli, artifact, source, tmp_path, qconv_home):
    out, ident = artifact
    registry_file = qconv_home / "registry.db"
    assert (
        run_error(cli, "eval", "abcdef012345")
        == f"Error: no artifact with id 'abcdef012345' in {registry_file}"
    )
    with open_registry() as registry:  # 16 more ids: some share a first hex digit
        more = [registry.record_artifact(_manifest_of(out), tmp_path / f"copy{i}") for i in range(16)]
    first = max("0123456789abcdef", key=lambda ch: sum(i.startswith(ch) for i in [ident, *more]))
    assert run_error(cli, "eval", first).startswith(f"Error: artifact id '{first}' is ambiguous, it matches ")
    missing = tmp_path / "missing.txt"
    assert run_error(cli, "eval", ident, "--text", missing).startswith(
        f"Error: {missing}: cannot read the evaluation text"
    )
    assert run_error(cli, "eval", ident, "--seqlen", "512", "--device", "cpu") == (
        "Error: --seqlen 512 is longer than the model's context (256 positions)"
    )
    short = tmp_path / "short.txt"
    short.write_text("too short")
    assert run_error(cli, "eval", ident, "--text", short, "--seqlen", SEQLEN) == (
        f"Error: the text has 9 tokens, fewer than one window of {SEQLEN}"
    )
    assert run_error(cli, "eval", ident, "--max-windows", "0") == "Error: --max-windows must be at least 1"
    assert metric_rows() == 0


def test_eval_kl_without_the_source(cli, source, tmp_path):
    copy = tmp_path / "src-copy"
    shutil.copytree(source, copy)
    out = tmp_path / "out"
    _, doc = cli.json(
        "convert", copy, "-o", out, "--method", "bnb", "--bits", "8", "--device", "cpu", "--no-verify"
    )
    shutil.rmtree(copy)
    assert run_error(cli, "eval", doc["id"], "--kl", "--seqlen", SEQLEN, "--max-windows", "1") == (
        f"Error: --kl: the artifact's source {copy} is gone; pass --source"
    )
    assert metric_rows() == 0
    # --source points at another copy of it
    _, doc = cli.json("eval", out, "--kl", "--source", source, "--seqlen", SEQLEN, "--max-windows", "1")
    assert doc["metrics"]["kl"] >= 0 and 0 < doc["metrics"]["top1"] <= 1 and doc["recorded"]


def _manifest_of(folder):
    return json.loads((folder / "qconv.json").read_text())


@pytest.mark.parametrize("method", [["--method", "eetq"], ["--method", "hqq", "--bits", "4"]])
def test_eval_runs_formats_loaded_by_qconv(cli, source, tmp_path, method):
    """EETQ and HQQ load through qconv.load_model (no stock loader): eval and --kl run on them."""
    out = tmp_path / "artifact"
    _, converted = cli.json("convert", source, "-o", out, *method, "--device", "cpu", "--no-verify")
    _, doc = cli.json("eval", out, "--max-windows", "1", "--seqlen", str(SEQLEN), "--kl", "--device", "cpu")
    assert doc["recorded"] is True and doc["id"] == converted["id"]
    assert math.isfinite(doc["metrics"]["ppl"]) and doc["metrics"]["ppl"] > 1
    assert 0 <= doc["metrics"]["kl"] < 0.05 and doc["metrics"]["top1"] > 0.8


def test_eval_text_by_name_is_the_shipped_text(cli, artifact):
    """``--text wikitext2`` names the shipped WikiText-2 test text: the same protocol as the default."""
    out, _ = artifact
    args = ("--max-windows", "1", "--seqlen", SEQLEN, "--device", "cpu")
    _, named = cli.json("eval", out, "--text", "wikitext2", *args)
    _, default = cli.json("eval", out, *args)
    assert named["protocol"]["dataset"] == default["protocol"]["dataset"] == "wikitext-2-raw-v1 test"
    assert named["protocol"]["dataset_sha256"] == default["protocol"]["dataset_sha256"]
    assert named["metrics"] == default["metrics"]
