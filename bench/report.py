"""Render bench/results/*.json as the markdown tables quoted in README (docs/bench.md).

python bench/report.py            # writes docs/bench.md and prints it
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def convert_table(path: Path, link_prefix: str) -> list[str]:
    r = json.loads(path.read_text())
    rel = link_prefix + str(path.relative_to(ROOT))
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


def smollm2_lines(path: Path, link_prefix: str) -> list[str]:
    r = json.loads(path.read_text())
    rel = link_prefix + str(path.relative_to(ROOT))
    return [
        f"SmolLM2-135M-Instruct (Q4_1 gguf) to nf4 on the GPU ([raw JSON]({rel})): packed bytes equal "
        f"bitsandbytes' own functions on the same GPU in all {r['layers']} layers: "
        f"**{r['bytes_equal_bitsandbytes_gpu']}**; stock transformers' logits vs qconv's dequantized reference: "
        f"relative difference {r['logits']['loader_rel_diff']:.1e}; vs the bf16 source on the verify prompts: "
        f"top-1 agreement {r['logits']['top1_agreement']:.3f}, KL {r['logits']['kl']:.3f}.",
    ]


def hqq_quantizer_table(path: Path, link_prefix: str) -> list[str]:
    r = json.loads(path.read_text())
    rel = link_prefix + str(path.relative_to(ROOT))
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


def hqq_smollm2_table(path: Path, link_prefix: str) -> list[str]:
    r = json.loads(path.read_text())
    rel = link_prefix + str(path.relative_to(ROOT))
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


def eetq_smollm2_table(path: Path, link_prefix: str) -> list[str]:
    r = json.loads(path.read_text())
    rel = link_prefix + str(path.relative_to(ROOT))
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


def tables(link_prefix: str) -> list[str]:
    lines: list[str] = []
    for path in sorted(RESULTS.glob("convert_nf4_8b_*.json")):
        lines += convert_table(path, link_prefix) + [""]
    for path in sorted(RESULTS.glob("smollm2_nf4_gpu_*.json")):
        lines += smollm2_lines(path, link_prefix) + [""]
    for path in sorted(RESULTS.glob("hqq_quantizer_*.json")):
        if "_quick" not in path.name:
            lines += hqq_quantizer_table(path, link_prefix) + [""]
    for path in sorted(RESULTS.glob("hqq_smollm2_*.json")):
        if "_quick" not in path.name:
            lines += hqq_smollm2_table(path, link_prefix) + [""]
    for path in sorted(RESULTS.glob("eetq_smollm2_*.json")):
        if "_quick" not in path.name:
            lines += eetq_smollm2_table(path, link_prefix) + [""]
    return lines


START, END = "<!-- bench:start (bench/report.py) -->", "<!-- bench:end -->"


def main() -> None:
    head = [
        "# Benchmarks",
        "",
        "Produced by `make bench` on the GPU machine; rendered by `python bench/report.py`.",
        "",
    ]
    text = "\n".join(head + tables("../"))
    (ROOT / "docs").mkdir(exist_ok=True)
    (ROOT / "docs" / "bench.md").write_text(text)
    readme = ROOT / "README.md"
    if readme.is_file():
        content = readme.read_text()
        if START in content and END in content:
            before, rest = content.split(START, 1)
            after = rest.split(END, 1)[1]
            readme.write_text(before + START + "\n" + "\n".join(tables("")) + END + after)
    print(text)


if __name__ == "__main__":
    main()
