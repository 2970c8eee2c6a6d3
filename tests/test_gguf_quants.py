"""GGUF's float and legacy block bytes (formats/gguf_quants.py).

The llama solver must give llama.cpp's own bytes (ggml_quantize_chunk through
tests/gguf_reference.py, skipped without the llama extra); the qconv solver must never give a block
a larger squared error than llama's, as gguf's own numpy dequantizer reads the bytes back.
"""

from __future__ import annotations

import gguf
import gguf_reference  # tests/ is on sys.path
import numpy as np
import pytest
import torch

from qconv.errors import UsageError
from qconv.formats import gguf_quants
from qconv.formats.gguf_quants import QUANTIZERS

FLOATS = ["F32", "F16", "BF16"]
BLOCKS = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL"]

needs_ggml = pytest.mark.skipif(not gguf_reference.available(), reason=gguf_reference.MISSING)


def _sizes(type_name: str) -> tuple[int, int]:
    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]


def _weights(seed: int = 0) -> np.ndarray:
    """48 rows of 256 (8 blocks each) with the cases that trip a port: zeros (and -0.0), a lone
    outlier, negative-dominant blocks, values on rounding ties, heavy tails, tiny blocks."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((48, 256)) * 0.02).astype(np.float32)
    x[0] = 0.0  # an all-zero row
    x[1, :64] = -0.0  # blocks of -0.0, then +0.0 and -0.0 mixed
    x[1, 64:96:2] = 0.0
    x[2, 40] = 50.0  # one huge outlier in a block of small values
    x[3] = -np.abs(x[3])  # negative-dominant
    x[4, :32] = -np.abs(x[4, :32])
    x[4, 5] = 0.01  # ... whose largest |x| is negative
    x[5] = np.resize(np.arange(-8, 8, dtype=np.float32), 256)  # levels exactly, both signs of max
    x[6] = np.resize(np.arange(-15.5, 16.5, dtype=np.float32), 256)  # x + 0.5 steps: halves
    x[7] = rng.integers(-32, 33, 256) * np.float32(1 / 32)  # many exact ties at every width
    x[8, :32] = [127.0, 2.5, -3.5, 0.5, -0.5, 1.5, -1.5] + [0.0] * 25  # roundf's halves (Q8_0)
    x[9] = rng.standard_t(2, 256).astype(np.float32)  # heavy tails
    x[10] = (rng.lognormal(0, 2, 256) * rng.choice([-1, 1], 256)).astype(np.float32)
    x[11] = (rng.standard_normal(256) * 1e-6).astype(np.float32)  # fp16 scales go subnormal
    x[12, :32] = 1e-16  # IQ4_NL: below GROUP_MAX_EPS, scale 0
    x[12, 32:64] = 1e-14
    x[13, :32] = 3.0  # constant blocks
    x[13, 32:64] = -3.0
    x[14] = np.abs(x[14]) + 1.0  # positive, away from zero (the _1 types' min matters)
    for i in range(15, 20):  # equal largest magnitudes of both signs: the first one decides
        x[i, i] = 0.1
        x[i, i + 7] = -0.1
    return x


def _blocks(data: np.ndarray, type_name: str) -> np.ndarray:
    return data.reshape(-1, _sizes(type_name)[1])


def _dequantize(data: torch.Tensor, type_name: str) -> np.ndarray:
    return gguf.quants.dequantize(data.cpu().numpy(), gguf.GGMLQuantizationType[type_name])


def _block_errors(x: np.ndarray, data: torch.Tensor, type_name: str) -> np.ndarray:
    diff = _dequantize(data, type_name).astype(np.float64) - x.astype(np.float64)
    return (diff.reshape(-1, _sizes(type_name)[0]) ** 2).sum(axis=1)


# ---------------------------------------------------------------------------------------------
# llama: ggml's bytes


@needs_ggml
@pytest.mark.parametrize("type_name", FLOATS + BLOCKS)
def test_llama_bytes_are_ggmls(type_name):
    x = _weights()
    got = QUANTIZERS[type_name](torch.from_numpy(x), "llama").numpy()
    np.testing.assert_array_equal(got, gguf_reference.ggml_quantize(x, type_name))


@needs_ggml
@pytest.mark.parametrize("type_name", BLOCKS)
def test_llama_bytes_are_ggmls_on_a_larger_weight(type_name):
    """Every block identical (not a fraction: the C's float32 steps are reproduced, sums included)."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((128, 1024)) * 0.02).astype(np.float32)
    x[::7] *= rng.standard_t(3, (1, 1024)).astype(np.float32)
    got = QUANTIZERS[type_name](torch.from_numpy(x), "llama").numpy()
    want = gguf_reference.ggml_quantize(x, type_name)
    same = (_blocks(got, type_name) == _blocks(want, type_name)).all(axis=1)
    assert same.mean() == 1.0


@needs_ggml
@pytest.mark.parametrize("type_name", ["F16", "BF16"])
def test_float_edge_values_are_ggmls(type_name):
    """NaN (either sign, any payload: ggml makes it quiet), inf, halves of the last place (to even),
    overflow, subnormals."""
    bits = np.array(
        [0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF812345, 0x7FBFFFFF, 0x7F800000, 0xFF800000,
         0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF, 0x7F7FFFFF, 0x477FF000, 0x477FEFFF,
         0x33800000, 0x33000000, 0x33000001, 0x00000001, 0x80000000, 0x387FC000, 0x38800000],
        dtype=np.uint32,
    )  # fmt: skip
    x = np.resize(bits, 64).view(np.float32).reshape(2, 32)
    got = QUANTIZERS[type_name](torch.from_numpy(x.copy()), "llama").numpy()
    np.testing.assert_array_equal(got, gguf_reference.ggml_quantize(x, type_name))


@needs_ggml
@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_llama_scales_past_fp16_are_ggmls(type_name):
    """A block whose scale overflows fp16 (d = inf) still gives ggml's bytes."""
    x = np.zeros((1, 64), dtype=np.float32)
    x[0, :32] = np.linspace(-1e6, 1e6, 32, dtype=np.float32)
    x[0, 32:] = 7e4
    got = QUANTIZERS[type_name](torch.from_numpy(x), "llama").numpy()
    np.testing.assert_array_equal(got, gguf_reference.ggml_quantize(x, type_name))


def test_pinned_bytes():
    """Nibble order, the fifth bits' word, the offsets and roundf's halves, written out."""
    q4 = np.concatenate([np.arange(-8, 8), np.zeros(16)]).astype(np.float32)[None]
    # d = -8 / -8 = 1 (fp16 0x3C00); codes x + 8; value j in the low nibble of byte j, j+16 high
    assert QUANTIZERS["Q4_0"](torch.from_numpy(q4), "llama").tolist() == [
        [0x00, 0x3C] + [0x80 | j for j in range(16)]
    ]
    q5 = np.arange(32, dtype=np.float32)[None]
    # d = 31 / 31 = 1, m = 0; qh: value j's fifth bit at bit j of a little-endian uint32
    assert QUANTIZERS["Q5_1"](torch.from_numpy(q5), "llama").tolist() == [
        [0x00, 0x3C, 0x00, 0x00, 0x00, 0x00, 0xFF, 0xFF] + [j | j << 4 for j in range(16)]
    ]
    q8 = np.array([[127.0, 2.5, -3.5, 0.5, -0.5] + [0.0] * 27], dtype=np.float32)
    # d = 1; roundf: halves away from zero (torch.round would give 2, -4, 0, -0)
    assert QUANTIZERS["Q8_0"](torch.from_numpy(q8), "llama").tolist() == [
        [0x00, 0x3C, 0x7F, 0x03, 0xFC, 0x01, 0xFF] + [0] * 27
    ]
    empty = np.full((1, 32), 1e-16, dtype=np.float32)
    # IQ4_NL below GROUP_MAX_EPS: scale 0 and every code the level nearest 0 (index 8)
    assert QUANTIZERS["IQ4_NL"](torch.from_numpy(empty), "llama").tolist() == [[0, 0] + [0x88] * 16]


def test_best_index_is_ggmls():
    """The table lookup equals best_index_int8's binary search and float32 tie test, checked on
    every float32 within 64 ulps of each midpoint and on random values past both ends."""
    values = np.array(gguf_quants._IQ4NL_VALUES, dtype=np.float32)
    mids = (values[1:] + values[:-1]) / 2
    near = mids.view(np.int32)[:, None] + np.arange(-64, 65, dtype=np.int32)[None]
    x = np.concatenate(
        [near.ravel().view(np.float32), np.random.default_rng(0).uniform(-300, 300, 20000).astype(np.float32)]
    )
    # the C, step by step, in float32
    upper = np.clip(np.searchsorted(values, x, side="right"), 1, 15)
    want = np.where((x - values[upper - 1]) < (values[upper] - x), upper - 1, upper)
    want = np.where(x <= values[0], 0, np.where(x >= values[-1], 15, want))
    got = gguf_quants._best_index(gguf_quants._iq4nl_tables(torch.device("cpu")), torch.from_numpy(x))
    np.testing.assert_array_equal(got.numpy(), want)


# ---------------------------------------------------------------------------------------------
# qconv: never worse than llama


@pytest.mark.parametrize("type_name", BLOCKS)
def test_qconv_is_never_worse_than_llama(type_name):
    x = _weights(seed=3)
    weight = torch.from_numpy(x)
    llama = QUANTIZERS[type_name](weight, "llama")
    qconv = QUANTIZERS[type_name](weight, "qconv")
    assert qconv.shape == llama.shape and qconv.dtype == torch.uint8
    err_llama, err_qconv = _block_errors(x, llama, type_name), _block_errors(x, qconv, type_name)
    assert (err_qconv <= err_llama).all()
    # a block keeps llama's bytes unless it is strictly better
    same = (_blocks(qconv.numpy(), type_name) == _blocks(llama.numpy(), type_name)).all(axis=1)
    assert (same | (err_qconv < err_llama)).all()
    assert (
        err_qconv.sum() / (x.astype(np.float64) ** 2).sum()
        <= err_llama.sum() / (x.astype(np.float64) ** 2).sum()
    )


#: per-tensor squared error of qconv / llama on N(0, 0.02) weights must be below this (measured:
#: Q8_0 0.85, Q4_0 0.89, Q4_1 0.79, Q5_0 0.88, Q5_1 0.80, IQ4_NL 0.93)
BETTER_BY = {"Q8_0": 0.9, "Q4_0": 0.93, "Q4_1": 0.85, "Q5_0": 0.92, "Q5_1": 0.85, "IQ4_NL": 0.96}


@pytest.mark.parametrize("type_name", BLOCKS)
def test_qconv_lowers_the_error_of_gaussian_weights(type_name):
    x = (np.random.default_rng(4).standard_normal((64, 512)) * 0.02).astype(np.float32)
    weight = torch.from_numpy(x)
    err_llama = _block_errors(x, QUANTIZERS[type_name](weight, "llama"), type_name)
    err_qconv = _block_errors(x, QUANTIZERS[type_name](weight, "qconv"), type_name)
    assert (err_qconv <= err_llama).all()
    assert err_qconv.sum() / err_llama.sum() < BETTER_BY[type_name]


@pytest.mark.parametrize("type_name", FLOATS)
def test_float_types_ignore_the_solver(type_name):
    weight = torch.from_numpy(_weights())
    assert torch.equal(QUANTIZERS[type_name](weight, "llama"), QUANTIZERS[type_name](weight, "qconv"))


# ---------------------------------------------------------------------------------------------
# shapes, chunks, errors


@pytest.mark.parametrize("type_name", FLOATS + BLOCKS)
@pytest.mark.parametrize("solver", gguf_quants.SOLVERS)
def test_shape_and_size(type_name, solver):
    block, type_size = _sizes(type_name)
    x = np.random.default_rng(5).standard_normal((3, 128)).astype(np.float32)
    data = QUANTIZERS[type_name](torch.from_numpy(x), solver)
    assert data.dtype == torch.uint8 and data.shape == (3, 128 // block * type_size)
    back = _dequantize(data, type_name)
    assert back.shape == (3, 128) and np.abs(back - x).max() < 0.5 * np.abs(x).max()


@pytest.mark.parametrize("type_name", ["BF16", "Q5_1", "IQ4_NL"])
@pytest.mark.parametrize("solver", gguf_quants.SOLVERS)
def test_chunks_do_not_change_the_bytes(monkeypatch, type_name, solver):
    """Rows are processed a few at a time (bounded memory): a chunk of 3 rows gives the same bytes."""
    weight = torch.from_numpy(_weights()[:, :128].copy())
    whole = QUANTIZERS[type_name](weight, solver)
    monkeypatch.setattr(gguf_quants, "_CHUNK_VALUES", 3 * 128)
    monkeypatch.setattr(gguf_quants, "_IQ4NL_BLOCKS", 5)
    assert torch.equal(QUANTIZERS[type_name](weight, solver), whole)


@pytest.mark.parametrize("type_name", ["Q4_0", "IQ4_NL", "Q4_K", "Q6_K"])
@pytest.mark.parametrize("solver", gguf_quants.SOLVERS)
def test_cpu_chunks_on_threads_give_one_threads_bytes(monkeypatch, type_name, solver):
    """On the CPU, chunks run on torch.get_num_threads() Python threads with one torch thread
    each (run_chunks): the same bytes as one thread, and torch's thread count restored after."""
    from qconv.formats.format_gguf import QUANTIZERS as ALL

    weight = torch.from_numpy(np.random.default_rng(9).standard_normal((24, 512)).astype(np.float32))
    monkeypatch.setattr(gguf_quants, "CPU_CHUNK_VALUES", 3 * 512)  # 8 chunks
    monkeypatch.setattr("qconv.formats.gguf_kquants.CPU_CHUNK_VALUES", 3 * 512)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = ALL[type_name](weight, solver)
        torch.set_num_threads(3)
        assert torch.equal(ALL[type_name](weight, solver), alone)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_a_chunks_error_reaches_the_caller_from_a_thread(monkeypatch):
    from qconv.errors import SourceError
    from qconv.formats.format_gguf import QUANTIZERS as ALL

    weight = torch.zeros(24, 512)
    weight[20, 3] = float("nan")  # in the last of 8 chunks
    monkeypatch.setattr("qconv.formats.gguf_kquants.CPU_CHUNK_VALUES", 3 * 512)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with pytest.raises(SourceError, match="NaN or infinite"):
            ALL["Q4_K"](weight, "llama")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("type_name", "weight", "solver", "message"),
    [
        ("Q4_0", torch.zeros(2, 32), "k-quants", "solver 'k-quants' is not one of llama, qconv"),
        ("Q4_0", torch.zeros(2, 48), "llama", "Q4_0: rows of 48 values do not split into blocks of 32"),
        ("Q8_0", torch.zeros(2, 32, dtype=torch.float16), "llama", "Q8_0: expects a float32 [rows, n] weight, got torch.float16 (2, 32)"),
        ("F16", torch.zeros(32), "llama", "F16: expects a float32 [rows, n] weight, got torch.float32 (32,)"),
    ],
)  # fmt: skip
def test_errors(type_name, weight, solver, message):
    with pytest.raises(UsageError) as caught:
        QUANTIZERS[type_name](weight, solver)
    assert str(caught.value) == message


def test_types():
    assert sorted(QUANTIZERS) == sorted(FLOATS + BLOCKS)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("type_name", FLOATS + BLOCKS)
def test_cuda_gives_the_cpus_llama_bytes_and_a_never_worse_qconv(type_name):
    x = _weights(seed=6)
    cpu = torch.from_numpy(x)
    llama = QUANTIZERS[type_name](cpu.cuda(), "llama")
    assert llama.device.type == "cuda"
    assert torch.equal(llama.cpu(), QUANTIZERS[type_name](cpu, "llama"))
    if type_name in BLOCKS:
        qconv = QUANTIZERS[type_name](cpu.cuda(), "qconv")
        assert qconv.device.type == "cuda"
        assert (_block_errors(x, qconv, type_name) <= _block_errors(x, llama, type_name)).all()
