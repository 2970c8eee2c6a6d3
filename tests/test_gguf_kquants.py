"""GGUF k-quant blocks (formats/gguf_kquants.py): the llama solver's bytes against llama.cpp's own
``ggml_quantize_chunk``, the qconv solver's error through gguf-py's independent dequantizer.

Run as a script (``python tests/test_gguf_kquants.py [rows] [cols]``) it prints the timings of both
solvers and of ggml_quantize on a 4096 x 4096 tensor, and qconv's error against llama's.
"""

from __future__ import annotations

import hashlib
import time

import gguf
import gguf_reference
import numpy as np
import pytest
import torch

from qconv.errors import SourceError, UsageError
from qconv.formats import gguf_kquants
from qconv.formats.gguf_kquants import QUANTIZERS, type_size

TYPES = list(QUANTIZERS)
needs_ggml = pytest.mark.skipif(not gguf_reference.available(), reason=gguf_reference.MISSING)


def weights(kind: str, rows: int = 16, cols: int = 1024, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)) if kind == "normal" else rng.standard_t(4, (rows, cols))
    return (x * 0.02).astype(np.float32)


def edge_rows() -> np.ndarray:
    """Rows of 512: all zero; one huge outlier; all negative; constant (positive and negative);
    a zero sub-block inside a nonzero block; tiny values (fp16 d underflows)."""
    rng = np.random.default_rng(3)
    x = np.zeros((8, 512), dtype=np.float32)
    x[1] = rng.standard_normal(512) * 0.01
    x[1, 77] = 300.0
    x[2] = -np.abs(rng.standard_normal(512)) * 0.05 - 0.01
    x[3] = 0.25
    x[4] = -0.125
    x[5] = rng.standard_normal(512)
    x[5, 32:64] = 0.0
    x[6] = rng.standard_normal(512) * 1e-9
    x[7, ::2] = 1.0
    x[7, 1::2] = -1.0
    return x


def block_errors(packed: np.ndarray, x: np.ndarray, type_name: str) -> np.ndarray:
    """Squared error per 256-block, dequantized by gguf-py (not by our code)."""
    values = gguf.quants.dequantize(packed, gguf.GGMLQuantizationType[type_name])
    diff = values.astype(np.float64) - x.astype(np.float64)
    return (diff.reshape(-1, 256) ** 2).sum(1)


def same_blocks(a: np.ndarray, b: np.ndarray, type_name: str) -> float:
    size = type_size(type_name)
    return float((a.reshape(-1, size) == b.reshape(-1, size)).all(1).mean())


# ---------------------------------------------------------------- llama: ggml's bytes


@needs_ggml
@pytest.mark.parametrize("type_name", TYPES)
@pytest.mark.parametrize("kind", ["normal", "t4"])
def test_llama_solver_writes_ggml_bytes(type_name, kind):
    # every float32 operation in C's order: measured 100% identical 256-blocks for all five
    # types (normal and Student-t rows, plus the edge rows below)
    x = weights(kind, rows=24, seed=1)
    ours = QUANTIZERS[type_name](torch.from_numpy(x), "llama").numpy()
    theirs = gguf_reference.ggml_quantize(x, type_name)
    assert ours.shape == theirs.shape
    assert same_blocks(ours, theirs, type_name) == 1.0


@needs_ggml
@pytest.mark.parametrize("type_name", TYPES)
def test_llama_solver_writes_ggml_bytes_on_edge_rows(type_name):
    x = edge_rows()
    ours = QUANTIZERS[type_name](torch.from_numpy(x), "llama").numpy()
    assert same_blocks(ours, gguf_reference.ggml_quantize(x, type_name), type_name) == 1.0


@needs_ggml
@pytest.mark.parametrize("type_name", ["Q4_K", "Q5_K"])
def test_llama_solver_rounds_sqrt_as_c(type_name):
    # rows 1419 and 2068 of this tensor hold the only blocks (of 65536) where torch's float32 sqrt
    # on the CPU was 1 ulp off sqrtf, which moved a sub-block's weights and its scale
    x = np.ascontiguousarray(weights("normal", 4096, 4096)[[1419, 2068]])
    ours = QUANTIZERS[type_name](torch.from_numpy(x), "llama").numpy()
    assert same_blocks(ours, gguf_reference.ggml_quantize(x, type_name), type_name) == 1.0


# bytes pinned without llama.cpp: sha256 of the llama solver's output for an exact input (these
# equal ggml_quantize's bytes, which test_llama_solver_writes_ggml_bytes checks where it can run)
PINNED = {
    "Q2_K": "621e3a59420681c437659a125208bdc2fe139080dfa7cea3db72deb71de8b370",
    "Q3_K": "16e7015d5f7957c488910220c912e88efdcc4757f5d14314ca14842c384ff103",
    "Q4_K": "3f1c8ef5508c6069afad60788a890fcaf4e1c119cc5bcf03229bc9bda752dfe1",
    "Q5_K": "2094037ae80f8398ebb95219798dd816ae4050c204896a5f0ac253affdad212f",
    "Q6_K": "26f9dba1f17fb78ca899ffb18664bd2a712915703756ebc041af5df7b214445b",
}


def pinned_input() -> torch.Tensor:
    i = torch.arange(4 * 512, dtype=torch.float32)
    return (((i * 37) % 101 - 50) / 64).reshape(4, 512)


@pytest.mark.parametrize("type_name", TYPES)
def test_llama_solver_bytes_are_pinned(type_name):
    packed = QUANTIZERS[type_name](pinned_input(), "llama").numpy()
    assert hashlib.sha256(packed.tobytes()).hexdigest() == PINNED[type_name]


# ---------------------------------------------------------------- qconv: never worse than llama


# qconv's squared error / llama's on a whole tensor stays below (measured values a bit under)
QCONV_BOUND = {"Q2_K": 0.82, "Q3_K": 0.93, "Q4_K": 0.97, "Q5_K": 0.93, "Q6_K": 0.96}


@pytest.mark.parametrize("type_name", TYPES)
@pytest.mark.parametrize("kind", ["normal", "t4", "edge"])
def test_qconv_error_is_never_above_llamas(type_name, kind):
    x = edge_rows() if kind == "edge" else weights(kind)
    xt = torch.from_numpy(x)
    llama = block_errors(QUANTIZERS[type_name](xt, "llama").numpy(), x, type_name)
    qconv = block_errors(QUANTIZERS[type_name](xt, "qconv").numpy(), x, type_name)
    assert np.isfinite(qconv).all()
    # per block (a relative 1e-6 for gguf-py's float32 arithmetic beside ours) and per tensor
    assert (qconv <= llama * (1 + 1e-6) + 1e-30).all()
    if kind == "edge":
        assert qconv.sum() <= llama.sum()
    else:
        # measured on 16 x 1024: Q2_K 0.78 (normal) / 0.71 (t4), Q3_K 0.91 / 0.90, Q4_K 0.95,
        # Q5_K 0.90, Q6_K 0.94
        assert qconv.sum() < QCONV_BOUND[type_name] * llama.sum()


@pytest.mark.parametrize("type_name", TYPES)
def test_zero_rows_give_zero_values(type_name):
    x = np.zeros((2, 256), dtype=np.float32)
    for solver in ("llama", "qconv"):
        packed = QUANTIZERS[type_name](torch.from_numpy(x), solver).numpy()
        values = gguf.quants.dequantize(packed, gguf.GGMLQuantizationType[type_name])
        assert (values == 0).all()


# ---------------------------------------------------------------- shapes, chunks, refusals


@pytest.mark.parametrize("type_name", TYPES)
def test_shape_dtype_and_chunking(type_name, monkeypatch):
    x = torch.from_numpy(weights("normal", rows=5, cols=768))
    whole = QUANTIZERS[type_name](x, "qconv")
    assert whole.dtype == torch.uint8
    assert whole.shape == (5, 3 * type_size(type_name))
    monkeypatch.setattr(gguf_kquants, "CHUNK_ELEMENTS", 768)  # one row per chunk
    assert torch.equal(QUANTIZERS[type_name](x, "qconv"), whole)
    assert QUANTIZERS[type_name](torch.zeros(0, 256), "llama").shape == (0, type_size(type_name))


def test_type_sizes_are_gguf_pys():
    sizes = {name: gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]] for name in TYPES}
    assert sizes == {
        "Q2_K": (256, 84),
        "Q3_K": (256, 110),
        "Q4_K": (256, 144),
        "Q5_K": (256, 176),
        "Q6_K": (256, 210),
    }


def test_refusals_name_the_problem():
    with pytest.raises(UsageError, match=r"unknown GGUF k-quant solver 'best'; valid: llama, qconv"):
        QUANTIZERS["Q4_K"](torch.zeros(1, 256), "best")
    with pytest.raises(
        UsageError,
        match=r"Q4_K needs a 2-D weight whose rows are a multiple of 256 values, got shape \(2, 100\)",
    ):
        QUANTIZERS["Q4_K"](torch.zeros(2, 100), "llama")
    bad = torch.zeros(1, 256)
    bad[0, 3] = float("nan")
    with pytest.raises(SourceError, match="the weight has NaN or infinite values"):
        QUANTIZERS["Q2_K"](bad, "qconv")
    with pytest.raises(UsageError, match="got shape"):
        QUANTIZERS["Q6_K"](torch.zeros(256), "llama")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("type_name", TYPES)
def test_cuda_gives_the_cpu_bytes(type_name):
    x = torch.from_numpy(np.concatenate([weights("t4", rows=8, cols=512), edge_rows()]))
    for solver in ("llama", "qconv"):
        cpu = QUANTIZERS[type_name](x, solver)
        cuda = QUANTIZERS[type_name](x.cuda(), solver)
        assert cuda.device.type == "cuda"
        if solver == "llama":
            assert torch.equal(cuda.cpu(), cpu)
        else:  # qconv may pick another equally good solution; its error must stay as low
            errors = [block_errors(p.cpu().numpy(), x.numpy(), type_name).sum() for p in (cpu, cuda)]
            assert errors[1] <= errors[0] * (1 + 1e-4)


# ---------------------------------------------------------------- timings (a script, not a test)


def main(rows: int = 4096, cols: int = 4096) -> None:
    x = weights("normal", rows, cols)
    xt = torch.from_numpy(x)
    print(f"{rows} x {cols} float32 on the CPU ({torch.get_num_threads()} threads)")
    for type_name in TYPES:
        times = {}
        start = time.perf_counter()
        ggml = gguf_reference.ggml_quantize(x, type_name) if gguf_reference.available() else None
        times["ggml"] = time.perf_counter() - start
        outputs = {}
        for solver in ("llama", "qconv"):
            start = time.perf_counter()
            outputs[solver] = QUANTIZERS[type_name](xt, solver).numpy()
            times[solver] = time.perf_counter() - start
        same = same_blocks(outputs["llama"], ggml, type_name) if ggml is not None else float("nan")
        ratio = (
            block_errors(outputs["qconv"], x, type_name).sum()
            / block_errors(outputs["llama"], x, type_name).sum()
        )
        print(
            f"{type_name}: ggml {times['ggml']:.2f}s  llama {times['llama']:.2f}s"
            f"  qconv {times['qconv']:.2f}s  identical blocks {same:.4%}  qconv/llama error {ratio:.4f}"
        )


if __name__ == "__main__":
    import sys

    main(*(int(a) for a in sys.argv[1:3]))
