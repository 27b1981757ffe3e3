# Two commands for a newcomer:  `make serve` (set up, then serve the embedded demo)  and  `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 3000
# Loopback only by default. Another address only on the command line: `make serve HOST=0.0.0.0` (plain `=`, not `?=`:
# some shells export HOST as the machine's name). Without API_SECRET_KEY the gateway refuses a non-loopback address.
HOST = 127.0.0.1
# torch/torchvision are pinned for this project's dev machines (x86_64, Python 3.11: taken from local disk);
# a GPU box can use any CUDA build >= 2.11 (requirements.txt).
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup serve test test-deps lint build bench clean

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

serve: setup
	@echo "================================================================================"
	@echo " Serving the EMBEDDED DEFAULT on http://$(HOST):$(PORT)"
	@echo "   model   : SAM3_WEIGHTS_PATH=$${SAM3_WEIGHTS_PATH:-demo}  (demo = tiny RANDOM weights)"
	@echo "   storage : $${R2_ENDPOINT:-local directory var/storage (no R2)}"
	@echo "   tasks   : $${SUPABASE_URL:-no Supabase: rows are not updated}"
	@if [ -n "$$API_SECRET_KEY" ]; then auth="X-API-Key required"; else auth="none (dev mode)"; fi; \
		echo "   auth    : $$auth"
	@echo " Real weights: SAM3_WEIGHTS_PATH=facebook/sam3 HF_TOKEN=... make serve (see README)"
	@echo "================================================================================"
	SAM3_WEIGHTS_PATH=$${SAM3_WEIGHTS_PATH:-demo} $(PY) -m bentoml serve service:Gateway --host $(HOST) --port $(PORT)

test-deps:
	bash scripts/install-test-deps.sh

test: setup test-deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

build: setup
	$(VENV)/bin/bentoml build

bench: setup
	$(PY) bench/run.py --device auto

clean:
	rm -rf $(VENV) var .pytest_cache
