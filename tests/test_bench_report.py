"""bench/report.py renders the benchmark JSON into markdown: small fixture files in a temporary
results folder, exact lines expected, and a missing or broken file never stops the report."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPORT_PY = Path(__file__).resolve().parent.parent / "bench" / "report.py"


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("bench_report", REPORT_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write(folder: Path, name: str, doc: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(doc))
    return path


def load_case(how: str, seconds: float, on_disk: float, read: float, counter: str = "read_bytes") -> dict:
    return {
        "how": how,
        "load_s": seconds,
        "bytes_read": read,
        "bytes_read_counter": counter,
        "folder_bytes": on_disk,
        "peak_rss_bytes": 2.5e9,
        "peak_gpu_bytes": 6.0e9,
        "logits_finite": True,
    }


LOAD = {
    "machine": {"gpu": "NVIDIA H200", "device": "cuda"},
    "source": {"bytes": 16.06e9, "layers": 32, "shapes": "Llama-3-8B"},
    "call": 'AutoModelForCausalLM.from_pretrained(folder, device_map="cuda:0")',
    "schemes": {
        "nf4": {
            "prequantized": load_case("prequantized", 5.3, 5.7e9, 5.7e9),
            "load_quantize": load_case("load_quantize", 12.1, 16.06e9, 16.1e9),
        },
        "int8": {
            "prequantized": load_case("prequantized", 8.6, 8.6e9, 8.6e9, "system_pgpgin_bytes"),
            "load_quantize": {"error": "Traceback ... OutOfMemoryError"},
        },
    },
}


def formats_doc() -> dict:
    def convert(bits: float) -> dict:
        return {"summary": {"bits_per_weight": bits}, "peak_gpu_bytes": 0.6e9, "peak_rss_bytes": 2.8e9}

    return {
        "environment": {"gpu": "NVIDIA H200"},
        "bf16": {"ppl": 21.6136},
        "formats": {
            "nf4": {
                "method": "bnb",
                "options": {"bits": 4, "quant_type": "nf4", "double_quant": True},
                "label": "bnb nf4+dq",
                "convert": convert(4.1469),
                "ppl": {"ppl": 27.758},
                "reference": {"ppl": 27.761},
            },
            "hqq4": {
                "method": "hqq",
                "options": {"bits": 4, "group_size": 64},
                "label": "hqq 4-bit g64",
                "convert": convert(4.5),
                "ppl": {"ppl": 26.612},
                "reference": {"error": "boom"},
            },
            "eetq": {
                "method": "eetq",
                "options": {"arch": "sm80"},
                "label": "eetq int8 sm80",
                "convert": convert(8.0234),
                "ppl": {"ppl": 21.678},
                "reference": {"unavailable": "no EETQ reference"},
            },
        },
        "throughput": {
            "results": {
                "nf4": {"qconv_GBps": 120.0, "reference_GBps": 100.0, "speedup": 1.2},
                "eetq": {"qconv_GBps": 0.5, "reference": None, "reference_unavailable": "none"},
                "hqq4": {"see": "hqq_quantizer_*.json"},
            }
        },
    }


HQQ_QUANTIZER = {
    "environment": {"gpu": "NVIDIA H100 80GB HBM3"},
    "results": [{"bits": 4, "qconv_GBps": 110.6, "hqq_GBps": 2.66, "speedup": 41.6}],
}
AQLM_LAYER = {
    "gpu": "NVIDIA H100 80GB HBM3",
    "layer": {"cases": {"qconv": {"seconds": 1.0}, "reference": {"seconds": 4.45}}},
}
AQLM_SMOLLM2 = {
    "gpu": "NVIDIA H100 80GB HBM3",
    "smollm2": {
        "1x16:noft": {
            "summary": {"bits_per_weight": 18.616},
            "stats": {"peak_gpu_bytes": 0.79e9, "peak_rss_bytes": 3.7e9},
            "ppl": {"ppl": 24.394},
        },
        "2x8:ft": {"error": "RuntimeError: out of time"},
    },
}


def test_load_table_exact(report, tmp_path):
    path = write(tmp_path / "bench" / "results", "load_8b_nvidia-h200.json", LOAD)
    lines = report.load_table(path, "bench/results/load_8b_nvidia-h200.json")
    assert lines[0].startswith("Load time of a pre-quantized qconv artifact")
    assert "([raw JSON](bench/results/load_8b_nvidia-h200.json))" in lines[0]
    assert lines[2:] == [
        "| scheme | path | load time | vs pre-quantized | on disk | bytes read | peak host RSS | "
        "peak GPU memory | logits finite |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
        "| nf4 + double quant | qconv artifact, pre-quantized | 5.3 s | 1.00x | 5.7 GB | 5.7 GB | 2.5 GB | "
        "6.0 GB | yes |",
        "| nf4 + double quant | bf16 source, `BitsAndBytesConfig` at load | 12.1 s | 2.28x | 16.1 GB | 16.1 GB | "
        "2.5 GB | 6.0 GB | yes |",
        "| int8 (LLM.int8) | qconv artifact, pre-quantized | 8.6 s | 1.00x | 8.6 GB | 8.6 GB (pgpgin) | 2.5 GB | "
        "6.0 GB | yes |",
        "| int8 (LLM.int8) | bf16 source, `BitsAndBytesConfig` at load | failed | - | - | - | - | - | - |",
    ]


def test_format_summary_exact(report, tmp_path):
    results = tmp_path / "bench" / "results"
    write(results, "formats_smollm2_nvidia-h200.json", formats_doc())
    write(results, "hqq_quantizer_nvidia-h100-80gb-hbm3.json", HQQ_QUANTIZER)
    write(results, "aqlm_layer_nvidia-h100-80gb-hbm3.json", AQLM_LAYER)
    write(results, "aqlm_smollm2_1x16noft_nvidia-h100-80gb-hbm3.json", AQLM_SMOLLM2)
    write(results, "formats_smollm2_cpu_quick.json", {"formats": {"nf4": {"broken": True}}})  # left out
    rows, bf16 = report.format_rows(results)
    assert bf16 == 21.6136
    lines = report.formats_table(rows, bf16, "", tmp_path)
    assert "perplexity **21.61**" in lines[0]
    formats = "[H200](bench/results/formats_smollm2_nvidia-h200.json)"
    assert lines[2:] == [
        "| format | bits/weight | qconv quantize | reference | speed-up | qconv ppl | reference ppl | "
        "peak GPU | peak RSS | raw JSON |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        f"| bnb nf4+dq | 4.147 | 120.0 GB/s | 100.0 GB/s | **1.2x** | 27.76 | 27.76 | 600 MB | 2.8 GB | {formats} |",
        "| hqq 4-bit g64 | 4.500 | 110.6 GB/s | 2.7 GB/s (`Quantizer`) | **41.6x** | 26.61 | failed | 600 MB | "
        f"2.8 GB | {formats}, [H100 80GB HBM3](bench/results/hqq_quantizer_nvidia-h100-80gb-hbm3.json) |",
        f"| eetq int8 sm80 | 8.023 | 0.50 GB/s | n/a | - | 21.68 | n/a | 600 MB | 2.8 GB | {formats} |",
        "| aqlm 1x16 (no fine-tuning) | 18.616 | 1.00 s a layer | 4.45 s (`AQEngine`) | **4.5x** | 24.39 | - | "
        "790 MB | 3.7 GB | [H100 80GB HBM3](bench/results/aqlm_smollm2_1x16noft_nvidia-h100-80gb-hbm3.json), "
        "[H100 80GB HBM3](bench/results/aqlm_layer_nvidia-h100-80gb-hbm3.json) |",
    ]


def test_hqq_rows_fall_back_to_the_hqq_perplexity_run(report, tmp_path):
    results = tmp_path / "bench" / "results"
    rows = [
        {"model": "bf16", "ppl": 21.61},
        {"model": "qconv hqq 3-bit g64 (solver qconv)", "bits": 3, "ppl": 186.27},
        {"model": "hqq AutoHQQHFModel 3-bit g64 (compute bfloat16)", "bits": 3, "ppl": 178.71},
        {"model": "qconv hqq 2-bit g64 (solver qconv)", "bits": 2, "ppl": 540712.9},
    ]
    write(
        results,
        "hqq_smollm2_nvidia-h100-80gb-hbm3.json",
        {"environment": {"gpu": "NVIDIA H100"}, "rows": rows},
    )
    found, bf16 = report.format_rows(results)
    lines = report.formats_table(found, bf16, "../", tmp_path)
    link = "[H100](../bench/results/hqq_smollm2_nvidia-h100-80gb-hbm3.json)"
    assert lines[4:] == [
        f"| hqq 3-bit g64 | - | - | - | - | 186.27 | 178.71 | - | - | {link} |",
        f"| hqq 2-bit g64 | - | - | - | - | 540,713 | - | - | - | {link} |",
    ]


def test_missing_results_render_nothing_and_do_not_crash(report, tmp_path):
    docs = tmp_path / "docs"
    text = report.write_report(tmp_path / "bench" / "results", docs, None, tmp_path)
    assert (
        text
        == "# Benchmarks\n\nProduced by `make bench` on the GPU machine; rendered by `python bench/report.py`.\n"
    )
    assert (docs / "bench.md").read_text() == text
    assert not (docs / "bench.png").exists()


def test_broken_and_partial_files_leave_a_note(report, tmp_path, capsys):
    results = tmp_path / "bench" / "results"
    write(results, "load_8b_nvidia-h200.json", {"machine": {}})  # cut off before it had a source
    (results / "formats_smollm2_nvidia-h200.json").write_text("{not json")
    write(results, "eetq_smollm2_nvidia-h100.json", {"rows": [{"model": "bf16", "ppl": 21.6}]})
    lines = report.tables(results, "", tmp_path)
    assert "_load_8b_nvidia-h200.json: not rendered (KeyError: 'source')_" in lines
    assert any(line.startswith("_eetq_smollm2_nvidia-h100.json: not rendered") for line in lines)
    assert "formats_smollm2_nvidia-h200.json skipped" in capsys.readouterr().err


def test_readme_block_is_replaced_and_the_rest_kept(report, tmp_path):
    results = tmp_path / "bench" / "results"
    write(results, "load_8b_nvidia-h200.json", LOAD)
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{report.START}\nold table\n{report.END}\nafter\n")
    report.write_report(results, tmp_path / "docs", readme, tmp_path)
    content = readme.read_text()
    assert content.startswith(f"before\n{report.START}\nLoad time of a pre-quantized")
    assert "old table" not in content
    assert content.endswith(f"{report.END}\nafter\n")
    assert "([raw JSON](bench/results/load_8b_nvidia-h200.json))" in content
    assert (
        "([raw JSON](../bench/results/load_8b_nvidia-h200.json))"
        in (tmp_path / "docs" / "bench.md").read_text()
    )


def block8b_case(scale: float, rounds: list[int], epochs: int | None, bounded: bool = False) -> dict:
    phases = {
        "load_block_s": 0.4,
        "source_forward_s": 1.5,
        "xtx_s": 2.25,
        "init_s": 10.0 * scale,
        "beam_search_s": 30.0 * scale,
        "adam_s": 20.0 * scale,
        "layer_other_s": 1.0,
        "finetune_s": 45.0 if epochs else 0.0,
        "store_s": 0.5,
        "next_inputs_s": 1.5,
        "other_s": 0.1,
    }
    total = sum(phases.values())
    case = {
        "calibration": {"sequences": 64, "seqlen": 2048, "tokens": 131072},
        "phases": phases,
        "block_total_s": total,
        "one_off_s": 12.0,
        "layers": {
            f"model.layers.0.{n}": {"rounds": r, "capped": bounded}
            for n, r in zip("qkv", rounds, strict=True)
        },
        "extrapolation": {"seconds": 32 * total + 12.0, "within_goal": 32 * total + 12.0 <= 3600},
    }
    if epochs:
        case["finetune"] = {
            "epochs_run": epochs,
            "capped": epochs == 10,
            "rel_error_before": 0.2,
            "rel_error": 0.1875,
        }
    if bounded:
        case["extrapolation"].update(bounded=True, note="a lower bound: the run was bounded by max_epochs=2")
    return case


BLOCK8B = {
    "block8b": {
        "environment": {"gpu": "NVIDIA H100 80GB HBM3"},
        "device": "cuda:0",
        "block": {
            "shapes": {
                "hidden_size": 4096,
                "intermediate_size": 14336,
                "num_attention_heads": 32,
                "num_key_value_heads": 8,
                "vocab_size": 128256,
            }
        },
        "cases": {
            "1x16:ft": block8b_case(1.0, [3, 5, 4], 10),
            "2x8:noft": block8b_case(2.0, [2, 2, 2], None, bounded=True),
            "2x8:ft": {"skipped": "500 s elapsed, over --budget-s 480"},
            "1x16:noft": {"partial": True, "layers_done": []},
        },
    }
}


def test_aqlm_block8b_table_exact(report, tmp_path):
    name = "aqlm_block8b_nvidia-h100-80gb-hbm3.json"
    path = write(tmp_path / "bench" / "results", name, BLOCK8B)
    lines = report.aqlm_block8b_table(path, f"bench/results/{name}")
    assert lines[0].startswith("AQLM on one Llama-3-8B-shaped decoder block (issue 19): hidden 4096, ")
    assert "on 64 sequences of 2048 tokens" in lines[0]
    assert f"NVIDIA H100 80GB HBM3, one run ([raw JSON](bench/results/{name}))" in lines[0]
    assert lines[1:] == [
        "",
        "| phase | 1x16 fine-tuned | 2x8 no fine-tuning | 2x8 fine-tuned | 1x16 no fine-tuning |",
        "|---|---:|---:|---:|---:|",
        "| X^T X accumulation | 2.2 s | 2.2 s | skipped | cut off |",
        "| init (k-means) | 10.0 s | 20.0 s | skipped | cut off |",
        "| beam search | 30.0 s | 60.0 s | skipped | cut off |",
        "| Adam | 20.0 s | 40.0 s | skipped | cut off |",
        "| block fine-tune | 45.0 s | 0.0 s | skipped | cut off |",
        "| rest (block read, forwards, losses, checkpoint) | 5.0 s | 5.0 s | skipped | cut off |",
        "| **block total** | **112.2 s** | **127.2 s** | skipped | cut off |",
        "| layer rounds (min-max) | 3-5 | 2-2 (capped) | skipped | cut off |",
        "| fine-tune epochs | 10 (capped) | - | skipped | cut off |",
        "| **32 blocks (8B model)** | **60 min** (over 1 h) | **>= 68 min** (over 1 h) | skipped | cut off |",
        "",
        "_a lower bound: the run was bounded by max_epochs=2._",
        "_1x16 fine-tuned: block fine-tune 40%, beam search 27%, Adam 18%, init (k-means) 9% of the block; "
        "the goal leaves 112 s a block; block fine-tuning ran 10 epochs (its cap) and moved the block's relative "
        "output error from 0.200 to 0.188._",
        "_2x8 no fine-tuning: beam search 47%, Adam 31%, init (k-means) 16%, rest (block read, forwards, "
        "losses, checkpoint) 4% of the block; the goal leaves 112 s a block._",
    ]
    assert any(line.startswith("AQLM on one Llama-3-8B") for line in report.tables(path.parent, "", tmp_path))


def reference_case(status: str, **fields) -> dict:
    settings = {
        "beam_size": 8,
        "max_epochs": 1000,
        "relative_mse_tolerance": 0.01,
        "init_max_iter": 100,
        "finetune_max_epochs": 10,
        "finetune_lr": 1e-5,
        "finetune_batch_size": 32,
    }
    return {"status": status, "settings": settings, "val_size": 8, **fields}


AQLM_REFERENCE = {
    "gpu": "NVIDIA H100 80GB HBM3",
    "calibration": {"sequences": 64, "seqlen": 2048},
    "eval": {"text": "wikitext2-test.txt", "window": 2048, "max_windows": None},
    "cases": {
        "2x8:ft": reference_case(
            "done",
            ppl={"float32": {"ppl": 48.123, "windows": 148}, "float16": {"ppl": 48.2, "windows": 148}},
            avg_bits_per_parameter=2.0432,
            seconds={"quantize_s": 412.4, "finetune_s": 95.6},
        ),
        "1x16:ft": reference_case(
            "partial", blocks_done=12, layers_kmeans_filled=48, seconds={"first_inputs_s": 2.0}
        ),
        "1x16:noft": {"status": "error", "error": "RuntimeError: shape '[1, 65536, 1, 8]' is invalid"},
        "source": {"status": "done", "ppl": {"float32": {"ppl": 21.6, "windows": 148}}},
    },
}


def test_aqlm_reference_table_exact(report, tmp_path):
    results = tmp_path / "bench" / "results"
    name = "aqlm_reference_smollm2_nvidia-h100-80gb-hbm3.json"
    path = write(results, name, AQLM_REFERENCE)
    # qconv's own conversion of 2x8:ft, read from the same folder
    write(
        results,
        "aqlm_smollm2_2x8ft_nvidia-h100-80gb-hbm3.json",
        {"gpu": "NVIDIA H100 80GB HBM3", "smollm2": {"2x8:ft": {"ppl": {"ppl": 57.58282}}}},
    )
    lines = report.aqlm_reference_table(path, f"bench/results/{name}")
    assert lines[0].startswith("AQLM's quality anchor (issue 19): SmolLM2-135M-Instruct quantized by the ")
    assert "(64 sequences of 2048 tokens of WikiText-2 validation)" in lines[0]
    assert "(148 windows of 2048)" in lines[0]
    assert f"H100 80GB HBM3 ([raw JSON](bench/results/{name}))" in lines[0]
    settings = "beam 8, 1000 epochs max, tolerance 0.01, k-means 100 iters; fine-tune lr 1e-05, batch 32, 10 epochs, 8 held out"
    assert lines[1:] == [
        "",
        "| case | reference ppl (fp16) | reference ppl (fp32) | qconv ppl (fp16) | bits/weight (estimate_nbits_per_parameter) | "
        "reference time (quantize + fine-tune) | settings |",
        "|---|---:|---:|---:|---:|---:|---|",
        f"| aqlm 2x8 (fine-tuned) | 48.20 | 48.12 | 57.58 (H100 80GB HBM3) | 2.04 | 412 s + 96 s | {settings} |",
        f"| aqlm 1x16 (fine-tuned) | cut off after 12 blocks (resumable) | - | - | - | - | {settings}; "
        "48 layers k-means-filled |",
        "| aqlm 1x16 (no fine-tuning) | failed | - | - | - | - | - |",
        "| unquantized source | - | 21.60 | - | - | - | - |",
        "",
        "_1x16:noft failed: RuntimeError: shape '[1, 65536, 1, 8]' is invalid._",
        "_k-means-filled: layers with fewer input groups than codewords (1x16 on SmolLM2's attention "
        "projections), which the reference cannot initialise; each group became its own codeword, as "
        "qconv does there._",
    ]
    # rendered among the other tables, never in the format summary (its rows are qconv's)
    page = report.tables(results, "", tmp_path)
    assert any(line.startswith("AQLM's quality anchor") for line in page)
    assert not any("aqlm_reference" in line for line in page if line.startswith("| aqlm"))


def bench_module(name: str):
    """A bench/ script as a module (they import each other from bench/)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPORT_PY.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def calibrated_case(label: str, ppl: float | None, bits: float = 4.25, **fields) -> dict:
    case = {"recipe": {"label": label}, "bits_per_weight": bits, "prepare_s": 600.4, **fields}
    if ppl is not None:
        case["perplexity"] = ppl
    return case


def test_calibrated_table_exact(report, tmp_path):
    """run_calibrated.py's JSON: the max-windows shape, rendered as before."""
    doc = {
        "device": "cpu (x86_64, 2 cores)",
        "threads": "1",
        "protocol": "qconv eval --max-windows 8: the first 8 windows",
        "calibration_settings": {"text": "wikitext2", "calib_tokens": 8192, "seqlen": 2048},
        "cases": {
            "hqq4-gptq": calibrated_case(
                "hqq 4-bit g64 gptq", 20.834, 4.501, calibrate_s_per_layer_mean=2.546
            ),
            "hqq4-data-free": calibrated_case("hqq 4-bit g64", 23.787, 4.501),
            "ct-W4A16-gptq": calibrated_case("ct gptq", 23.626, calibrate_s_per_layer_mean=1.481),
            "ct-W4A16-rtn": calibrated_case("compressed-tensors W4A16 g64", 26.81),
        },
    }
    bench_module("run_calibrated").summarize(doc)
    name = "calibrated_smollm2_cpu.json"
    lines = report.calibrated_table(write(tmp_path, name, doc), f"bench/results/{name}")
    assert lines == [
        "Calibrated uniform quantization (issue 17), SmolLM2-135M-Instruct, cpu (x86_64, 2 cores), 1 torch "
        f"thread(s) ([raw JSON](bench/results/{name})): qconv eval --max-windows 8: the first 8 windows. "
        "Calibration: wikitext2, 8,192 tokens in sequences of 2048. Calibration time: the whole calibration "
        "stage, and its mean per quantized layer (the GPTQ solve alone).",
        "",
        "| format | bits/weight | data-free perplexity | calibrated perplexity | calibration | per layer |",
        "|---|---:|---:|---:|---:|---:|",
        "| hqq 4-bit g64 | 4.501 | 23.79 | **20.83** | 600 s | 2.55 s |",
        "| compressed-tensors W4A16 g64 (rtn = llm-compressor's) | 4.250 | 26.81 | **23.63** | 600 s | 1.48 s |",
    ]


def test_calibrated_table_names_rows_made_before_the_token_weights(report, tmp_path):
    """A calibrated case whose recipe's GPTQ settings lack ``token_weights`` was made with plain
    XᵀX: a note under the table names it; a case with them, or without GPTQ settings, is not named."""
    before = {"damp": 0.01, "block": 128}
    doc = {
        "device": "cpu (x86_64, 2 cores)",
        "protocol": "qconv eval --max-windows 8: the first 8 windows",
        "calibration_settings": {"text": "wikitext2", "calib_tokens": 8192, "seqlen": 2048},
        "cases": {
            "hqq4-gptq": calibrated_case("hqq 4-bit g64 gptq", 20.8, 4.501, calibrate_s_per_layer_mean=2.5),
            "hqq2-gptq": calibrated_case("hqq 2-bit g64 gptq", 106.1, 2.5, calibrate_s_per_layer_mean=2.5),
            "ct-W4A16-rtn": calibrated_case("compressed-tensors W4A16 g64", 26.81),
        },
    }
    doc["cases"]["hqq4-gptq"]["recipe"]["gptq"] = before
    doc["cases"]["hqq2-gptq"]["recipe"]["gptq"] = {**before, "token_weights": "1 + attention received"}
    bench_module("run_calibrated").summarize(doc)
    name = "calibrated_smollm2_cpu.json"
    lines = report.calibrated_table(write(tmp_path, name, doc), f"bench/results/{name}")
    assert lines[-2:] == [
        "",
        "_hqq4-gptq: calibrated with plain XᵀX, before the attention's token weights "
        "(formats/token_weights.py, 2026-12-06); not run again here since._",
    ]


def test_calibrated_table_full_protocol_with_the_llmcompressor_reference(report, tmp_path):
    """The full-protocol run: calibrated cases without their data-free run, one failed, and
    llm-compressor's GPTQ (run_llmcompressor_gptq.py, merged in) under its format."""
    reference = calibrated_case(
        "unused",
        24.1,
        tool="llmcompressor",
        versions={"llmcompressor": "0.14.0.1"},
        calibration={"tokens": 4096},
        gptq={"dampening_frac": 0.01, "block_size": 128, "actorder": "static", "offload_hessians": None},
        calibrate_s_per_layer_mean=0.25,
    )
    doc = {
        "device": "cpu (x86_64, 2 cores)",
        "threads": "1",
        "protocol": "qconv eval (its default, the full protocol): every window",
        "max_windows": None,
        "calibration_settings": {"text": "wikitext2", "calib_tokens": 4096, "seqlen": 2048},
        "source_eval": {"eval": {"metrics": {"ppl": 19.132}, "protocol": {"dtype": "bfloat16"}}},
        "cases": {
            "ct-W4A16-gptq": calibrated_case(
                "compressed-tensors W4A16 g64 gptq", 26.5, calibrate_s_per_layer_mean=1.5
            ),
            "hqq2-gptq": {"error": "qconv convert failed (1): killed"},
            "ct-W4A16-llmcompressor-gptq": reference,
            "hqq3-gptq": calibrated_case(
                "hqq 3-bit g64 gptq", None, 3.703, cut_off={"step": "eval", "why": "the deadline came"}
            ),
            "ct-W4A16-llmcompressor-gptq-actorder-none": {
                **reference,
                "perplexity": 23.9,
                "gptq": {**reference["gptq"], "actorder": None},
            },
        },
    }
    bench_module("run_calibrated").summarize(doc)
    assert [r["case"] for r in doc["summary"]["ct-W4A16"]["references"]] == [
        "ct-W4A16-llmcompressor-gptq",
        "ct-W4A16-llmcompressor-gptq-actorder-none",
    ]
    assert "ct-W4A16-llmcompressor" not in doc["summary"]
    name = "calibrated_smollm2_full_cpu.json"
    lines = report.calibrated_table(write(tmp_path, name, doc), f"bench/results/{name}")
    assert "every window. Calibration: wikitext2, 4,096 tokens in sequences of 2048." in lines[0]
    assert lines[1:] == [
        "",
        "| format | bits/weight | data-free perplexity | calibrated perplexity | calibration | per layer |",
        "|---|---:|---:|---:|---:|---:|",
        "| compressed-tensors W4A16 g64 gptq | 4.250 | not run | **26.50** | 600 s | 1.50 s |",
        "| llmcompressor 0.14.0.1 GPTQ (actorder static), same format | - | - | 24.10 | 600 s | 0.25 s |",
        "| llmcompressor 0.14.0.1 GPTQ (actorder None), same format | - | - | 23.90 | 600 s | 0.25 s |",
        "| hqq2 | - | not run | **failed** | - | - |",
        "| hqq 3-bit g64 gptq | 3.703 | not run | **cut off** | 600 s | - |",
        "| unquantized source (bfloat16) | 16 | - | 19.13 | - | - |",
        "",
        "_llmcompressor 0.14.0.1: GPTQModifier (oneshot) calibrated on the same 4,096 token ids, "
        "dampening_frac 0.01, block_size 128; per layer: its logged solve time over the "
        "modules solved together._",
        "_cut off: the deadline came._",
    ]


def test_llmcompressor_log_gives_each_module_its_share_of_the_batch(tmp_path):
    log = "\n".join(
        [
            "2026-12-06 | compress_module_list | INFO - Quantizing 2 module(s): ['model.layers.0.q', 'model.layers.0.k']",
            "2026-12-06 | GPTQ | METRIC - time 3.00s",
            "2026-12-06 | GPTQ | METRIC - error 0.12",
            "2026-12-06 | GPTQ | METRIC - time 3.00s",
            "2026-12-06 | compress_module_list | INFO - Quantizing 1 module(s): ['model.layers.0.o']",
            "2026-12-06 | GPTQ | METRIC - time 0.50s",
        ]
    )
    times, batches = bench_module("run_llmcompressor_gptq").per_layer_times(log)
    assert times == {"model.layers.0.q": 1.5, "model.layers.0.k": 1.5, "model.layers.0.o": 0.5}
    assert [b["seconds"] for b in batches] == [3.0, 0.5]


def gptq_case(seconds: float, error: float) -> dict:
    return {"solve_s": seconds, "solve_s_all": [seconds], "rel_output_error": error}


GPTQ_LAYER = {
    "device": "nvidia-h100-80gb-hbm3",
    "environment": {"gpu": "NVIDIA H100 80GB HBM3"},
    "llmcompressor": {"llmcompressor": "0.14.0.1", "compressed-tensors": "0.19.0"},
    "repeats": 3,
    "calibration_input": {"tokens": 16384},
    "settings": {
        "qconv-ct-w4a16-g128": {},
        "llmcompressor-actorder-static": {"backend": "triton (fused block update)"},
        "llmcompressor-actorder-none": {},
    },
    "results": {
        "4096x4096": {
            "layers": ["q_proj", "o_proj"],
            "cases": {
                "qconv-ct-w4a16-g128": gptq_case(0.5, 0.01234),
                "llmcompressor-actorder-static": gptq_case(0.25, 0.02),
                "llmcompressor-actorder-none": gptq_case(0.2, 0.03),
            },
        },
        "1024x4096": {
            "layers": ["k_proj", "v_proj"],
            "cases": {"qconv-ct-w4a16-g128": gptq_case(0.3, 0.011)},
        },
    },
    "estimate_8b": {
        "cases": {
            "qconv-ct-w4a16-g128": {"block_s": 1.6, "model_s": 51.2},
            "llmcompressor-actorder-static": {"block_s": 0.5, "model_s": 16.0},
        }
    },
}


def test_gptq_layer_table_exact(report, tmp_path):
    name = "gptq_layer_nvidia-h100-80gb-hbm3.json"
    path = write(tmp_path / "bench" / "results", name, GPTQ_LAYER)
    write(tmp_path / "bench" / "results", "gptq_layer_cpu_quick.json", GPTQ_LAYER)
    lines = report.gptq_layer_table(path, f"bench/results/{name}")
    assert lines[0].startswith("GPTQ solve per Linear shape of a Llama-3-8B block (issues 17, 19): ")
    assert "H = X^T X of 16384 made-up activation rows" in lines[0]
    assert (
        f"NVIDIA H100 80GB HBM3, median of 3 timed runs after a warm-up ([raw JSON](bench/results/{name}))"
        in lines[0]
    )
    assert (
        "llm-compressor 0.14.0.1 (compressed-tensors 0.19.0): its own `quantize_weight`, triton" in lines[0]
    )
    assert lines[1:] == [
        "",
        "| shape (layers) | qconv CT W4A16 g128 | llm-compressor W4A16 (actorder static) | "
        "llm-compressor W4A16 (actorder none) | time, qconv CT / llm-compressor static |",
        "|---|---:|---:|---:|---:|",
        "| 4096x4096 (q_proj, o_proj) | 0.500 s (0.0123) | 0.250 s (0.0200) | 0.200 s (0.0300) | 2.00x |",
        "| 1024x4096 (k_proj, v_proj) | 0.300 s (0.0110) | - | - | - |",
        "| **32 blocks (8B), solve only** | **51 s** | **16 s** | - | 3.20x |",
        "",
        "_32 x the block's seven Linears; excludes X^T X accumulation, block forwards, reading and writing "
        "the model, and llm-compressor's batching of same-shape modules._",
    ]
    rendered = report.tables(path.parent, "", tmp_path)
    assert sum(line.startswith("GPTQ solve per Linear shape") for line in rendered) == 1  # quick left out


def test_gptq_layer_quick_run_of_qconv_cases_renders(tmp_path, monkeypatch, report):
    """run_gptq_layer.py --quick with qconv's cases (llm-compressor is another venv's): the formats'
    gptq_layer as the pipeline calls it, a JSON per case and an estimate the report renders."""
    module = bench_module("run_gptq_layer")
    cases = "qconv-ct-w4a16-g128,qconv-hqq-4bit-g64"
    argv = ["run_gptq_layer.py", "--quick", "--out", str(tmp_path), "--tokens", "256", "--cases", cases]
    monkeypatch.setattr("sys.argv", argv)
    module.main()
    doc = json.loads((tmp_path / "gptq_layer_cpu_quick.json").read_text())
    assert list(doc["results"]) == ["256x256", "64x256", "896x256", "256x896"]
    assert doc["llmcompressor"] is None
    for entry in doc["results"].values():
        for case in cases.split(","):
            assert 0 < entry["cases"][case]["rel_output_error"] < 0.05
    assert set(doc["estimate_8b"]["cases"]) == set(cases.split(","))
    assert doc["settings"]["qconv-ct-w4a16-g128"]["group_size"] == 128
    assert doc["settings"]["qconv-hqq-4bit-g64"]["solver"] == "gptq"
    lines = report.gptq_layer_table(tmp_path / "gptq_layer_cpu_quick.json", "x.json")
    assert lines[-3].startswith("| **32 blocks (8B), solve only** | **")


FINGERPRINT = {"text": "wikitext2-validation", "sha256": "f0", "sequences": 4, "seqlen": 2048, "tokens": 8192}


def gguf_calibrated_doc() -> dict:
    """run_gguf_calibrated.py's shape: one calibrated case per type, the data-free rows copied."""

    def case(ppl: float) -> dict:
        return {
            "calibration": {**FINGERPRINT, "solver": "gptq", "blocks": {}},
            "prepare_s": 1010.4,
            "calibrated_layers": 210,
            "output_error_ratio_vs_data_free": {"median": 0.281, "worst": 0.94, "layers_below": 210},
            "perplexity": ppl,
        }

    return {
        "calibration_settings": {"text": "wikitext2", "calib_tokens": 8192},
        "data_free": {
            "from": "bench/results/gguf_smollm2_cpu.json",
            "max_windows": 4,
            "bf16_ppl": 24.142,
            "Q4_K_M": {"qconv_qconv": {"ppl": 25.396}, "llama_cpp": {"ppl": 25.737}},
            "Q2_K": {"qconv_qconv": {"ppl": 33.163}, "llama_cpp": {"ppl": 34.341}},
        },
        "cases": {"Q4_K_M": case(25.183), "Q2_K": case(33.485), "Q3_K_M": {"error": "killed"}},
    }


def gguf_imatrix_doc(fingerprint: dict, identical: bool = True) -> dict:
    """run_gguf_imatrix.py's shape."""
    return {
        "max_windows": 4,
        "environment": {"llama-cpp-python": "0.3.36"},
        "calibration_text": {
            "qconv_fingerprint": fingerprint,
            "tokens_identical": identical,
            "first_mismatch": 7,
        },
        "imatrix": {"file": {"chunk_count": 4, "chunk_size": 2048}, "process": {"wall_s": 199.5}},
        "cases": {"Q4_K_M": {"perplexity": 25.301}, "Q2_K": {"error": "ppl: exit 1"}},
    }


GGUF_CALIBRATED_HEAD = [
    "Calibrated GGUF (issue 17), `bench/run_gguf_calibrated.py` and `bench/run_gguf_imatrix.py`. "
    "SmolLM2-135M-Instruct, wikitext-2 test perplexity by llama.cpp over the first 4 windows of 2048 tokens "
    "(BF16 file: 24.14); calibration 8,192 tokens of the shipped WikiText-2 validation text ([raw JSON]"
    "(../bench/results/gguf_calibrated_smollm2_cpu.json), data-free rows from "
    "[bench/results/gguf_smollm2_cpu.json](../bench/results/gguf_smollm2_cpu.json)):",
    "",
    "| type | calibrated qconv (GPTQ) | data-free qconv | llama.cpp (no imatrix) | llama.cpp + imatrix (same "
    "calibration tokens) | layers' output error, calibrated / data-free (median, worst) | calibration wall s "
    "(2-core CPU) |",
    "|---|---|---|---|---|---|---|",
]


def render_gguf_calibrated(report, folder: Path, imatrix: dict | None) -> list[str]:
    path = write(folder, "gguf_calibrated_smollm2_cpu.json", gguf_calibrated_doc())
    if imatrix is not None:
        write(folder, "gguf_imatrix_smollm2_cpu.json", imatrix)
    return report.gguf_calibrated_table(path, "../bench/results/gguf_calibrated_smollm2_cpu.json")


def test_gguf_calibrated_table_with_the_imatrix_column(report, tmp_path):
    """llama.cpp + imatrix joined by type from the sibling JSON; a failed type says so, a type it
    lacks shows '-', a calibrated case without perplexity has no row."""
    assert render_gguf_calibrated(report, tmp_path, gguf_imatrix_doc(FINGERPRINT)) == [
        *GGUF_CALIBRATED_HEAD,
        "| Q4_K_M | 25.18 | 25.40 | 25.74 | 25.30 | 0.28, 0.94 (210 of 210 layers below) | 1010 |",
        "| Q2_K | 33.48 | 33.16 | 34.34 | failed | 0.28, 0.94 (210 of 210 layers below) | 1010 |",
        "",
        "_llama.cpp + imatrix: `llama-imatrix` (llama.cpp built from the sources llama-cpp-python 0.3.36 "
        "vendors) on the BF16 file over 4 chunks of 2048 tokens, qconv's calibration sequences (the same "
        "token ids, in order); one imatrix for every type, 200 s wall on the same shared CPU, then "
        "`llama-quantize --imatrix` ([raw JSON](../bench/results/"
        "gguf_imatrix_smollm2_cpu.json))._",
    ]


def test_gguf_calibrated_table_says_when_the_imatrix_tokens_differ(report, tmp_path):
    lines = render_gguf_calibrated(report, tmp_path, gguf_imatrix_doc(FINGERPRINT, identical=False))
    assert "qconv's calibration sequences (NOT the same token ids: first difference at token 7)" in lines[-1]


def test_gguf_calibrated_table_leaves_out_an_imatrix_of_another_calibration(report, tmp_path):
    other = gguf_imatrix_doc({**FINGERPRINT, "tokens": 4096, "sequences": 2})
    assert render_gguf_calibrated(report, tmp_path, other) == [
        *GGUF_CALIBRATED_HEAD,
        "| Q4_K_M | 25.18 | 25.40 | 25.74 | - | 0.28, 0.94 (210 of 210 layers below) | 1010 |",
        "| Q2_K | 33.48 | 33.16 | 34.34 | - | 0.28, 0.94 (210 of 210 layers below) | 1010 |",
        "",
        "_llama.cpp + imatrix left out: [its run](../bench/results/gguf_imatrix_smollm2_cpu.json) used "
        "another calibration or protocol._",
    ]


def test_gguf_calibrated_table_without_an_imatrix_run(report, tmp_path):
    assert render_gguf_calibrated(report, tmp_path, None) == [
        *GGUF_CALIBRATED_HEAD,
        "| Q4_K_M | 25.18 | 25.40 | 25.74 | - | 0.28, 0.94 (210 of 210 layers below) | 1010 |",
        "| Q2_K | 33.48 | 33.16 | 34.34 | - | 0.28, 0.94 (210 of 210 layers below) | 1010 |",
    ]


def test_gguf_full_table_shows_only_types_with_both_columns(report, tmp_path):
    """run_gguf_full.py's JSON: a type gets a row once both files have their full-protocol
    perplexity; the window counts of both evaluations are shown."""
    doc = {
        "protocol": "wikitext-2 test perplexity by llama.cpp over every non-overlapping window of 2048 tokens",
        "imatrix_run": "bench/results/gguf_imatrix_smollm2_cpu.json",
        "cases": {
            "Q2_K": {
                "calibrated": {"perplexity": 21.234, "eval": {"protocol": {"windows": 148}}},
                "llama_imatrix": {"perplexity": 22.5, "eval": {"windows": 148}},
            },
            "Q3_K_M": {"calibrated": {"perplexity": 20.0, "eval": {"protocol": {"windows": 148}}}},
        },
    }
    path = write(tmp_path, "gguf_calibrated_full_smollm2_cpu.json", doc)
    assert report.gguf_full_table(path, "../bench/results/gguf_calibrated_full_smollm2_cpu.json") == [
        "Calibrated GGUF against llama.cpp + imatrix under the full protocol, `bench/run_gguf_full.py`: "
        "wikitext-2 test perplexity by llama.cpp over every non-overlapping window of 2048 tokens, the same "
        "files' makers as the table above (calibrated qconv converted again, llama.cpp's file from [its run]"
        "(../bench/results/gguf_imatrix_smollm2_cpu.json)) ([raw JSON](../bench/results/"
        "gguf_calibrated_full_smollm2_cpu.json)):",
        "",
        "| type | calibrated qconv (GPTQ) | llama.cpp + imatrix | windows |",
        "|---|---|---|---|",
        "| Q2_K | 21.23 | 22.50 | 148 |",
    ]


def ct_case(scheme: str, solver: str, ppl: float, errors: list[float], version: int | None = None) -> dict:
    """One run_ct.py case: two layers' relative errors, 8 windows."""
    return {
        "scheme": scheme,
        "solver": solver,
        "solver_version": version,
        "perplexity": ppl,
        "mean_rel_error": sum(errors) / len(errors),
        "bits_per_weight": 4.25,
        "quantize_s": 70.4,
        "layers": {f"l{i}": {"rel_error": e} for i, e in enumerate(errors)},
        "eval": {"protocol": {"windows": 8}},
    }


def test_ct_smollm2_table_names_the_solver_version(report, tmp_path):
    """run_ct.py's JSON: hqq rows say which ct_solver version made them; rows of an earlier
    version, kept under "superseded", are named below the table, not in it."""
    doc = {
        "cases": [
            ct_case("W4A16", "rtn", 26.8304, [0.1, 0.12]),
            ct_case("W4A16", "hqq", 25.791, [0.097, 0.117], version=2),
        ],
        "comparison": {
            "W4A16": {"all_layers_hqq_le_rtn": True, "mean_ratio": 0.9721, "worst_ratio": 0.975, "layers": 2}
        },
        "superseded": [ct_case("W4A16", "hqq", 27.0544, [0.094, 0.113], version=1)],
    }
    name = "ct_smollm2_cpu.json"
    lines = report.ct_smollm2_table(write(tmp_path, name, doc), f"bench/results/{name}")
    assert lines[2:] == [
        "| scheme | solver | perplexity | mean layer error | hqq/rtn error (mean, worst layer) | bits/weight "
        "| quantize |",
        "|---|---|---:|---:|---:|---:|---:|",
        "| W4A16 | rtn (= llm-compressor) | 26.83 | 0.1100 | - | 4.25 | 70 s |",
        "| W4A16 | hqq v2 | 25.79 | 0.1070 | 0.972, 0.975 (all layers <=) | 4.25 | 70 s |",
        "",
        "Superseded (an earlier solver version, kept in the JSON): W4A16 hqq v1 27.05.",
    ]
