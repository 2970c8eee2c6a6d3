"""compressed-tensors' ``--solver hqq`` (formats/ct_solver.py): the same bytes as ``--solver rtn``
(llm-compressor's), per group the lowest x^2-weighted error (never above rtn's), per layer a
relative error never above rtn's: on random and heavy-tailed weights, on a group's outlier (kept
exact, where rtn leaves it half a step off), on outliers everywhere (the per-group bounded
choice), and on the tiny Llama through the CLI, where stock transformers with compressed-tensors
loads the result and ``qconv verify`` passes. FP8 has no integer grid: refused."""

from __future__ import annotations

import json

import pytest
import torch
from test_format_compressed_tensors import folder_tensors, nothing_written, reference_model, run_error

from qconv.formats import ct_layout, ct_solver, get_format

CT = get_format("compressed-tensors")
CPU = torch.device("cpu")
PROMPT = torch.tensor([[1, 17, 42, 99, 7, 256, 3, 12, 64, 5]])
INT_SCHEMES = ("W4A16", "W4A16_ASYM", "W8A16", "W8A8")


def weights(kind: str, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    if kind == "random":
        weight = torch.randn(48, 256, generator=generator) * 0.02
    else:  # heavy-tailed: Student's t with 2 degrees of freedom, plus a few large outliers
        normal = torch.randn(48, 256, generator=generator)
        chi2 = torch.randn(48, 256, 2, generator=generator).square().sum(-1)
        weight = normal / (chi2 / 2).sqrt() * 0.02
        weight[5, 7] = 1.5
        weight[9, 100] = -0.8
    weight[0, :128] = 0  # an all-zero group
    weight[1, :64] = 0.01  # a constant one
    return weight.to(dtype)


def group_errors(
    weight: torch.Tensor, quantized: ct_layout.Quantized, importance: bool = False
) -> torch.Tensor:
    """Squared error of each group ``[out, groups]`` (float32), each weight's counted by its
    square with ``importance`` (the solver's criterion)."""
    groups = quantized.scale.shape[1]
    reference = weight.to(torch.float32)
    squared = (ct_layout.dequantize(quantized, weight.shape[1]) - reference).square()
    if importance:
        squared = squared * reference.square()
    return squared.unflatten(-1, (groups, -1)).sum(-1)


def check_bounds(weight: torch.Tensor, rtn: ct_layout.Quantized, solved: ct_solver.Solved) -> None:
    """The solver's guarantees: per group its weighted error at most rtn's, and its plain error
    too where the layer took the bounded choice; per layer the relative error at most rtn's, as
    the manifest measures both."""
    hqq = solved.quantized
    assert (group_errors(weight, hqq, importance=True) <= group_errors(weight, rtn, importance=True)).all()
    if solved.choice == "bounded":
        assert (group_errors(weight, hqq) <= group_errors(weight, rtn)).all()
    assert solved.rel_error <= solved.rtn_rel_error
    assert solved.rtn_rel_error == ct_solver.relative_error(weight, rtn, weight.shape[1])
    assert solved.rel_error == ct_solver.relative_error(weight, hqq, weight.shape[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kind", ["random", "heavy-tailed"])
@pytest.mark.parametrize("name,group_size", [(s, 64 if s != "W8A8" else None) for s in INT_SCHEMES])
def test_never_worse_than_rtn_per_group_and_layer(name, group_size, kind, dtype):
    scheme = ct_layout.SCHEMES[name]
    weight = weights(kind, dtype)
    rtn = ct_layout.quantize_rtn(weight, scheme, group_size)
    solved = ct_solver.quantize_hqq(weight, scheme, group_size)
    hqq = solved.quantized
    # the stored numbers: the same dtypes and shapes, codes and zero points in the scheme's range
    q_min, q_max = ct_layout.code_range(scheme)
    assert hqq.codes.dtype == torch.int8 and hqq.codes.shape == rtn.codes.shape
    assert q_min <= hqq.codes.min() and hqq.codes.max() <= q_max
    assert hqq.scale.dtype == dtype and hqq.scale.shape == rtn.scale.shape
    assert (hqq.scale > 0).all()
    if scheme.symmetric:
        assert hqq.zero_point is None
    else:
        assert hqq.zero_point.dtype == torch.int8 and hqq.zero_point.shape == rtn.zero_point.shape
        assert q_min <= hqq.zero_point.min() and hqq.zero_point.max() <= q_max
    check_bounds(weight, rtn, solved)
    if scheme.strategy == "group":  # nothing beats rtn on the all-zero group: its numbers stay
        assert torch.equal(hqq.codes[0, :64], rtn.codes[0, :64])
        assert torch.equal(hqq.scale[0, 0], rtn.scale[0, 0])
    # and it does find better: the point of the solver
    assert solved.groups_improved > solved.groups // 2
    assert solved.rel_error < solved.rtn_rel_error


def bulk_with_outliers(dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Weights below 0.05 in magnitude (a clipped normal), as a layer's bulk."""
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(32, 256, generator=generator) * 0.02).clamp(-0.05, 0.05).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_an_outlier_is_kept_exact(dtype):
    """The super-weight case (module doc): a weight six times its group's others. rtn's absmax /
    7.5 leaves it half a step off (a positive one code 7 for 7.5 steps, a negative one -8 for
    -7.5); the x^2-weighted search reproduces both (to the scale's rounding), and the layer's error is still
    below rtn's."""
    scheme = ct_layout.SCHEMES["W4A16"]
    weight = bulk_with_outliers(dtype)
    weight[3, 70] = 0.3
    weight[5, 200] = -0.3
    rtn = ct_layout.quantize_rtn(weight, scheme, 64)
    solved = ct_solver.quantize_hqq(weight, scheme, 64)
    check_bounds(weight, rtn, solved)
    assert solved.choice == "free" and solved.rel_error < solved.rtn_rel_error
    ours, theirs = (ct_layout.dequantize(q, 256) for q in (solved.quantized, rtn))
    for row, column in ((3, 70), (5, 200)):
        step = rtn.scale[row, column // 64].float()
        assert abs(theirs[row, column] - weight[row, column].float()) > 0.4 * step
        assert abs(ours[row, column] - weight[row, column].float()) < 0.01 * step


@pytest.mark.parametrize("name", ["W4A16", "W4A16_ASYM", "W8A16"])
def test_outliers_everywhere_take_the_bounded_choice(name):
    """An outlier in every group: reproducing each costs its group's other weights plain error,
    enough to raise the layer's above rtn's, so every group takes its lowest weighted error
    among the candidates whose plain error is below rtn's."""
    scheme = ct_layout.SCHEMES[name]
    weight = bulk_with_outliers()
    weight[:, ::64] = 0.2
    rtn = ct_layout.quantize_rtn(weight, scheme, 64)
    solved = ct_solver.quantize_hqq(weight, scheme, 64)
    assert solved.choice == "bounded"
    check_bounds(weight, rtn, solved)
    assert 0 < solved.groups_improved


def test_the_solver_moves_the_scale_only_within_the_grid():
    """Symmetric: codes * scale with codes in [-8, 7]; a group whose values sit on a finer grid
    than rtn's absmax / 7.5 scale allows is reconstructed exactly."""
    values = torch.tensor([-8, -5, -3, -1, 0, 1, 2, 4, 6, 7] * 6 + [0, 0, 3, -2], dtype=torch.float32)
    weight = (values * 0.125).to(torch.bfloat16)[None, :]
    scheme = ct_layout.SCHEMES["W4A16"]
    solved = ct_solver.quantize_hqq(weight, scheme, 64)
    assert solved.rtn_rel_error > 0.01  # rtn: scale 1 / 7.5, a step that misses most values
    assert solved.rel_error == 0.0
    assert solved.quantized.scale.item() == 0.125
    assert solved.quantized.codes[0].tolist() == values.to(torch.int8).tolist()


def test_recipe_records_the_solver():
    recipe = CT.make_recipe({"solver": "hqq", "scheme": "W4A16_ASYM", "group_size": 64})
    assert recipe == {
        "method": "compressed-tensors",
        "scheme": "W4A16_ASYM",
        "bits": 4,
        "group_size": 64,
        "solver": "hqq",
        "hqq": ct_solver.solver_settings(),
    }
    assert CT.make_recipe({"solver": "hqq", "scheme": "W8A8"})["solver"] == "hqq"


def convert(cli, source, out, scheme, solver, *extra):
    _, doc = cli.json(
        "convert",
        source,
        "-o",
        out,
        "--method",
        "compressed-tensors",
        "--scheme",
        scheme,
        "--solver",
        solver,
        "--device",
        "cpu",
        *extra,
    )
    assert doc["verify"]["passed"], doc["verify"]
    return doc, json.loads((out / "qconv.json").read_text())


@pytest.mark.parametrize(
    "scheme,flags", [("W4A16", ["--group-size", "64"]), ("W4A16_ASYM", []), ("W8A16", [])]
)
def test_tiny_llama_hqq_below_rtn_loads_and_verifies(cli, tiny_llama, tmp_path, scheme, flags):
    pytest.importorskip("compressed_tensors")
    _, rtn = convert(cli, tiny_llama, tmp_path / "rtn", scheme, "rtn", *flags)
    doc, hqq = convert(cli, tiny_llama, tmp_path / "hqq", scheme, "hqq", *flags)
    assert hqq["recipe"]["solver"] == "hqq" and hqq["recipe"]["hqq"] == ct_solver.solver_settings()
    assert set(hqq["layers"]) == set(rtn["layers"]) and len(hqq["layers"]) == 14
    for name, layer in hqq["layers"].items():
        # the manifest records both solvers' errors; rtn's is the rtn artifact's own
        assert layer["rtn_rel_error"] == rtn["layers"][name]["rel_error"], name
        assert layer["rel_error"] <= layer["rtn_rel_error"], name
        improved, groups = map(int, layer["hqq_groups"].split("/"))
        assert 0 < improved <= groups
        assert layer["hqq_choice"] in ("free", "bounded"), name
    mean = sum(layer["rel_error"] / layer["rtn_rel_error"] for layer in hqq["layers"].values()) / 14
    # lower on the whole, though the search minimises the x^2-weighted error, not this one
    assert mean < 1
    # the same layout as llm-compressor's: config, tensor names, dtypes and shapes
    rtn_config = json.loads((tmp_path / "rtn" / "config.json").read_text())["quantization_config"]
    hqq_config = json.loads((tmp_path / "hqq" / "config.json").read_text())["quantization_config"]
    assert hqq_config == rtn_config
    rtn_tensors, hqq_tensors = folder_tensors(tmp_path / "rtn"), folder_tensors(tmp_path / "hqq")
    assert {k: (v.dtype, v.shape) for k, v in hqq_tensors.items()} == {
        k: (v.dtype, v.shape) for k, v in rtn_tensors.items()
    }
    # the real loader: stock transformers with compressed-tensors, against qconv's reference
    tolerance = CT.loader_tolerance(doc["recipe"])
    assert doc["verify"]["logits"]["loader_rel_diff"] < tolerance
    reference, _ = reference_model(tiny_llama, tmp_path / "hqq")
    model = CT.load_pretrained(tmp_path / "hqq", CPU, torch.float32)
    with torch.no_grad():
        ours, expected = model(PROMPT).logits, reference(PROMPT).logits
    assert ((ours - expected).norm() / expected.norm()).item() < tolerance
    _, report = cli.json("verify", tmp_path / "hqq", "--device", "cpu")
    assert report["passed"], report


def test_w8a8_int8_weights(cli, tiny_llama, tmp_path):
    pytest.importorskip("compressed_tensors")
    _, rtn = convert(cli, tiny_llama, tmp_path / "rtn", "W8A8", "rtn", "--no-record")
    _, hqq = convert(cli, tiny_llama, tmp_path / "hqq", "W8A8", "hqq", "--no-record")
    for name, layer in hqq["layers"].items():
        assert layer["rel_error"] <= rtn["layers"][name]["rel_error"] == layer["rtn_rel_error"], name
    assert folder_tensors(tmp_path / "hqq")["model.layers.0.mlp.up_proj.weight"].dtype == torch.int8


def test_fp8_refused_in_one_line(cli, tiny_llama, tmp_path):
    out = tmp_path / "out"
    message = run_error(
        cli,
        "convert",
        tiny_llama,
        "-o",
        out,
        "--method",
        "compressed-tensors",
        "--scheme",
        "FP8_DYNAMIC",
        "--solver",
        "hqq",
    )
    assert message == (
        "Error: --method compressed-tensors: --solver hqq does not apply to FP8_DYNAMIC: FP8 has no "
        "integer grid to search"
    )
    nothing_written(tmp_path, out, cli)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", INT_SCHEMES)
def test_cuda(name):
    """The same batched torch on the GPU: never worse than rtn there, and as good as on the CPU
    (reductions may round differently, so a group may pick another of two near-equal candidates)."""
    scheme = ct_layout.SCHEMES[name]
    group_size = None if name == "W8A8" else 64
    weight = weights("heavy-tailed", torch.bfloat16)
    on_cpu = ct_solver.quantize_hqq(weight, scheme, group_size)
    on_gpu = ct_solver.quantize_hqq(weight.cuda(), scheme, group_size)
    assert on_gpu.quantized.codes.is_cuda
    assert on_gpu.rel_error <= on_gpu.rtn_rel_error
    assert on_gpu.rel_error == pytest.approx(on_cpu.rel_error, rel=1e-3)
    packed = CT.quantize(
        weight.cuda(),
        {**CT.make_recipe({"scheme": name, "solver": "hqq"}), "dtype": "bfloat16"},
        torch.device("cuda"),
    )
    assert all(t.is_cuda for t in packed.values())
