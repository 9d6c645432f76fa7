# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export RAY_AUTH_MODE ?= disabled
export NO_ALBUMENTATIONS_UPDATE := 1
export RAY_USAGE_STATS_ENABLED := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-slow lint bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -qq --upgrade pip
	$(BIN)/python -m pip install -qq -e '.[dev,cpu]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/capfilt run pipelines/demo.yaml

lint: $(STAMP)
	$(BIN)/ruff check capfilt tests benchmarks experiments
	$(BIN)/ruff format --check capfilt tests benchmarks experiments
	$(BIN)/mypy capfilt
	$(BIN)/hadolint docker/Dockerfile

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python benchmarks/download.py

clean:
	rm -rf $(VENV) runs
