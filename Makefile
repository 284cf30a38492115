# One command sets up and runs each job on a fresh machine:
#   make demo   build the SmolLM2 fixture, convert it to gguf-q4, register both, print how to open the UI
#   make test   the default test suite (SQLite and PostgreSQL registry tests, tiny models), then the
#               fidelity checks against llama.cpp on the real SmolLM2 model
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.llmops-installed
SHARED_EVAL := $(abspath ../shared/data/wikitext-2-raw/wiki.test.raw)
export LLMOPS_EVAL_TEXT ?= $(if $(wildcard $(SHARED_EVAL)),$(SHARED_EVAL),)
export GPTQMODEL_CPU_WORKERS ?= 2

.PHONY: install demo test test-fidelity test-slow bench bench-7b ui clean chaos

install: $(STAMP)

# torch first, pinned to the CPU build: a bare `torch` requirement would pull a multi-GB CUDA build.
# llama-cpp-python compiles llama.cpp on first install (several minutes on 2 cores; pip caches the wheel).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install "torch==2.13.0"
	$(BIN)/python -m pip install -e ".[dev,postgres,fleet]"
	@touch $(STAMP)

demo: $(STAMP)
	@bash scripts/demo.sh

# The default suite, then the fidelity subset of the slow tests (byte identity with llama.cpp's
# converter and quantizer, tokenizer identity on wikitext-2, the reference perplexities).
test: $(STAMP)
	@bash scripts/install-browser.sh
	@bash scripts/install-postgres.sh
	$(BIN)/pytest -q
	$(BIN)/pytest -q -m fidelity

test-fidelity: $(STAMP)
	$(BIN)/pytest -q -m fidelity

test-slow: $(STAMP)
	$(BIN)/pytest -q -m slow

# Conversion speed/memory against llama.cpp's tools, then every target through `llmops bench`
# beside llama.cpp's llama-perplexity and llama-bench (built once into ~/.cache/llmops), then
# GPTQ conversion against GPTQModel called directly.
bench: $(STAMP)
	$(BIN)/python bench/bench_convert.py
	$(BIN)/python bench/bench_formats.py
	$(BIN)/python bench/bench_gptq.py
	$(BIN)/python bench/bench_lineage.py
	$(BIN)/python bench/bench_register.py
	$(BIN)/python bench/bench_fleet.py
	$(BIN)/python bench/bench_tasks.py --limit 100
	$(BIN)/python bench/bench_serve.py

# A synthetic Llama-7B-shaped bf16 checkpoint (32 layers, 13.5 GB, written and removed by the
# script; about 35 GB of free disk) to gguf-q4 against llama.cpp's two steps, then registering the
# result against cp + sync: about twenty minutes on 2 cores. LAYERS=N scales it down.
LAYERS ?= 32
bench-7b: $(STAMP)
	$(BIN)/python bench/bench_convert.py --llama7b $(LAYERS)

ui: $(STAMP)
	$(BIN)/llmops ui

# The fault campaign: over a thousand seeded faults (SIGKILL at random points of every command that
# writes, dropped and unreachable PostgreSQL, a restarted tracking server, full disks, EIO), each
# followed by doctor, gc, doctor and the command again; the reliability table lands in
# test-output/chaos/campaign.md. CHAOS_SEED=N draws another campaign. Root for the tmpfs cases.
CHAOS_SEED ?= 1517
chaos: $(STAMP)
	@bash scripts/install-postgres.sh
	LLMOPS_CHAOS=1 LLMOPS_CHAOS_SEED=$(CHAOS_SEED) $(BIN)/pytest -q tests/test_faults.py -m "not slow" \
		--timeout 7200 --durations=0

clean:
	rm -rf $(VENV) .llmops build dist *.egg-info
