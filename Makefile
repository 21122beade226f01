# One entry point. `make demo` and `make test` set up a local virtual environment first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Exact versions: torch 2.13.0 is the CPU build on machines without CUDA; Triton 3.6's interpreter
# fails with numpy >= 2.4.
REQUIREMENTS := torch==2.13.0 triton==3.6.0 "numpy<2.4" einops rich matplotlib pytest "transformers==5.23.0"
# Where `make gpu` writes everything it produces.
OUT ?= out

.PHONY: setup demo test gpu gpu-test gpu-bench gpu-example clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(REQUIREMENTS)
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

# The main job: the kernels against the reference, then a small benchmark sweep.
demo: setup
	$(VENV)/bin/flash-softmax verify
	$(VENV)/bin/flash-softmax bench

test: setup
	$(PY) -m pytest -q

# On a machine with a GPU and the packages already installed, everything written under $(OUT):
# `gpu-test` runs the whole suite compiled on the GPU and the full verify grid, `gpu-bench` the benchmark
# sweeps (attention and softmax), `gpu-example` the GPT example at full size with both attentions.
gpu: gpu-test gpu-bench

gpu-test:
	mkdir -p $(OUT)
	nvidia-smi > $(OUT)/nvidia-smi.txt 2>&1 || true
	PYTHONPATH=. $(PYTHON) -m pytest -q -rs 2>&1 | tee $(OUT)/pytest.txt
	PYTHONPATH=. $(PYTHON) -m flash_softmax verify 2>&1 | tee $(OUT)/verify.txt

gpu-bench:
	mkdir -p $(OUT)
	PYTHONPATH=. $(PYTHON) -m flash_softmax bench --out $(OUT)/results 2>&1 | tee $(OUT)/bench.txt
	PYTHONPATH=. $(PYTHON) -m flash_softmax bench --op softmax --out $(OUT)/results 2>&1 | tee $(OUT)/bench_softmax.txt
	PYTHONPATH=. $(PYTHON) -m flash_softmax bench --op log_softmax --out $(OUT)/results 2>&1 | tee $(OUT)/bench_log_softmax.txt

gpu-example:
	mkdir -p $(OUT)
	PYTHONPATH=. $(PYTHON) examples/gpt.py --compare --out $(OUT)/gpt 2>&1 | tee $(OUT)/gpt.txt

clean:
	rm -rf $(VENV) .pytest_cache
