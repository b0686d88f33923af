# Two commands on a fresh machine (see README.md):
#   make demo   installs everything, then runs the optimizer comparison on the built-in digits data
#   make test   installs everything, then runs the test suite
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# A CPU build of torch installs in seconds; a bare `torch` requirement would pull several GB of CUDA wheels.
# An already installed torch (e.g. a CUDA build on a GPU machine) is kept.
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= outputs/demo

.PHONY: install demo test lint bench clean

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[test]"

demo: install
	$(PYTHON) -m diffusers_optim.cli compare --config configs/demo.yaml --output_dir $(DEMO_DIR)

test: install
	$(PYTHON) -m pytest -q

lint:
	$(PYTHON) -m ruff check diffusers_optim train_scripts tests benchmarks scripts

bench: install
	$(PYTHON) benchmarks/bench_trainer_overhead.py

clean:
	rm -rf outputs .pytest_cache
