#!/usr/bin/env bash
# Fill the ignored .dev/lcsite with what bench/run_gptq_layer.py needs on the lent GPU machine to
# run llm-compressor's own GPTQ solve (llmcompressor/modifiers/gptq/gptq_quantize.py) beside qconv's:
#   llmcompressor 0.14.0.1 and the compressed-tensors it pins (0.19.0), with their dist-info;
#   pydantic + pydantic-core (built for CPython 3.12, manylinux x86-64), annotated-types,
#   typing-inspection, typing-extensions (pydantic 2.14 needs >= 4.16) and loguru, which
#   compressed-tensors and llm-compressor import at module level.
# That machine's image (../.library KINDS.md package list) has torch 2.11, transformers 5.17,
# triton, numpy, psutil, pyyaml, but none of these. llmcompressor's top-level __init__ (datasets,
# oneshot, ...) is NOT run there: run_gptq_layer.py imports the gptq module alone (its docstring).
# compressed-tensors 0.19.0 also lets transformers load qconv's compressed-tensors artifacts there
# (qconv's `compressed-tensors` extra asks for >= 0.19).
# Run it from the project root; it prints the folder's size (each carry is at most 64 MiB in all,
# with .dev/site and the checkout). `PYVER=3.11 bash bench/pack_lcsite.sh .dev/lcsite311` builds
# the same for another CPython (pydantic-core is the one binary), to smoke-test it on this machine.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
pyver=${PYVER:-3.12}
site=${1:-.dev/lcsite}
whl=.dev/lcwhl-cp${pyver/./}
mkdir -p "$whl" "$site"
git check-ignore -q "$site" || { echo '.dev/ is not ignored here (.gitignore)' >&2; exit 1; }
plat="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
# exact versions: those of the llm-compressor venv the CPU rows were measured with (lc-venv)
pkgs="llmcompressor==0.14.0.1 compressed-tensors==0.19.0 pydantic==2.14.4 pydantic-core==2.50.5
annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 loguru==0.7.3"
if [ -z "$(ls "$whl")" ]; then
  # --no-deps: llmcompressor's own requirements (datasets, accelerate, auto-round, ...) are for
  # its oneshot entry point, which the bench does not run
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    $plat -d "$whl" $pkgs
fi
rm -rf "${site:?}"/*
for w in "$whl"/*.whl; do python3 -m zipfile -e "$w" "$site"; done
find "$site" -name '__pycache__' -type d -prune -exec rm -rf {} +
ls "$whl"
du -sh "$site"
