# Two commands for a newcomer: `make demo` and `make test`. Each creates or updates .venv itself.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist
PYTEST_ARGS ?=

.PHONY: demo test test-avx2 data venv bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

data:
	@test -e $(FMNIST)/train-images-idx3-ubyte.gz || test -e $(FMNIST)/train-images-idx3-ubyte || \
	  { echo "installing Debian's dataset-fashion-mnist"; \
	    if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	    else sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist; fi; }

demo: $(STAMP) data
	$(VENV)/bin/autocompress search examples/fashion_mnist.yaml --out runs/demo-$$(date +%Y%m%d-%H%M%S)

test: $(STAMP) data
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest $(PYTEST_ARGS)

# The speed-comparing tests again, with torch and oneDNN held to AVX2: on an AVX-512 machine this shows what a CPU
# with AVX2 alone does (bf16 emulated, 8-18x slower than fp32); on an AVX2 machine it changes nothing.
test-avx2: $(STAMP) data
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -m speed $(PYTEST_ARGS)

bench: $(STAMP) data
	$(PY) bench/run_all.py

clean:
	rm -rf runs .pytest_cache
