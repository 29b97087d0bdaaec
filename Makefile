# dpo_lightning — `make help` lists the targets.
# Everything runs inside the project's own virtual environment (.venv), created by `make install`.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch is pinned to the CPU build these machines have; on a CUDA host: make install TORCH=torch==2.13.0+cu128
TORCH  ?= torch==2.13.0
# bench: a pinned trl, so `make test` also runs the TRL side-by-side checks (the package itself never imports it)
EXTRAS ?= dev,reproduce,bench
# wandb's sweep engine, installed without its numpy<2 pin (pyproject.toml lists what it needs)
SWEEPS_VERSION := 0.3.0
STAMP  := $(VENV)/.installed-$(shell echo '$(TORCH) $(EXTRAS) sweeps$(SWEEPS_VERSION)' | tr -c 'a-zA-Z0-9.=\n' '_')
export PYTHONUNBUFFERED := 1
# offline-first: wandb logs to disk unless the user is logged in or sets WANDB_MODE (see dpo_lightning/cli.py)
export TOKENIZERS_PARALLELISM ?= false

.DEFAULT_GOAL := help
.PHONY: help install test test-full lint format reproduce reproduce-quick bench tiny sweep clean

help:  ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "}{printf "  make %-16s %s\n", $$1, $$2}'

install: $(STAMP)  ## create .venv: torch first (pinned by TORCH), then the package and its extras

$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	echo '$(TORCH)' > $(VENV)/constraints.txt
	$(BIN)/pip install -q -c $(VENV)/constraints.txt '$(TORCH)'
	$(BIN)/pip install -q -c $(VENV)/constraints.txt -e '.[$(EXTRAS)]'
	$(BIN)/pip install -q --no-deps 'sweeps==$(SWEEPS_VERSION)'  # wandb's sweep engine; its deps come with the package
	rm -f $(VENV)/.installed-* && touch $@

test: install  ## fast test suite (no `slow` tests), hermetic (caches in a temp folder), < 8 min on 2 CPU cores
	$(BIN)/python -m pytest -q -m "not slow" --durations=15

test-full: install  ## every test, the slow ones included
	$(BIN)/python -m pytest -q --durations=15

lint: install  ## ruff lint and format check
	$(BIN)/ruff check dpo_lightning tests
	$(BIN)/ruff format --check dpo_lightning tests

format: install  ## ruff format + autofix
	$(BIN)/ruff format dpo_lightning tests
	$(BIN)/ruff check --fix dpo_lightning tests

SEED ?= 0
# SEEDS: training seeds per Part-2 method (SEED, SEED+1, ...); the bootstrap then resamples seeds and prompts
SEEDS ?= 1
reproduce: install  ## the papers' claims, Parts 1+2, with verdicts from bootstrap intervals (<= 30 min on 2 CPU cores) -> reports/reproduce/
	$(BIN)/python -m dpo_lightning.reproduce --seed $(SEED) --seeds $(SEEDS) --out reports/reproduce

reproduce-quick: install  ## Part 1 in full + Part 2 at toy size (<= 5 min) -> reports/reproduce/
	$(BIN)/python -m dpo_lightning.reproduce --quick --seed $(SEED) --out reports/reproduce

bench: install  ## ours (padded, packed, prompt-shared) vs TRL's DPOTrainer side by side with MFU, levers, scaling (~20 min on 2 cores) -> reports/bench/
	$(BIN)/pip install -q -c $(VENV)/constraints.txt -e '.[$(EXTRAS),bench]'  # a no-op with the default EXTRAS
	$(BIN)/python -m dpo_lightning.bench --out reports/bench

SWEEP ?= loss_variants
# SWEEP_FILE: another file of the same sweep name, e.g. a reduced budget
SWEEP_FILE ?= sweeps/$(SWEEP).yaml
# SWEEP_OUT: the sweep's folder (the runner's --out), charted into SWEEP_OUT/compare
SWEEP_OUT ?= runs/sweeps/$(SWEEP)
sweep: install  ## run sweeps/$(SWEEP).yaml offline, then chart it: make sweep SWEEP=label_noise ARGS="--workers 2"
	$(BIN)/dpo-lightning sweep $(SWEEP_FILE) --out $(SWEEP_OUT) $(ARGS)
	$(BIN)/dpo-lightning compare $(SWEEP_OUT) --out $(SWEEP_OUT)/compare

tiny: install  ## train the tiny CPU config on the HH data (1-2 min)
	$(BIN)/dpo-lightning fit --config experiments/tiny_cpu.yaml

clean:  ## remove run outputs (keeps .venv)
	rm -rf runs wandb lightning_logs .pytest_cache
