# One entry point. `make demo` and `make test` set up a local virtual environment first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Exact versions: torch 2.13.0 is the CPU build on machines without CUDA; Triton 3.6's interpreter
# fails with numpy >= 2.4. The package itself comes with every extra of pyproject.toml.
REQUIREMENTS := torch==2.13.0 triton==3.6.0 "numpy<2.4" "transformers==5.23.0"
EXTRAS := bench,hf,interpreter,test
# Where `make gpu` writes everything it produces.
OUT ?= out

.PHONY: setup demo test gpu gpu-dry-run gpu-test gpu-bench gpu-example clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(REQUIREMENTS) -e ".[$(EXTRAS)]"
	touch $(STAMP)

setup: $(STAMP)

# The main job: the kernels against the reference, then a small benchmark sweep.
demo: setup
	$(VENV)/bin/flash-softmax verify
	$(VENV)/bin/flash-softmax bench

# Two worker processes: the interpreter runs one program at a time on one core, and the suite takes about
# 8 minutes on two cores this way instead of 14.
test: setup
	$(PY) -m pytest -q -n 2

# On a machine with a GPU and the packages already installed, everything written under $(OUT).
# `gpu` is one session's worth, in about 9 minutes on an H100/H200 (scripts/gpu_check.sh: nvidia-smi,
# info, the suite compiled on the GPU, `flash-softmax tune`, the benchmark sweeps; $(OUT)/summary.txt).
# `gpu-dry-run` runs the same script at tiny sizes in Triton's interpreter, on any machine.
# Without a time limit: `gpu-test` runs the whole suite and the full verify grid, `gpu-bench` the default
# benchmark sweeps (attention, softmax, a packed varlen batch and a decoding step), `gpu-example` the GPT example at
# full size with both attentions.
gpu:
	OUT=$(OUT) PYTHON=$(PYTHON) scripts/gpu_check.sh

gpu-dry-run: setup
	OUT=$(OUT)/dry-run PYTHON=$(PY) scripts/gpu_check.sh --dry-run

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
	PYTHONPATH=. $(PYTHON) -m flash_softmax bench --varlen --out $(OUT)/results 2>&1 | tee $(OUT)/bench_varlen.txt
	PYTHONPATH=. $(PYTHON) -m flash_softmax bench --decode --out $(OUT)/results 2>&1 | tee $(OUT)/bench_decode.txt

gpu-example:
	mkdir -p $(OUT)
	PYTHONPATH=. $(PYTHON) examples/gpt.py --compare --out $(OUT)/gpt 2>&1 | tee $(OUT)/gpt.txt

clean:
	rm -rf $(VENV) .pytest_cache
