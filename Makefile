# Two commands on a fresh machine (see README.md):
#   make demo   installs everything, then runs the optimizer comparison on the built-in digits data
#   make test   installs everything, then runs the test suite
#   make study  installs everything, then answers the beta1, warmup and clipping questions on digits (3 seeds each)
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# A CPU build of torch installs in seconds; a bare `torch` requirement would pull several GB of CUDA wheels.
# An already installed torch (e.g. a CUDA build on a GPU machine) is kept.
TORCH_SPEC ?= torch==2.13.0
# Every other package at the exact release CI tested (see constraints.txt, resolved on CPython 3.11: another Python
# resolves afresh, as `make install LOCK=` does anywhere).
LOCK ?= $(shell $(PYTHON) -c 'import sys; print("constraints.txt" if sys.version_info[:2] == (3, 11) else "")')
DEMO_DIR ?= outputs/demo

.PHONY: install lock demo study test lint bench clean

install:
	@test -n "$(LOCK)" || echo "note: installing without a lock (constraints.txt is resolved for CPython 3.11): the newest releases"
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet $(if $(LOCK),--constraint $(LOCK)) -e ".[test]"

# Move the lock on purpose: the newest releases that pyproject.toml admits, resolved in a scratch venv beside torch.
# Then run `make test` and commit constraints.txt with what the new releases needed.
LOCK_VENV := .lock-venv
lock:
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	$(LOCK_VENV)/bin/python -m pip install --quiet -e ".[test]"
	sed -n '/^#/p' constraints.txt > $(LOCK_VENV)/constraints.txt
	$(LOCK_VENV)/bin/python -m pip freeze --exclude-editable | grep -v '^torch==' >> $(LOCK_VENV)/constraints.txt
	mv $(LOCK_VENV)/constraints.txt constraints.txt && rm -rf $(LOCK_VENV)
	git diff --stat constraints.txt

# The classic advice's four (SGD with momentum, RMSProp, Adam, AdamW) plus Lion and Prodigy, each at its family's
# usual learning-rate scale for this model, with warmup, cosine decay and clipping; ~8 minutes on 2 CPU cores.
DEMO_OPTIMIZERS ?= sgd:lr=0.05,momentum=0.9 rmsprop:lr=5e-4 adam:lr=2e-3 adamw:lr=2e-3,weight_decay=0.01 \
	lion:lr=2e-4,weight_decay=0.1 prodigy
DEMO_FLAGS ?= --model_preset tiny --resolution 8 --ddpm_beta_schedule squaredcos_cap_v2 \
	--max_train_steps 1600 --train_batch_size 64 --lr_scheduler cosine --lr_warmup_steps 50 --max_grad_norm 1.0 \
	--use_ema --logging_steps 50 --validation_steps 100 --sample_steps 800 --eval_steps 800 \
	--num_inference_steps 100 --num_eval_samples 256 --report_to wandb

demo: install
	$(PYTHON) -m diffusers_optim.cli compare --optimizers $(DEMO_OPTIMIZERS) --seeds 0 --num_parallel 2 \
		--output_dir $(DEMO_DIR) $(DEMO_FLAGS)
	@echo "open $(DEMO_DIR)/report.html"

# The founding questions, one comparison each, 3 seeds per arm, ranked with 95% intervals (see README "Studies").
# 48 runs of 800 steps at batch 32, ~45 CPU-seconds each (README "Studies": ~18 min on 2 free cores, estimated).
# `make -o install study` skips the install on a machine that has it.
STUDY_DIR ?= outputs/study
STUDY_SEEDS ?= 0 1 2
STUDY_FLAGS ?= --model_preset tiny --resolution 8 --ddpm_beta_schedule squaredcos_cap_v2 --max_train_steps 800 \
	--train_batch_size 32 --lr_scheduler cosine --use_ema --logging_steps 50 --validation_steps 100 \
	--sample_steps 800 --eval_steps 0 --num_inference_steps 50 --num_eval_samples 256 --report_to none
STUDY_ADAMW ?= adamw:lr=2e-3,weight_decay=0.01
STUDY_SGD ?= sgd:lr=0.05,momentum=0.9
STUDY := $(PYTHON) -m diffusers_optim.cli compare --seeds $(STUDY_SEEDS) --num_parallel 2

study: install
	$(STUDY) --optimizers adam:lr=2e-3 --grid adam_beta1=0.5,0.8,0.9,0.99 --output_dir $(STUDY_DIR)/beta1 $(STUDY_FLAGS)
	$(STUDY) --optimizers $(STUDY_ADAMW) $(STUDY_SGD) --grid lr_warmup_steps=0,100,500 \
		--output_dir $(STUDY_DIR)/warmup $(STUDY_FLAGS)
	$(STUDY) --optimizers $(STUDY_ADAMW) $(STUDY_SGD) --grid max_grad_norm=0,1.0,0.1 \
		--output_dir $(STUDY_DIR)/clipping $(STUDY_FLAGS)
	@echo "open $(STUDY_DIR)/*/report.html"

# One torch thread per process, one xdist worker per core: tiny models scale badly across threads.
test: install
	DIFFUSERS_OPTIM_LOCK=$(LOCK) OMP_NUM_THREADS=1 $(PYTHON) -m pytest -q -n auto --maxschedchunk 1 --durations=15

lint:
	$(PYTHON) -m ruff check diffusers_optim train_scripts tests benchmarks scripts

bench: install
	$(PYTHON) benchmarks/bench_trainer_overhead.py

clean:
	rm -rf outputs .pytest_cache
