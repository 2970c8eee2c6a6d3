"""formats/base.py: what a method declares, how options of several methods share the CLI, and
that a bug in a method's own code surfaces as an exception rather than as a failed check.

Throwaway methods are registered into copies of the tables, so no other test sees them.
"""

from __future__ import annotations

from pathlib import Path

import click
import pytest
import torch

from qconv import pipeline
from qconv.cli import main
from qconv.cli.convert import method_options
from qconv.errors import UsageError
from qconv.formats import all_formats, all_options, base, format_of_quant_method, get_format
from qconv.formats.base import Option, QuantFormat, register
from qconv.formats.format_bnb import BitsAndBytesFormat


@pytest.fixture
def tables(monkeypatch):
    """Copies of the method and option tables: what a test registers is gone afterwards."""
    monkeypatch.setattr(base, "_FORMATS", dict(base._FORMATS))
    monkeypatch.setattr(base, "_OPTIONS", dict(base._OPTIONS))


def toy(name: str, *options: Option) -> QuantFormat:
    return QuantFormat(name=name, description="a test method", options=options)


def cli_params(**_) -> list[str]:
    command = click.command()(method_options(lambda **kwargs: None))
    return [opt for param in command.params for opt in param.opts]


def test_methods_declare_what_they_are():
    declared = {
        name: (fmt.quant_method, fmt.stock_loader, fmt.extra) for name, fmt in sorted(all_formats().items())
    }
    assert declared == {
        "aqlm": ("aqlm", "transformers", "aqlm"),
        "bnb": ("bitsandbytes", "transformers", None),
        "compressed-tensors": ("compressed-tensors", "transformers", "compressed-tensors"),
        "eetq": ("eetq", None, None),  # pure torch: no `eetq` extra to install
        "hqq": ("hqq", None, "hqq"),
    }
    assert {fmt.quant_method: format_of_quant_method(fmt.quant_method) for fmt in all_formats().values()} == {
        fmt.quant_method: fmt for fmt in all_formats().values()
    }
    assert format_of_quant_method("gptq") is None


def test_every_extra_a_method_names_is_in_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    for fmt in all_formats().values():
        if fmt.extra is not None:
            assert fmt.extra in extras, fmt.name
    assert "eetq" not in extras


def test_one_cli_option_per_name():
    """bnb, hqq and eetq all take --bits: one click option serves the three."""
    assert [o for p in main.commands["convert"].params for o in p.opts if o in cli_params()] == cli_params()
    params = cli_params()
    assert params.count("--bits") == 1
    assert len(params) == len(set(params)) == len(all_options())
    assert {"--bits", "--quant-type", "--group-size", "--arch", "--scheme"} <= set(params)


def test_identical_declarations_merge(tables):
    widget = Option("widget", int, "toy: widgets (default 3)", default=3)
    register(toy("toy-a", widget))
    register(toy("toy-b", Option("widget", int, "toy-b's own help", default=5)))
    assert all_options()["widget"] is widget  # the first registration's help is shown
    assert cli_params().count("--widget") == 1
    # each method still fills its own default
    assert get_format("toy-a").given_options({})["widget"] == 3
    assert get_format("toy-b").given_options({})["widget"] == 5


@pytest.mark.parametrize(
    "other,message",
    [
        (
            Option("bits", str),
            "method 'toy' declares option 'bits' as str, but bnb, eetq, hqq declared it as int: "
            "one CLI option serves both",
        ),
        (
            Option("bits", int, choices=(2, 4)),
            "method 'toy' declares option 'bits' as int with choices [2, 4], but bnb, eetq, hqq declared "
            "it as int: one CLI option serves both",
        ),
        (
            Option("quant_type", str, choices=("nf4", "int4")),
            "method 'toy' declares option 'quant_type' as str with choices ['nf4', 'int4'], but bnb "
            "declared it as str with choices ['nf4', 'fp4']: one CLI option serves both",
        ),
        (
            Option("finetune", bool),
            "method 'toy' declares option 'finetune' as bool, but aqlm declared it as a flag: one CLI "
            "option serves both",
        ),
    ],
)
def test_conflicting_declarations_are_refused_at_registration(tables, other, message):
    with pytest.raises(RuntimeError) as error:
        register(toy("toy", other))
    assert str(error.value) == message
    assert "toy" not in all_formats() and all_options()[other.name] is not other


def test_registered_twice(tables):
    with pytest.raises(RuntimeError, match="^quantization method 'bnb' registered twice$"):
        register(BitsAndBytesFormat())


def test_allowed_options_come_from_the_declarations(tables):
    fmt = register(toy("toy", Option("size", int, default=1), Option("shade", str, applies_when=("size", 2))))
    assert fmt.given_options({}) == {"size": 1, "shade": None}
    assert fmt.given_options({"size": 2, "shade": "dark"}) == {"size": 2, "shade": "dark"}
    for options, message, cli_message in [
        ({"bits": 4}, "bits does not apply to method toy", "--bits does not apply to --method toy"),
        ({"shade": "dark"}, "shade does not apply to method toy", "--shade does not apply to --method toy"),
    ]:
        with pytest.raises(UsageError) as error:
            fmt.given_options(options)
        assert (str(error.value), error.value.cli_message()) == (message, cli_message)
        assert (error.value.option, error.value.method) == ((options.popitem()[0],), "toy")


# -- a bug in a method's code is no failed check -------------------------------------------------
class FailingLoader(BitsAndBytesFormat):
    """bnb, whose load_pretrained raises ``error``: a bug (AttributeError) or a refusal of the
    loading library (ValueError, as transformers raises)."""

    def __init__(self, name: str, error: Exception) -> None:
        super().__init__()
        self.name = name
        self.quant_method = ""
        self.error = error

    def load_pretrained(self, folder, device: torch.device, dtype: torch.dtype):
        raise self.error


def test_a_bug_in_a_format_propagates(tables, tiny_llama, tmp_path):
    register(FailingLoader("buggy", AttributeError("'NoneType' object has no attribute 'weight'")))
    with pytest.raises(AttributeError, match="has no attribute 'weight'"):
        pipeline.convert(str(tiny_llama), tmp_path / "out", "buggy", {}, device="cpu", logits=True)
    assert not (tmp_path / "out").exists()


def test_a_loader_refusal_fails_the_check(tables, tiny_llama, tmp_path):
    register(FailingLoader("refused", ValueError("the checkpoint is not supported\nsecond line")))
    result = pipeline.convert(str(tiny_llama), tmp_path / "out", "refused", {}, device="cpu", logits=True)
    loader = next(c for c in result.report.checks if c["name"] == "loader")
    assert not result.report.passed and not loader["passed"]
    assert loader["detail"] == "the real loader failed: ValueError: the checkpoint is not supported"


def test_model_card_says_how_each_method_loads():
    """From the declarations: no `qconv[eetq]` extra exists, so the card does not name one."""
    from qconv.model_card import _loading

    first = {method: _loading(method, "me/model")[0] for method in sorted(all_formats())}
    assert first == {
        "aqlm": "Stock transformers loads it (install `aqlm`):",
        "bnb": "Stock transformers loads it (install `bitsandbytes`):",
        "compressed-tensors": "Stock transformers loads it (install `compressed-tensors`):",
        "eetq": "transformers 5.x cannot load eetq folders; `qconv.load_model` can (`pip install qconv`):",
        "gguf": "One GGUF file, `*TYPE.gguf`.",
        "hqq": "transformers 5.x cannot load hqq folders; `qconv.load_model` can (`pip install qconv[hqq]`):",
    }
