"""Render bench/results/*.json as the markdown tables quoted in README (docs/bench.md), and the
plot docs/bench.png (perplexity against bits per weight; needs matplotlib, the ``bench`` extra).

python bench/report.py            # writes docs/bench.md, docs/bench.png, README's block; prints the page
python bench/report.py --results DIR --docs DIR --readme none --root DIR   # elsewhere (tests)

A missing JSON only leaves its table out; one that cannot be rendered leaves a note in its place.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def gb(n: float) -> str:
    """Bytes for a table: GB, or MB below 1 GB (a 135M model's conversion peaks at tens of MB)."""
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def convert_table(path: Path, rel: str) -> list[str]:
    r = json.loads(path.read_text())
    runs = [r[k] for k in ("qconv", "qconv_again") if "total_s" in r.get(k, {})]
    best = min(runs, key=lambda x: x["total_s"])
    each = ", ".join(f"{x['total_s']:.1f} s" for x in runs)
    rw, hf = r["read_write"], r["transformers"]
    lines = [
        f"End-to-end nf4 + double quant conversion of a synthetic Llama-3-8B-shaped bf16 checkpoint "
        f"({gb(r['source']['bytes'])} in safetensors shards), {r['machine']['gpu']}, cold page cache for every "
        f"row, each in its own process, every row ending with `os.sync()` ([raw JSON]({rel})):",
        "",
        "| path | time | vs read+write | peak host RSS | peak GPU memory |",
        "|---|---:|---:|---:|---:|",
        f"| read every source tensor to the GPU, then write the artifact's {gb(rw['bytes_written'])} | "
        f"{rw['read_s']:.1f} s + {rw['write_s']:.1f} s = {rw['read_plus_write_s']:.1f} s | 1.00x | - | - |",
        f"| transformers: quantize at load time, then `save_pretrained` | {hf['load_quantize_s']:.1f} s + "
        f"{hf['save_s']:.1f} s = {hf['total_s']:.1f} s | {hf['total_s'] / rw['read_plus_write_s']:.2f}x | "
        f"{gb(hf['peak_rss_bytes'])} | {gb(hf['peak_gpu_bytes'])} |",
        f"| `qconv convert --method bnb --bits 4 --device cuda` (layer errors and hashes included; "
        f"best of {len(runs)}: {each}) | {best['total_s']:.1f} s | "
        f"{best['total_s'] / rw['read_plus_write_s']:.2f}x | {gb(best['peak_rss_bytes'])} | "
        f"{gb(best['peak_gpu_bytes'])} |",
        "",
        f"Where qconv's time went (main thread, best run): waiting for reads {best['qconv_wait_read_s']:.1f} s, "
        f"quantizing and measuring {best['qconv_quantize_s']:.1f} s, handing to the writer "
        f"{best['qconv_wait_write_s']:.1f} s, finishing the last shard (sha256 + fsync) "
        f"{best['qconv_finish_write_s']:.1f} s. Worst layer rel. error {best['worst_rel_error']:.4f}, "
        f"{best['bits_per_weight']:.3f} bits per quantized weight.",
    ]
    return lines


def smollm2_lines(path: Path, rel: str) -> list[str]:
    r = json.loads(path.read_text())
    return [
        f"SmolLM2-135M-Instruct (Q4_1 gguf) to nf4 on the GPU ([raw JSON]({rel})): packed bytes equal "
        f"bitsandbytes' own functions on the same GPU in all {r['layers']} layers: "
        f"**{r['bytes_equal_bitsandbytes_gpu']}**; stock transformers' logits vs qconv's dequantized reference: "
        f"relative difference {r['logits']['loader_rel_diff']:.1e}; vs the bf16 source on the verify prompts: "
        f"top-1 agreement {r['logits']['top1_agreement']:.3f}, KL {r['logits']['kl']:.3f}.",
    ]


def hqq_quantizer_table(path: Path, rel: str) -> list[str]:
    r = json.loads(path.read_text())
    shapes = ", ".join("x".join(map(str, s)) for s in r["shapes"])
    lines = [
        f"HQQ quantizer, group 64, axis 1, on bf16 matrices of Llama-3-8B's shapes ({shapes}; "
        f"{gb(r['source_bytes'])}), {r['environment'].get('gpu', r['device'])}, same run "
        f"([raw JSON]({rel})). Throughput = source bytes / median time after a warm-up; qconv's time "
        "includes packing and the meta tensors, hqq's is `Quantizer.quantize(optimize=True, bitpack=True)`. "
        "Errors: relative Frobenius error of the dequantized matrices at the precision each stores "
        "(float16 scale and zero).",
        "",
        "| bits | qconv | hqq | speed-up | qconv rel. error | hqq rel. error | error ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["results"]:
        lines.append(
            f"| {row['bits']} | {row['qconv_GBps']:.1f} GB/s | {row['hqq_GBps']:.2f} GB/s | "
            f"**{row['speedup']:.1f}x** | {row['qconv_rel_error']:.5f} | {row['hqq_rel_error']:.5f} | "
            f"{row['error_ratio']:.4f} |"
        )
    return lines


def hqq_smollm2_table(path: Path, rel: str) -> list[str]:
    r = json.loads(path.read_text())
    rows = {row["model"]: row for row in r["rows"]}
    base = rows["bf16"]
    lines = [
        f"SmolLM2-135M-Instruct, wikitext-2 test perplexity ({r['tokens']:,} tokens, {base['windows']} "
        f"non-overlapping windows of {base['window']}, remainder dropped), "
        f"{r['environment'].get('gpu', r['device'])}, one run ([raw JSON]({rel})). qconv: `qconv convert "
        "--method hqq`, run by `qconv.load_model` in bf16; hqq: its own `AutoHQQHFModel.quantize_model` "
        f"on the same model. bf16: **{base['ppl']:.2f}**.",
        "",
        "| bits | qconv (solver qconv) | qconv (solver hqq) | hqq, bf16 compute | hqq, fp16 compute |",
        "|---:|---:|---:|---:|---:|",
    ]

    def ppl(name: str) -> str:
        row = rows.get(name, {})
        if "ppl" not in row:
            return "failed"
        return f"{row['ppl']:,.2f}" if row["ppl"] < 1000 else f"{row['ppl']:,.0f}"

    for bits in sorted({row["bits"] for row in r["rows"] if "bits" in row}, reverse=True):
        lines.append(
            f"| {bits} | {ppl(f'qconv hqq {bits}-bit g64 (solver qconv)')} | "
            f"{ppl(f'qconv hqq {bits}-bit g64 (solver hqq)')} | "
            f"{ppl(f'hqq AutoHQQHFModel {bits}-bit g64 (compute bfloat16)')} | "
            f"{ppl(f'hqq AutoHQQHFModel {bits}-bit g64 (compute float16)')} |"
        )
    return lines


def eetq_smollm2_table(path: Path, rel: str) -> list[str]:
    r = json.loads(path.read_text())
    rows = {row["model"]: row for row in r["rows"]}
    base = rows["bf16"]
    lines = [
        f"EETQ int8 (issue 6), SmolLM2-135M-Instruct, wikitext-2 test perplexity ({r['tokens']:,} tokens, "
        f"{base['windows']} windows of {base['window']}), {r['environment'].get('gpu', r['device'])}, one run "
        f"([raw JSON]({rel})). `qconv convert --method eetq` on the GPU, run by `qconv.load_model` "
        "(weight-only int8, un-preprocessed at load); bnb int8 from FORMATS.md's measurement on the H100.",
        "",
        "| model | perplexity |",
        "|---|---:|",
        f"| bf16 | {base['ppl']:.2f} |",
    ]
    for row in r["rows"]:
        if row["model"] != "bf16":
            lines.append(
                f"| {row['model']} | {row['ppl']:.2f} |" if "ppl" in row else f"| {row['model']} | failed |"
            )
    for name, value in r.get("anchors", {}).items():
        if name.startswith("bnb"):
            lines.append(f"| {name} | {value:.2f} |")
    return lines


def ct_smollm2_table(path: Path, rel: str) -> list[str]:
    """run_ct.py: compressed-tensors, rtn (= llm-compressor's, byte for byte) vs the hqq solver."""
    r = json.loads(path.read_text())
    windows = r["cases"][0]["eval"]["protocol"]["windows"]
    lines = [
        f"compressed-tensors (issue 16), SmolLM2-135M-Instruct (Q4_1 gguf source), group size 64 for the group schemes (W8A8 and FP8_DYNAMIC: one scale a row), on the CPU "
        f"([raw JSON]({rel})): wikitext-2 test perplexity over the first {windows} windows of 2048 tokens "
        "(`qconv eval --max-windows 8`), the artifact loaded by stock transformers with compressed-tensors. "
        "The rtn rows are byte-identical to llm-compressor's own round to nearest "
        "(tests/test_format_compressed_tensors.py), so they are llm-compressor's perplexity too. "
        "Error: the layers' relative Frobenius error; hqq/rtn: per layer, same weight.",
        "",
        "| scheme | solver | perplexity | mean layer error | hqq/rtn error (mean, worst layer) | bits/weight "
        "| quantize |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for case in r["cases"]:
        comparison = r.get("comparison", {}).get(case["scheme"])
        ratio = "-"
        if case["solver"] == "hqq" and comparison:
            every = "all layers <=" if comparison["all_layers_hqq_le_rtn"] else "NOT all layers <="
            ratio = f"{comparison['mean_ratio']:.3f}, {comparison['worst_ratio']:.3f} ({every})"
        solver = "rtn (= llm-compressor)" if case["solver"] == "rtn" else case["solver"]
        if case.get("solver_version"):  # formats/ct_solver.py's version that made the row
            solver += f" v{case['solver_version']}"
        lines.append(
            f"| {case['scheme']} | {solver} | {case['perplexity']:.2f} | {case['mean_rel_error']:.4f} | "
            f"{ratio} | {case['bits_per_weight']:.2f} | {case['quantize_s']:.0f} s |"
        )
    superseded = [
        f"{c['scheme']} hqq v{c['solver_version']} {c['perplexity']:.2f}" for c in r.get("superseded", [])
    ]
    if superseded:
        lines += [
            "",
            "Superseded (an earlier solver version, kept in the JSON): " + ", ".join(superseded) + ".",
        ]
    return lines


def load_table(path: Path, rel: str) -> list[str]:
    r = json.loads(path.read_text())
    source, machine = r["source"], r["machine"]
    where = machine.get("gpu") or machine.get("device", "?")
    lines = [
        f"Load time of a pre-quantized qconv artifact against transformers' load-time quantization of the "
        f"bf16 source, on a synthetic {source.get('shapes', 'Llama-3-8B')}-shaped model ({source['layers']} "
        f"layers, {gb(source['bytes'])} bf16), {where}; each row a fresh process with a cold page cache, "
        f"timed until every weight is on the device; `{r['call']}` ([raw JSON]({rel})). Bytes read: "
        "the process's `read_bytes` (/proc/self/io), else the system's `pgpgin` where marked.",
        "",
        "| scheme | path | load time | vs pre-quantized | on disk | bytes read | peak host RSS | "
        "peak GPU memory | logits finite |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    names = {"nf4": "nf4 + double quant", "int8": "int8 (LLM.int8)"}
    paths = {
        "prequantized": "qconv artifact, pre-quantized",
        "load_quantize": "bf16 source, `BitsAndBytesConfig` at load",
    }
    for scheme, entry in r.get("schemes", {}).items():
        pre = entry.get("prequantized", {}).get("load_s")
        for how, text in paths.items():
            case = entry.get(how)
            if case is None:
                continue
            head = f"| {names.get(scheme, scheme)} | {text} |"
            if "load_s" not in case:
                lines.append(f"{head} failed | - | - | - | - | - | - |")
                continue
            ratio = f"{case['load_s'] / pre:.2f}x" if pre else "-"
            read = gb(case["bytes_read"]) if "bytes_read" in case else "-"
            if case.get("bytes_read_counter") not in (None, "read_bytes"):
                read += f" ({case['bytes_read_counter'].removeprefix('system_').removesuffix('_bytes')})"
            gpu = case.get("peak_gpu_bytes")
            lines.append(
                f"{head} {case['load_s']:.1f} s | {ratio} | {gb(case['folder_bytes'])} | {read} | "
                f"{gb(case['peak_rss_bytes'])} | {gb(gpu) if gpu is not None else '-'} | "
                f"{'yes' if case.get('logits_finite') else 'no'} |"
            )
    return lines


BLOCK8B_PHASES = (  # (label, the JSON's phases summed into the row)
    ("X^T X accumulation", ("xtx_s",)),
    ("init (k-means)", ("init_s",)),
    ("beam search", ("beam_search_s",)),
    ("Adam", ("adam_s",)),
    ("block fine-tune", ("finetune_s",)),
    (
        "rest (block read, forwards, losses, checkpoint)",
        ("load_block_s", "source_forward_s", "layer_other_s", "store_s", "next_inputs_s", "other_s"),
    ),
)


def aqlm_block8b_table(path: Path, rel: str) -> list[str]:
    """run_aqlm.py --part block8b: one 8B-shaped block, per phase, and the 32-block estimate."""
    r = json.loads(path.read_text())["block8b"]
    shapes, cases = r["block"]["shapes"], r["cases"]
    names = list(cases)
    timed = [cases[n] for n in names if "phases" in cases[n]]
    calib = timed[0]["calibration"] if timed else {}
    where = r["environment"].get("gpu") or r["device"]
    lines = [
        f"AQLM on one Llama-3-8B-shaped decoder block (issue 19): hidden {shapes['hidden_size']}, "
        f"intermediate {shapes['intermediate_size']}, {shapes['num_attention_heads']} heads, "
        f"{shapes['num_key_value_heads']} kv heads, random bf16 weights; calibrated by qconv's own "
        f"`prepare` on {calib.get('sequences', '?')} sequences of {calib.get('seqlen', '?')} tokens of its "
        "default text (WikiText-2 validation) tokenized by SmolLM2's tokenizer and embedded by a random "
        f"{shapes['vocab_size']}x{shapes['hidden_size']} bf16 embedding; {where}, one run "
        f"([raw JSON]({rel})). 32 blocks: 32 x the block + the one-off tokenization and embedding pass "
        "(lm_head is not quantized; writing and verifying the artifact not included); goal: 1 h.",
        "",
        "| phase | " + " | ".join(_block8b_case(n) for n in names) + " |",
        "|---|" + "---:|" * len(names),
    ]

    def row(label: str, cell) -> None:
        values = []
        for name in names:
            case = cases[name]
            if "phases" not in case:
                values.append(
                    "skipped" if "skipped" in case else "cut off" if "partial" in case else "failed"
                )
            else:
                values.append(cell(case))
        lines.append(f"| {label} | " + " | ".join(values) + " |")

    for label, keys in BLOCK8B_PHASES:
        row(label, lambda c, keys=keys: f"{sum(c['phases'][k] for k in keys):.1f} s")
    row("**block total**", lambda c: f"**{c['block_total_s']:.1f} s**")
    row("layer rounds (min-max)", _block8b_rounds)
    row("fine-tune epochs", lambda c: _block8b_epochs(c.get("finetune")))

    def estimate(c) -> str:
        e = c["extrapolation"]
        bound = ">= " if e.get("bounded") else ""
        verdict = "within 1 h" if e["within_goal"] else "over 1 h"
        return f"**{bound}{e['seconds'] / 60:.0f} min** ({verdict})"

    row("**32 blocks (8B model)**", estimate)
    notes = sorted({c["extrapolation"]["note"] for c in timed if c["extrapolation"].get("note")})
    notes += sorted(
        {c["extrapolation"]["tokens_note"] for c in timed if c["extrapolation"].get("tokens_note")}
    )
    for name in names:
        case = cases[name]
        if "phases" in case:
            notes.append(_block8b_shares(name, case))
    for name in names:
        partial = cases[name]
        if "totals_s" in partial:  # what a case cut off at the budget measured before it stopped
            totals, done = partial["totals_s"], partial.get("layers_done", [])
            notes.append(
                f"{_block8b_case(name)} was cut off at the run's time budget after "
                f"{partial['seconds_so_far']:.0f} s, {len(done)} of {len(r['block']['linears'])} "
                f"layers done: beam search {totals.get('beam_search_s', 0):.0f} s, Adam "
                f"{totals.get('adam_s', 0):.0f} s, init {totals.get('init_s', 0):.1f} s; so its block takes "
                "longer than that"
            )
    if notes:
        lines += [""] + [f"_{note}._" for note in notes]
    return lines


def _block8b_shares(name: str, case: dict) -> str:
    """Which phases dominate a timed case's block, and what the 1 h goal leaves a block."""
    total = case["block_total_s"]
    shares = sorted(
        ((sum(case["phases"][k] for k in keys) / total, label) for label, keys in BLOCK8B_PHASES),
        reverse=True,
    )
    extrapolation = case["extrapolation"]
    goal_s, blocks = extrapolation.get("goal_s", 3600.0), extrapolation.get("blocks", 32)
    per_block_goal = (goal_s - case.get("one_off_s", 0.0)) / blocks
    text = (
        f"{_block8b_case(name)}: "
        + ", ".join(f"{label} {share:.0%}" for share, label in shares[:4])
        + f" of the block; the goal leaves {per_block_goal:.0f} s a block"
    )
    finetune = case.get("finetune")
    if finetune and finetune.get("rel_error_before") is not None:
        text += (
            f"; block fine-tuning ran {finetune['epochs_run']} epochs"
            + (" (its cap)" if finetune.get("capped") else "")
            + f" and moved the block's relative output error from {finetune['rel_error_before']:.3f} "
            f"to {finetune['rel_error']:.3f}"
        )
    return text


def _block8b_case(name: str) -> str:
    scheme, _, ft = name.partition(":")
    return f"{scheme} {AQLM_CASES.get(ft, ft)}"


def _block8b_rounds(case: dict) -> str:
    rounds = [layer["rounds"] for layer in case["layers"].values()]
    capped = " (capped)" if any(layer["capped"] for layer in case["layers"].values()) else ""
    return (f"{min(rounds)}-{max(rounds)}" if rounds else "-") + capped


def _block8b_epochs(finetune: dict | None) -> str:
    if not finetune:
        return "-"
    return f"{finetune['epochs_run']}" + (" (capped)" if finetune["capped"] else "")


def aqlm_reference_table(path: Path, rel: str) -> list[str]:
    """run_aqlm_reference.py: SmolLM2 quantized by the AQLM authors' own code on qconv's
    calibration tokens, beside qconv's conversion of the same case (``aqlm_smollm2_*.json`` in the
    same folder)."""
    r = json.loads(path.read_text())
    calib, cases = r["calibration"], r["cases"]
    qconv: dict[str, tuple] = {}
    for _, doc in _load_all(path.parent, "aqlm_smollm2_*.json"):
        for case, entry in (doc.get("smollm2") or {}).items():
            if _ppl_of(entry.get("ppl")) is not None:
                qconv[case] = (_ppl_of(entry.get("ppl")), short_gpu(doc.get("gpu")))
    windows = {
        result["windows"]
        for entry in cases.values()
        for result in (entry.get("ppl") or {}).values()
        if "windows" in result
    }
    lines = [
        "AQLM's quality anchor (issue 19): SmolLM2-135M-Instruct quantized by the authors' own code "
        "(github.com/Vahe1994/AQLM: `AQEngine` per Linear, `finetune_groupwise` per block, main.py's flow "
        "and the README's settings, driven by `bench/run_aqlm_reference.py`) on qconv's calibration tokens "
        f"({calib['sequences']} sequences of {calib['seqlen']} tokens of WikiText-2 validation); "
        "wikitext-2 test perplexity by qconv's protocol "
        f"({', '.join(str(w) for w in sorted(windows)) or '?'} windows of {r['eval']['window']}) on the "
        f"dequantized weights (codebooks and scales rounded to float16), {short_gpu(r.get('gpu'))} "
        f"([raw JSON]({rel})). qconv: its own conversion of the same case (stock transformers + aqlm, "
        "float16).",
        "",
        "| case | reference ppl (fp16) | reference ppl (fp32) | qconv ppl (fp16) | bits/weight (estimate_nbits_per_parameter) | "
        "reference time (quantize + fine-tune) | settings |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    notes = []
    for case, entry in cases.items():
        if case == "source":
            label = "unquantized source"
        else:
            scheme, _, ft = case.partition(":")
            label = f"aqlm {scheme} ({AQLM_CASES.get(ft, ft)})"
        ppl = entry.get("ppl") or {}
        status = entry.get("status")
        fp16 = perplexity_text(ppl["float16"]["ppl"]) if "float16" in ppl else "-"
        if status == "partial":
            done = entry.get("blocks_done") or len(entry.get("blocks", {}))
            fp16 = f"cut off after {done} blocks (resumable)"
        elif status == "error":
            fp16 = "failed"
            notes.append(f"{case} failed: {entry.get('error', '')[:200]}")
        elif status != "done":  # not started, or a call cut off mid-block ("running")
            fp16 = status or "-"
        fp32 = perplexity_text(ppl["float32"]["ppl"]) if "float32" in ppl else "-"
        theirs = qconv.get(case)
        ours = f"{perplexity_text(theirs[0])} ({theirs[1]})" if theirs else "-"
        bits = entry.get("avg_bits_per_parameter")
        seconds = entry.get("seconds", {})
        timed = "-"
        if "quantize_s" in seconds:
            timed = f"{seconds['quantize_s']:.0f} s + {seconds.get('finetune_s', 0.0):.0f} s"
        settings = entry.get("settings")
        described = "-"
        if settings:
            described = (
                f"beam {settings['beam_size']}, {settings['max_epochs']} epochs max, tolerance "
                f"{settings['relative_mse_tolerance']}, k-means {settings['init_max_iter']} iters"
            )
            if settings["finetune_max_epochs"]:
                described += (
                    f"; fine-tune lr {settings['finetune_lr']:g}, batch {settings['finetune_batch_size']}, "
                    f"{settings['finetune_max_epochs']} epochs, {entry.get('val_size', 0)} held out"
                )
            filled = entry.get("layers_kmeans_filled")
            if filled:
                described += f"; {filled} layers k-means-filled"
        lines.append(
            f"| {label} | {fp16} | {fp32} | {ours} | {f'{bits:.2f}' if bits else '-'} | {timed} | {described} |"
        )
    if any(entry.get("layers_kmeans_filled") for entry in cases.values()):
        notes.append(
            "k-means-filled: layers with fewer input groups than codewords (1x16 on SmolLM2's attention "
            "projections), which the reference cannot initialise; each group became its own codeword, "
            "as qconv does there"
        )
    if notes:
        lines += [""] + [f"_{note}._" for note in notes]
    return lines


# -- one table of every format, from every results file that holds a part of it ----------------
FAMILIES = ("bnb", "hqq", "eetq", "aqlm")  # the table's order; within one, more bits first
AQLM_CASES = {"ft": "fine-tuned", "noft": "no fine-tuning"}
GROUP_HQQ = 64  # run_hqq.py's GROUP


def short_gpu(name: str | None) -> str:
    return (name or "cpu").removeprefix("NVIDIA ")


def speed(gbps: float | None) -> str:
    if gbps is None:
        return "-"
    return f"{gbps:.1f} GB/s" if gbps >= 1 else f"{gbps:.2f} GB/s"


def perplexity_text(value) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return "-"
    return f"{value:,.2f}" if value < 1000 else f"{value:,.0f}"


def _row(family: str, label: str, bits: int, **fields) -> dict:
    row = {
        "family": family,
        "label": label,
        "nominal_bits": bits,
        "bits_per_weight": None,
        "qconv_speed": "-",
        "reference_speed": "-",
        "speedup": None,
        "qconv_ppl": None,
        "reference_ppl": None,
        "peak_gpu_bytes": None,
        "peak_rss_bytes": None,
        "sources": [],
    }
    row.update(fields)
    return row


def _ppl_of(entry: dict | None):
    """A perplexity, or why there is none."""
    if not entry:
        return None
    if "ppl" in entry:
        return entry["ppl"]
    if "unavailable" in entry:
        return "n/a"
    return "failed" if "error" in entry else None


def _hqq_throughput(quantizer: list[tuple[Path, dict]], bits: int) -> dict:
    for path, doc in quantizer:
        for result in doc.get("results", []):
            if result.get("bits") == bits:
                return {
                    "qconv_speed": speed(result["qconv_GBps"]),
                    "reference_speed": speed(result["hqq_GBps"]) + " (`Quantizer`)",
                    "speedup": result["speedup"],
                    "extra_source": (short_gpu(doc["environment"].get("gpu")), path),
                }
    return {}


def _load_all(results: Path, pattern: str) -> list[tuple[Path, dict]]:
    """Every non-quick results file matching ``pattern``, parsed; unreadable ones are skipped."""
    found = []
    for path in sorted(results.glob(pattern)):
        if "_quick" in path.name:
            continue
        try:
            found.append((path, json.loads(path.read_text())))
        except (OSError, ValueError) as exc:
            print(f"report: {path.name} skipped ({exc})", file=sys.stderr)
    return found


def format_rows(results: Path) -> tuple[list[dict], float | None]:
    """The summary rows and the bf16 perplexity. Later files (by name) replace earlier rows of
    the same format, so a repeated measurement shows once."""
    rows: dict[str, dict] = {}
    bf16 = None
    quantizer = _load_all(results, "hqq_quantizer_*.json")
    for path, doc in _load_all(results, "formats_*.json"):
        gpu = short_gpu(doc.get("environment", {}).get("gpu"))
        bf16 = (doc.get("bf16") or {}).get("ppl", bf16)
        throughput = (doc.get("throughput") or {}).get("results", {})
        for key, entry in doc.get("formats", {}).items():
            convert = entry.get("convert") or {}
            row = _row(
                entry["method"],
                entry.get("label", key),
                entry["options"].get("bits", 8),
                bits_per_weight=(convert.get("summary") or {}).get("bits_per_weight"),
                qconv_ppl=_ppl_of(entry.get("ppl")),
                reference_ppl=_ppl_of(entry.get("reference")),
                peak_gpu_bytes=convert.get("peak_gpu_bytes"),
                peak_rss_bytes=convert.get("peak_rss_bytes"),
                sources=[(gpu, path)],
            )
            speeds = throughput.get(key) or {}
            if "qconv_GBps" in speeds:
                row["qconv_speed"] = speed(speeds["qconv_GBps"])
                if speeds.get("reference_GBps") is not None:
                    row["reference_speed"] = speed(speeds["reference_GBps"])
                    row["speedup"] = speeds["speedup"]
                elif speeds.get("reference_unavailable"):
                    row["reference_speed"] = "n/a"
            elif entry["method"] == "hqq":
                found = _hqq_throughput(quantizer, entry["options"]["bits"])
                if found:
                    row["sources"].append(found.pop("extra_source"))
                    row.update(found)
            rows[row["label"]] = row
    for path, doc in _load_all(results, "hqq_smollm2_*.json"):
        by_model = {r["model"]: r for r in doc.get("rows", [])}
        bf16 = bf16 if bf16 is not None else by_model.get("bf16", {}).get("ppl")
        for bits in sorted({r["bits"] for r in doc.get("rows", []) if "bits" in r}, reverse=True):
            label = f"hqq {bits}-bit g{GROUP_HQQ}"
            if label in rows:
                continue
            row = _row(
                "hqq",
                label,
                bits,
                qconv_ppl=_ppl_of(by_model.get(f"qconv hqq {bits}-bit g64 (solver qconv)")),
                reference_ppl=_ppl_of(by_model.get(f"hqq AutoHQQHFModel {bits}-bit g64 (compute bfloat16)")),
                sources=[(short_gpu(doc.get("environment", {}).get("gpu")), path)],
            )
            found = _hqq_throughput(quantizer, bits)
            if found:
                row["sources"].append(found.pop("extra_source"))
                row.update(found)
            rows[label] = row
    for path, doc in _load_all(results, "eetq_smollm2_*.json"):
        if any(r["family"] == "eetq" for r in rows.values()):
            break
        qconv = [r for r in doc.get("rows", []) if r["model"].startswith("qconv eetq") and "ppl" in r]
        if qconv:
            first = qconv[0]
            label = first["model"].removeprefix("qconv ").split(" (")[0]
            rows[label] = _row(
                "eetq",
                label,
                8,
                bits_per_weight=first.get("bits_per_weight"),
                qconv_ppl=first["ppl"],
                reference_ppl="n/a",
                sources=[(short_gpu(doc.get("environment", {}).get("gpu")), path)],
            )
    layer = {}
    for path, doc in _load_all(results, "aqlm_layer_*.json"):
        cases = (doc.get("layer") or {}).get("cases", {})
        if "qconv" in cases:
            layer = {"path": path, "gpu": short_gpu(doc.get("gpu")), **doc["layer"]}
    for path, doc in _load_all(results, "aqlm_smollm2_*.json"):
        for case, entry in (doc.get("smollm2") or {}).items():
            if "summary" not in entry:
                continue
            scheme, _, ft = case.partition(":")
            label = f"aqlm {scheme} ({AQLM_CASES.get(ft, ft)})"
            stats = entry.get("stats", {})
            row = _row(
                "aqlm",
                label,
                16 if scheme == "1x16" else 8,
                bits_per_weight=entry["summary"]["bits_per_weight"],
                qconv_ppl=_ppl_of(entry.get("ppl")),
                peak_gpu_bytes=stats.get("peak_gpu_bytes"),
                peak_rss_bytes=stats.get("peak_rss_bytes"),
                sources=[(short_gpu(doc.get("gpu")), path)],
            )
            if scheme == "1x16" and layer:  # the layer comparison is of the 1x16 scheme
                q, ref = layer["cases"]["qconv"], layer["cases"].get("reference")
                row["qconv_speed"] = f"{q['seconds']:.2f} s a layer"
                if ref:
                    row["reference_speed"] = f"{ref['seconds']:.2f} s (`AQEngine`)"
                    row["speedup"] = ref["seconds"] / q["seconds"]
                row["sources"].append((layer["gpu"], layer["path"]))
            rows[label] = row
    ordered = sorted(rows.values(), key=lambda r: (FAMILIES.index(r["family"]), -r["nominal_bits"]))
    return ordered, bf16


def formats_table(rows: list[dict], bf16: float | None, link_prefix: str, root: Path) -> list[str]:
    if not rows:
        return []
    lines = [
        "Every format against its reference. SmolLM2-135M-Instruct (bf16 from the Q4_1 gguf"
        + (f", perplexity **{bf16:.2f}**" if bf16 is not None else "")
        + "), wikitext-2 test perplexity by `qconv eval`'s protocol (non-overlapping windows of 2048 "
        "tokens, remainder dropped). Quantize: source bytes / median time on Llama-3-8B-shaped bf16 "
        "matrices after a warm-up (bnb against `bitsandbytes.functional`, hqq against hqq's `Quantizer`), "
        "for AQLM one real SmolLM2 layer against the authors' `AQEngine`. Reference perplexity: "
        "transformers' `BitsAndBytesConfig` at load time (bnb), hqq's `AutoHQQHFModel` in bf16 (hqq); "
        "EETQ has none that installs (n/a). Peak memory: qconv's conversion of SmolLM2. Rows from "
        "different runs; each links the JSON it comes from (the GPU named).",
        "",
        "| format | bits/weight | qconv quantize | reference | speed-up | qconv ppl | reference ppl | "
        "peak GPU | peak RSS | raw JSON |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        bits = f"{r['bits_per_weight']:.3f}" if r["bits_per_weight"] is not None else "-"
        up = f"**{r['speedup']:.1f}x**" if r["speedup"] is not None else "-"
        gpu = gb(r["peak_gpu_bytes"]) if r["peak_gpu_bytes"] is not None else "-"
        rss = gb(r["peak_rss_bytes"]) if r["peak_rss_bytes"] is not None else "-"
        links = ", ".join(
            f"[{name}]({link_prefix}{path.relative_to(root).as_posix()})" for name, path in r["sources"]
        )
        lines.append(
            f"| {r['label']} | {bits} | {r['qconv_speed']} | {r['reference_speed']} | {up} | "
            f"{perplexity_text(r['qconv_ppl'])} | {perplexity_text(r['reference_ppl'])} | {gpu} | {rss} | {links} |"
        )
    return lines


def plot(rows: list[dict], bf16: float | None, png: Path) -> bool:
    """Perplexity against bits per weight, log scale: qconv filled, the reference hollow. Needs
    matplotlib (the ``bench`` extra); without it nothing is drawn and False is returned."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import ScalarFormatter
    except ImportError:
        print("report: matplotlib is not installed (pip install '.[bench]'); no plot drawn", file=sys.stderr)
        return False
    points = [r for r in rows if r["bits_per_weight"] is not None and isinstance(r["qconv_ppl"], float)]
    if not points:
        return False
    figure, axes = plt.subplots(figsize=(8, 5), dpi=120)
    colours = dict(zip(FAMILIES, ("tab:blue", "tab:orange", "tab:green", "tab:red"), strict=True))
    for family in FAMILIES:
        mine = [r for r in points if r["family"] == family]
        if not mine:
            continue
        axes.scatter(
            [r["bits_per_weight"] for r in mine],
            [r["qconv_ppl"] for r in mine],
            color=colours[family],
            label=f"qconv {family}",
            zorder=3,
        )
        refs = [r for r in mine if isinstance(r["reference_ppl"], float)]
        if refs:
            axes.scatter(
                [r["bits_per_weight"] for r in refs],
                [r["reference_ppl"] for r in refs],
                facecolors="none",
                edgecolors=colours[family],
                s=90,
                label=f"reference {family}",
                zorder=2,
            )
        for r in mine:
            near = sum(  # earlier points whose label would sit on this one's
                abs(o["bits_per_weight"] - r["bits_per_weight"]) < 1.5
                and abs(math.log(o["qconv_ppl"] / r["qconv_ppl"])) < 0.08
                for o in points[: points.index(r)]
            )
            axes.annotate(
                r["label"],
                (r["bits_per_weight"], r["qconv_ppl"]),
                fontsize=7,
                # a point close to earlier ones takes the other side for its label, then a lower line
                xytext=(-6 if near % 2 else 6, -10 * (near // 2)),
                ha="right" if near % 2 else "left",
                va="center",
                textcoords="offset points",
            )
    if bf16 is not None:
        axes.axhline(bf16, color="grey", linestyle="--", linewidth=1, label=f"bf16 ({bf16:.2f})")
    axes.set_yscale("log")
    axes.yaxis.set_major_formatter(ScalarFormatter())  # 21.6, not 2.16 x 10^1
    axes.yaxis.set_minor_formatter(ScalarFormatter())
    axes.margins(x=0.2)  # room for the labels of the rightmost points
    axes.set_xlabel("bits per quantized weight (codebooks, scales and zeros included)")
    axes.set_ylabel("wikitext-2 test perplexity (log)")
    axes.set_title("SmolLM2-135M-Instruct: perplexity against size")
    axes.grid(True, which="both", linewidth=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png)
    plt.close(figure)
    return True


# -- GGUF (issue 15): run_gguf.py, qconv's two solvers against llama.cpp's own quantizer ----------
GGUF_ROWS = (  # (the JSON's key, the row's name)
    ("llama_cpp", "llama.cpp `llama_model_quantize`"),
    ("qconv_llama", "qconv `--solver llama`"),
    ("qconv_qconv", "qconv `--solver qconv` (default)"),
)


def _gguf_machine(r: dict) -> str:
    m = r.get("machine", {})
    if m.get("gpu"):
        return short_gpu(m["gpu"])
    return f"{m.get('cpu', 'CPU')}, {m.get('cores', '?')} cores"


def _gguf_failed(case: dict) -> str:
    if case.get("timed_out"):
        wall = (case.get("process") or {}).get("wall_s")
        return f"timed out (> {wall:.0f} s)" if wall else "timed out"
    return "failed"


def _gguf_range(values: list[float]) -> str:
    low, high = f"{min(values):.0%}", f"{max(values):.0%}"
    return low if low == high else f"{low}-{high}"


def _gguf_ppl(ppl: dict, entry: dict) -> str:
    """A row's perplexity; a file holding llama.cpp's bytes in every tensor has llama.cpp's."""
    if ppl.get("same_as"):
        same = (entry.get(ppl["same_as"]) or {}).get("ppl") or {}
        return f"{same['ppl']:.2f} (same bytes)" if "ppl" in same else "= llama.cpp (same bytes)"
    if "ppl" in ppl:
        return f"{ppl['ppl']:.2f}"
    return _gguf_failed(ppl) if "error" in ppl else "-"


def gguf_table(path: Path, rel: str) -> list[str]:
    """run_gguf.py: per file type, llama.cpp's quantizer against qconv's two solvers."""
    r = json.loads(path.read_text())
    bf16 = r.get("bf16", {})
    bf16_ppl = (bf16.get("ppl") or {}).get("ppl")
    check = (bf16.get("qconv_eval") or {}).get("metrics", {}).get("ppl")
    cpu = not r.get("machine", {}).get("gpu")
    busy = [  # the whole machine's busy fraction during each case (run_gguf.py's `process`)
        (entry.get(key) or {}).get("process", {}).get("machine_busy")
        for entry in r.get("types_results", {}).values()
        for key, _ in GGUF_ROWS
    ]
    busy = [b for b in busy if b is not None]
    windows = r.get("max_windows")
    if not cpu:  # run_gguf.py --device cuda: qconv's quantize time only
        lines = [
            f"GGUF on the GPU ({_gguf_machine(r)}, one run, [raw JSON]({rel})): the same BF16 GGUF of "
            "SmolLM2 quantized by `qconv convert --method gguf --no-verify --device cuda` with each solver. "
            "llama.cpp is not installed on the GPU machine, so this table has qconv's rows only: time is "
            "qconv's quantizing (`stats.quantize_s`; the whole conversion in brackets), GB/s the bf16 bytes "
            "of the quantized tensors per second (SmolLM2's 576-wide tensors are small for a GPU: see the "
            "8B-shaped throughput below); errors as in the CPU table (the solvers give the same bytes on "
            "both devices up to float rounding)."
        ]
    else:
        lines = []
    lines = lines or [
        "GGUF (issue 15), SmolLM2-135M-Instruct: qconv's BF16 GGUF of the Q4_1 gguf is the common input"
        + (
            f" (perplexity **{bf16_ppl:.2f}** by llama.cpp on the first {windows} window(s) of "
            f"{r.get('seqlen', 2048)} tokens of wikitext-2 test"
            + (f"; `qconv eval` of the same artifact: {check:.2f}" if check is not None else "")
            + f"; the issue's anchors on those windows: F16 {r['anchors']['F16']}, Q4_K_M {r['anchors']['Q4_K_M']})"
            if bf16_ppl is not None
            else ""
        )
        + ", quantized by llama.cpp's own `llama_model_quantize` (llama-cpp-python "
        f"{r.get('environment', {}).get('llama-cpp-python')}, nthread {r.get('threads')}) and by "
        f"`qconv convert --method gguf --no-verify` with each solver; {_gguf_machine(r)}, one run "
        f"([raw JSON]({rel})). Bits/weight: bytes of the quantized tensors / their weights. Errors: "
        "relative Frobenius error of each quantized tensor against the BF16 values (median and worst "
        "over tensors); ratio: qconv / llama.cpp per tensor. Perplexity computed by llama.cpp. Time: "
        "llama.cpp's whole call (read, quantize, write) against qconv's quantizing (`stats.quantize_s`; "
        "the whole conversion in brackets); CPU: CPU seconds, which a shared machine's load inflates "
        "far less than wall time: llama.cpp's call, qconv's quantizing (`stats.quantize_cpu_s`, every "
        "thread) or, where a row predates it, the whole `qconv convert` process (marked 'process'); "
        "GB/s: bf16 bytes of the quantized tensors per second"
        + (
            f". The CPU was shared with other work (the whole machine {_gguf_range(busy)} busy during "
            "the timed cases): times are indicative"
            if cpu and busy
            else ""
        )
        + ".",
    ]
    for file_type, entry in r.get("types_results", {}).items():
        lines += ["", f"**{file_type}**" + (f": {entry['skipped']}" if "skipped" in entry else "")]
        if "skipped" in entry:
            continue
        lines += [
            "",
            "| path | bits/weight | median error | worst error | tensors <= llama.cpp | ratio median / worst "
            "| perplexity | time | CPU | GB/s | time vs llama.cpp |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        llama = entry.get("llama_cpp") or {}
        llama_s = llama.get("quantize_s") if "error" not in llama else None
        for key, name in GGUF_ROWS:
            case = entry.get(key)
            if case is None:
                continue
            if "error" in case:
                lines.append(f"| {name} | {_gguf_failed(case)} |" + " - |" * 9)
                continue
            facts = case.get("file_facts") or case
            bits = facts.get("bits_per_weight") or (case.get("summary") or {}).get("bits_per_weight")
            quantized_bytes = 2 * (
                facts.get("quantized_params") or (case.get("summary") or {}).get("quantized_params") or 0
            )
            errors = list((case.get("rel_errors") or {}).values())
            versus = case.get("vs_llama_cpp") or {}
            ppl = case.get("ppl") or {}
            if key == "llama_cpp":
                seconds, time_text = case["quantize_s"], f"{case['quantize_s']:.1f} s"
                cpu_s = case.get("cpu_s_in_call")
                cpu_text = f"{cpu_s:.1f} s" if cpu_s is not None else "-"
            else:
                stats = case["stats"]
                seconds = stats["quantize_s"]
                time_text = f"{seconds:.1f} s ({stats['convert_s']:.1f} s)"
                process_cpu = (case.get("process") or {}).get("cpu_s")
                if stats.get("quantize_cpu_s") is not None:
                    cpu_text = f"{stats['quantize_cpu_s']:.1f} s"
                else:
                    cpu_text = f"{process_cpu:.1f} s (process)" if process_cpu is not None else "-"
            ratio = "1.00x" if key == "llama_cpp" else (f"{seconds / llama_s:.1f}x" if llama_s else "-")
            lines.append(
                f"| {name} | {bits:.3f} | "
                + (f"{statistics.median(errors):.4f} | {max(errors):.4f} | " if errors else "- | - | ")
                + (
                    f"{versus['qconv_le_llama']} / {versus['tensors']} | "
                    f"{versus['median_ratio']:.3f} / {versus['worst_ratio']:.3f} | "
                    if versus
                    else "- | - | "
                )
                + f"{_gguf_ppl(ppl, entry)} | {time_text} | {cpu_text} | "
                + (f"{quantized_bytes / seconds / 1e9:.3g} GB/s" if seconds else "-")
                + f" | {ratio} |"
            )
    return lines


def calibrated_table(path: Path, rel: str) -> list[str]:
    """run_calibrated.py: data-free against calibrated (GPTQ) in the same format and bytes; under a
    format, the same format calibrated by another tool where the run has one
    (run_llmcompressor_gptq.py: llm-compressor's GPTQ on the same calibration token ids)."""
    r = json.loads(path.read_text())
    settings = r.get("calibration_settings", {})
    lines = [
        f"Calibrated uniform quantization (issue 17), SmolLM2-135M-Instruct, {r.get('device')}"
        + (f", {r.get('threads')} torch thread(s)" if str(r.get("threads")).isdigit() else "")
        + f" ([raw JSON]({rel})): {r.get('protocol')}. Calibration: "
        f"{settings.get('text')}, {settings.get('calib_tokens'):,} tokens in sequences of "
        f"{settings.get('seqlen')}. Calibration time: the whole calibration stage, and its mean per "
        "quantized layer (the GPTQ solve alone).",
        "",
        "| format | bits/weight | data-free perplexity | calibrated perplexity | calibration | per layer |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    cases = r["cases"]

    def seconds(value, digits: int) -> str:
        return "-" if value is None else f"{value:.{digits}f} s"

    notes = []
    for name, summary in r.get("summary", {}).items():
        calibrated = cases.get(f"{name}-gptq") or {}
        data_free = cases.get(summary["data_free"]) or {}
        label = (data_free.get("recipe") or calibrated.get("recipe") or {}).get("label", name)
        if (summary["data_free"] or "").endswith("-rtn"):
            label += " (rtn = llm-compressor's)"
        bits = calibrated.get("bits_per_weight")
        data_free_ppl = summary["data_free_ppl"] if summary["data_free"] else "not run"
        borrowed = None if summary["data_free"] else _hqq_data_free_row(path, r, calibrated)
        if borrowed is not None:
            data_free_ppl = borrowed["ppl"]
            label += " ¹"
        calibrated_ppl = _calibrated_ppl(calibrated, summary["calibrated_ppl"])
        lines.append(
            f"| {label} | {'-' if bits is None else f'{bits:.3f}'} | "
            f"{perplexity_text(data_free_ppl)} | **{perplexity_text(calibrated_ppl)}** | "
            f"{seconds(summary['calibration_s'], 0)} | {seconds(summary['calibrate_s_per_layer_mean'], 2)} |"
        )
        for reference in summary.get("references", []):
            case = cases.get(reference["case"]) or {}
            tokens = reference.get("calib_tokens")
            same = tokens == settings.get("calib_tokens")
            gptq = case.get("gptq") or {}
            lines.append(
                f"| {reference['tool']} GPTQ (actorder {gptq.get('actorder')}), same format"
                + (f", run on {case['device']}" if case.get("device") else "")
                + " | - | - | "
                f"{perplexity_text(_calibrated_ppl(case, reference['calibrated_ppl']))} | "
                f"{seconds(reference['calibration_s'], 0)} | {seconds(reference['calibrate_s_per_layer_mean'], 2)} |"
            )
            note = (
                f"{reference['tool']}: GPTQModifier (oneshot) calibrated on "
                + (f"the same {tokens:,} token ids" if same else f"{tokens} token ids (NOT the same count)")
                + ", "
                + ", ".join(
                    f"{key} {value}" for key, value in gptq.items() if value is not None and key != "actorder"
                )
                + "; per layer: its logged solve time over the modules solved together"
            )
            if note not in notes:
                notes.append(note)
    source = r.get("source_eval")
    if source:
        lines.append(
            f"| unquantized source ({source['eval']['protocol']['dtype']}) | 16 | - | "
            f"{perplexity_text(source['eval']['metrics']['ppl'])} | - | - |"
        )
    if any(" ¹ |" in line for line in lines):
        notes.append(
            f"¹ data-free: qconv's own HQQ row of the same GPU's full-protocol run "
            f"(bench/results/hqq_smollm2_{r.get('device')}.json, bench/run_hqq.py), not converted in this run"
        )
    stopped = sorted(
        {c["cut_off"]["why"] for c in cases.values() if "cut_off" in c and "perplexity" not in c}
    )
    notes += [f"cut off: {why}" for why in stopped]
    plain = [
        name
        for name, case in cases.items()
        if isinstance((case.get("recipe") or {}).get("gptq"), dict)
        and "token_weights" not in case["recipe"]["gptq"]
    ]
    if plain:
        notes.append(
            f"{', '.join(plain)}: calibrated with plain XᵀX, before the attention's token weights "
            "(formats/token_weights.py, 2026-12-06); not run again here since"
        )
    if notes:
        lines += [""] + [f"_{note}._" for note in notes]
    return lines


def _hqq_data_free_row(path: Path, run: dict, calibrated: dict) -> dict | None:
    """For a full-protocol GPU run without its own data-free HQQ case: qconv's data-free HQQ row of
    the same bits and group from run_hqq.py's full-protocol run on the same GPU (same source, text
    and protocol), or None."""
    recipe = calibrated.get("recipe") or {}
    if recipe.get("method") != "hqq" or run.get("max_windows") is not None:
        return None
    other = path.parent / f"hqq_smollm2_{run.get('device')}.json"
    if not other.exists():
        return None
    wanted = f"qconv hqq {recipe.get('bits')}-bit g{recipe.get('group_size')} (solver qconv)"
    rows = json.loads(other.read_text()).get("rows", [])
    return next((row for row in rows if row.get("model") == wanted and row.get("windows")), None)


def gguf_calibrated_table(path: Path, rel: str) -> list[str]:
    """run_gguf_calibrated.py: calibrated GGUF against the data-free qconv solver and llama.cpp's
    quantizer without imatrix (rows copied from gguf_smollm2_*.json) and, from the sibling
    gguf_imatrix_*.json (run_gguf_imatrix.py), llama.cpp's quantizer with an importance matrix made
    from the same calibration tokens: shown only where its calibration and windows are the
    calibrated cases' own."""
    doc = json.loads(path.read_text())
    free = doc["data_free"]
    folder = rel.rsplit("/", 1)[0] + "/" if "/" in rel else ""
    free_link = folder + Path(free["from"]).name
    imatrix_path = path.with_name(path.name.replace("gguf_calibrated_", "gguf_imatrix_", 1))
    imatrix = json.loads(imatrix_path.read_text()) if imatrix_path.is_file() else None
    fingerprints = [
        {k: v for k, v in case["calibration"].items() if k not in ("solver", "blocks")}
        for case in doc["cases"].values()
        if case.get("calibration")
    ]
    notes = []
    if imatrix is not None:
        text = imatrix["calibration_text"]
        matches = bool(fingerprints) and all(f == text["qconv_fingerprint"] for f in fingerprints)
        matches = matches and imatrix.get("max_windows") == free["max_windows"]
        link = folder + imatrix_path.name
        if matches:
            tool = imatrix["imatrix"]["file"]
            notes.append(
                f"llama.cpp + imatrix: `llama-imatrix` (llama.cpp built from the sources llama-cpp-python "
                f"{imatrix['environment'].get('llama-cpp-python')} vendors) on the BF16 file over "
                f"{tool['chunk_count']} chunks of {tool['chunk_size']} tokens, qconv's calibration sequences "
                + (
                    "(the same token ids, in order)"
                    if text["tokens_identical"]
                    else f"(NOT the same token ids: first difference at token {text['first_mismatch']})"
                )
                + (
                    f"; one imatrix for every type, {imatrix['imatrix']['process']['wall_s']:.0f} s wall on "
                    "the same shared CPU"
                    if "process" in imatrix.get("imatrix", {})
                    else ""
                )
                + f", then `llama-quantize --imatrix` ([raw JSON]({link}))"
            )
        else:
            notes.append(
                f"llama.cpp + imatrix left out: [its run]({link}) used another calibration or protocol"
            )
            imatrix = None
    lines = [
        "Calibrated GGUF (issue 17), `bench/run_gguf_calibrated.py` and `bench/run_gguf_imatrix.py`. "
        f"SmolLM2-135M-Instruct, wikitext-2 test perplexity by llama.cpp over the first {free['max_windows']} "
        f"windows of 2048 tokens (BF16 file: {free['bf16_ppl']:.2f}); calibration "
        f"{doc['calibration_settings']['calib_tokens']:,} tokens of the shipped WikiText-2 validation text "
        f"([raw JSON]({rel}), data-free rows from [{free['from']}]({free_link})):",
        "",
        "| type | calibrated qconv (GPTQ) | data-free qconv | llama.cpp (no imatrix) | llama.cpp + imatrix "
        "(same calibration tokens) | layers' output error, calibrated / data-free (median, worst) | "
        "calibration wall s (2-core CPU) |",
        "|---|---|---|---|---|---|---|",
    ]
    for file_type, case in doc["cases"].items():
        if "perplexity" not in case:
            continue
        rows = free.get(file_type, {})
        ratio = case["output_error_ratio_vs_data_free"]
        with_imatrix = ((imatrix or {}).get("cases") or {}).get(file_type) or {}
        imatrix_ppl = "failed" if "error" in with_imatrix else with_imatrix.get("perplexity")
        lines.append(
            f"| {file_type} | {case['perplexity']:.2f} | {rows['qconv_qconv']['ppl']:.2f} | "
            f"{rows['llama_cpp']['ppl']:.2f} | {perplexity_text(imatrix_ppl)} | "
            f"{ratio['median']:.2f}, {ratio['worst']:.2f} "
            f"({ratio['layers_below']} of {case['calibrated_layers']} layers below) | {case['prepare_s']:.0f} |"
        )
    if notes:
        lines += [""] + [f"_{note}._" for note in notes]
    return lines


def gguf_full_table(path: Path, rel: str) -> list[str]:
    """run_gguf_full.py: calibrated GGUF against llama.cpp + imatrix over every window."""
    doc = json.loads(path.read_text())
    lines = [
        "Calibrated GGUF against llama.cpp + imatrix under the full protocol, `bench/run_gguf_full.py`: "
        f"{doc['protocol']}, the same files' makers as the table above (calibrated qconv converted again, "
        f"llama.cpp's file from [its run]({rel.rsplit('/', 1)[0]}/{Path(doc['imatrix_run']).name})) "
        f"([raw JSON]({rel})):",
        "",
        "| type | calibrated qconv (GPTQ) | llama.cpp + imatrix | windows |",
        "|---|---|---|---|",
    ]
    for file_type, case in doc["cases"].items():
        ours, theirs = case.get("calibrated", {}), case.get("llama_imatrix", {})
        if "perplexity" not in ours or "perplexity" not in theirs:
            continue
        windows = {ours["eval"]["protocol"]["windows"], theirs["eval"]["windows"]}
        lines.append(
            f"| {file_type} | {ours['perplexity']:.2f} | {theirs['perplexity']:.2f} | "
            f"{' / '.join(str(w) for w in sorted(windows))} |"
        )
    return lines


def _calibrated_ppl(case: dict, ppl):
    """A case's perplexity, or why there is none (a failed run; one stopped before its eval ended)."""
    if "error" in case:
        return "failed"
    if ppl is None and "cut_off" in case:
        return "cut off"
    return ppl


def quantizer_throughput_table(path: Path, rel: str) -> list[str]:
    """run_gguf_quantizer.py / run_ct_quantizer.py: one method's quantizers on fixed matrices. On
    a GPU: bf16 source bytes per second of wall time. On the (shared) CPU: the process's CPU
    seconds, which other work on the machine does not inflate, and the earlier code's beside them
    where the run timed it (``--baseline``)."""
    r = json.loads(path.read_text())
    gpu = r.get("gpu")
    threads = r.get("torch_threads")
    machine = short_gpu(gpu) if gpu else f"CPU ({r.get('cpu')}, torch threads {threads})"
    gguf = path.name.startswith("gguf_")
    title = "GGUF block quantizers" if gguf else "compressed-tensors quantize (packing included)"
    shapes = ", ".join("x".join(str(n) for n in shape) for shape in r["shapes"])
    lines = [
        f"{title} on {shapes} matrices (random normal std 0.02, bf16), {machine} ([raw JSON]({rel})): "
        f"median of {r['repeats']} after a warm-up, synchronized; "
        + (
            "GB/s = bf16 source bytes per second; "
            if gpu
            else "CPU seconds of the process (a shared machine: wall time measures the other work); "
        )
        + "error: relative Frobenius error of the stored numbers dequantized, first matrix."
        + (
            " llama.cpp's `ggml_quantize_chunk` runs on the CPU only (one thread)."
            if gguf
            else " `rtn` is llm-compressor's round to nearest, byte for byte (llm-compressor is not installed "
            "on the GPU machine: its own speed is not measured)."
        ),
        "",
    ]
    if gguf and gpu:
        lines += ["| type | llama solver | qconv solver | error llama / qconv |", "|---|---:|---:|---:|"]
        for type_name, entry in r["results"].items():
            lines.append(
                f"| {type_name} | {speed(entry['llama']['gb_per_s'])} | {speed(entry['qconv']['gb_per_s'])} | "
                f"{entry['llama']['rel_error_first_matrix']:.4f} / {entry['qconv']['rel_error_first_matrix']:.4f} |"
            )
    elif gguf:

        def cpu_s(entry: dict | None) -> str:
            return f"{entry['cpu_seconds']:.2f} s" if entry and "cpu_seconds" in entry else "-"

        lines += [
            "| type | llama solver (earlier code) | qconv solver (earlier code) | llama.cpp | qconv / llama.cpp "
            "| error llama / qconv |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for type_name, entry in r["results"].items():
            ggml = entry.get("llama.cpp")
            ratio = (
                f"{entry['qconv']['cpu_seconds'] / ggml['cpu_seconds']:.0f}x"
                if ggml and ggml.get("cpu_seconds")
                else "-"
            )
            lines.append(
                f"| {type_name} | {cpu_s(entry['llama'])} ({cpu_s(entry.get('llama_before'))}) | "
                f"{cpu_s(entry['qconv'])} ({cpu_s(entry.get('qconv_before'))}) | {cpu_s(ggml)} | {ratio} | "
                f"{entry['llama']['rel_error_first_matrix']:.4f} / {entry['qconv']['rel_error_first_matrix']:.4f} |"
            )
    else:
        lines += ["| scheme | solver | throughput | error |", "|---|---|---:|---:|"]
        for case, entry in r["results"].items():
            scheme, solver = case.split(":")
            lines.append(
                f"| {scheme} | {solver} | {speed(entry['gb_per_s'])} | {entry['rel_error_first_matrix']:.4f} |"
            )
    if r.get("note"):
        lines += ["", f"_{r['note']}_"]
    return lines


GPTQ_LAYER_CASES = {
    "qconv-ct-w4a16-g128": "qconv CT W4A16 g128",
    "qconv-hqq-4bit-g64": "qconv HQQ 4-bit g64",
    "llmcompressor-actorder-static": "llm-compressor W4A16 (actorder static)",
    "llmcompressor-actorder-none": "llm-compressor W4A16 (actorder none)",
    "llmcompressor-actorder-static-eager": "llm-compressor W4A16 static, eager path",
}


def gptq_layer_table(path: Path, rel: str) -> list[str]:
    """run_gptq_layer.py: GPTQ solve seconds and H-weighted error per Llama-3-8B Linear shape, qconv
    against llm-compressor's quantize_weight, and the 32-block sum."""
    r = json.loads(path.read_text())
    names = [n for n in r["settings"] if any(n in e["cases"] for e in r["results"].values())]
    lc = r.get("llmcompressor") or {}
    backend = (r["settings"].get("llmcompressor-actorder-static") or {}).get("backend")
    where = r["environment"].get("gpu") or r["device"]
    lines = [
        "GPTQ solve per Linear shape of a Llama-3-8B block (issues 17, 19): random bf16 weights (std 0.02), "
        f"H = X^T X of {r['calibration_input']['tokens']} made-up activation rows (log-normal channel scales, "
        "a shared low-rank part, outlier channels; not a real model's), the same W and H for every solver; "
        f"{where}, median of {r['repeats']} timed runs after a warm-up ([raw JSON]({rel})). llm-compressor "
        f"{lc.get('llmcompressor', '?')} (compressed-tensors {lc.get('compressed-tensors', '?')}): its own "
        f"`quantize_weight`{f', {backend}' if backend else ''}. Cells: solve seconds (relative output "
        "error tr((W-Q)H(W-Q)^T)/tr(WHW^T)).",
        "",
        "| shape (layers) | "
        + " | ".join(GPTQ_LAYER_CASES.get(n, n) for n in names)
        + " | time, qconv CT / llm-compressor static |",
        "|---|" + "---:|" * (len(names) + 1),
    ]

    def ratio(cases: dict, key: str = "solve_s") -> str:
        ours, theirs = cases.get("qconv-ct-w4a16-g128"), cases.get("llmcompressor-actorder-static")
        if not ours or not theirs or not theirs[key]:
            return "-"
        return f"{ours[key] / theirs[key]:.2f}x"

    for shape, entry in r["results"].items():
        cells = []
        for name in names:
            case = entry["cases"].get(name)
            cells.append("-" if case is None else f"{case['solve_s']:.3f} s ({case['rel_output_error']:.4f})")
        label = f"{shape} ({', '.join(entry['layers'])})"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {ratio(entry['cases'])} |")
    estimate = (r.get("estimate_8b") or {}).get("cases", {})
    if estimate:
        cells = [f"**{estimate[n]['model_s']:.0f} s**" if n in estimate else "-" for n in names]
        ours, theirs = estimate.get("qconv-ct-w4a16-g128"), estimate.get("llmcompressor-actorder-static")
        tail = f"{ours['model_s'] / theirs['model_s']:.2f}x" if ours and theirs and theirs["model_s"] else "-"
        lines.append("| **32 blocks (8B), solve only** | " + " | ".join(cells) + f" | {tail} |")
        lines += [
            "",
            "_32 x the block's seven Linears; excludes X^T X accumulation, block forwards, reading and "
            "writing the model, and llm-compressor's batching of same-shape modules._",
        ]
    return lines


def _rendered(render, path: Path, rel: str) -> list[str]:
    """One file's lines, or a note saying why it could not be rendered (a partial or failed run
    must not stop the report)."""
    try:
        return render(path, rel) + [""]
    except (OSError, ValueError, KeyError, TypeError, IndexError, ZeroDivisionError) as exc:
        print(f"report: {path.name} not rendered ({type(exc).__name__}: {exc})", file=sys.stderr)
        return [f"_{path.name}: not rendered ({type(exc).__name__}: {exc})_", ""]


PER_FILE = (
    ("convert_nf4_8b_*.json", convert_table),
    ("load_8b_*.json", load_table),
    ("smollm2_nf4_gpu_*.json", smollm2_lines),
    ("hqq_quantizer_*.json", hqq_quantizer_table),
    ("hqq_smollm2_*.json", hqq_smollm2_table),
    ("eetq_smollm2_*.json", eetq_smollm2_table),
    ("aqlm_block8b_*.json", aqlm_block8b_table),
    ("aqlm_reference_*.json", aqlm_reference_table),
    ("ct_smollm2_*.json", ct_smollm2_table),
    ("gguf_smollm2_*.json", gguf_table),
    ("calibrated_smollm2_*.json", calibrated_table),
    ("gptq_layer_*.json", gptq_layer_table),
    ("gguf_calibrated_smollm2_*.json", gguf_calibrated_table),
    ("gguf_calibrated_full_smollm2_*.json", gguf_full_table),
    ("gguf_quantizer_*.json", quantizer_throughput_table),
    ("ct_quantizer_*.json", quantizer_throughput_table),
)


def tables(results: Path, link_prefix: str, root: Path, image: str | None = None) -> list[str]:
    """Every table, as markdown lines. Links are ``link_prefix`` + the file's path under
    ``root``; ``image``, when given, is the plot's link, shown under the summary table."""
    lines: list[str] = []
    try:
        rows, bf16 = format_rows(results)
        summary = formats_table(rows, bf16, link_prefix, root)
    except (ValueError, KeyError, TypeError, IndexError, ZeroDivisionError) as exc:
        print(f"report: the format summary not rendered ({type(exc).__name__}: {exc})", file=sys.stderr)
        summary = [f"_format summary: not rendered ({type(exc).__name__}: {exc})_"]
    if summary:
        lines += summary + [""]
        if image:
            lines += [f"![perplexity against bits per weight]({image})", ""]
    for pattern, render in PER_FILE:
        for path in sorted(results.glob(pattern)):
            if "_quick" not in path.name:
                lines += _rendered(render, path, link_prefix + path.relative_to(root).as_posix())
    return lines


START, END = "<!-- bench:start (bench/report.py) -->", "<!-- bench:end -->"


def _prefix(root: Path, page_folder: Path) -> str:
    """What links from a page in ``page_folder`` start with to reach ``root``: ``../`` or ``""``."""
    relative = Path(os.path.relpath(root, page_folder)).as_posix()
    return "" if relative == "." else relative + "/"


def write_report(results: Path, docs: Path, readme: Path | None, root: Path) -> str:
    """docs/bench.md (and docs/bench.png where matplotlib is installed) and README's block
    between START and END; returns the page's text."""
    rows, bf16 = format_rows(results)
    drawn = plot(rows, bf16, docs / "bench.png")
    head = [
        "# Benchmarks",
        "",
        "Produced by `make bench` on the GPU machine; rendered by `python bench/report.py`.",
        "",
    ]
    text = "\n".join(head + tables(results, _prefix(root, docs), root, "bench.png" if drawn else None))
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "bench.md").write_text(text)
    if readme is not None and readme.is_file():
        content = readme.read_text()
        if START in content and END in content:
            before, rest = content.split(START, 1)
            after = rest.split(END, 1)[1]
            image = Path(os.path.relpath(docs / "bench.png", readme.parent)).as_posix() if drawn else None
            block = "\n".join(tables(results, _prefix(root, readme.parent), root, image))
            readme.write_text(before + START + "\n" + block + END + after)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the JSON")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs", help="where bench.md and bench.png go")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md", help="'none': leave it alone")
    parser.add_argument("--root", type=Path, default=ROOT, help="links are relative to this folder")
    args = parser.parse_args()
    readme = None if str(args.readme) == "none" else args.readme
    print(write_report(args.results, args.docs, readme, args.root))


if __name__ == "__main__":
    main()
