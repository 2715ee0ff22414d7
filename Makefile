# Everything runs from a project-local virtual environment, created on first use.
# TORCH_SPEC picks the PyTorch build: the CPU wheel by default; GPU users pass e.g.
#   make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(EXTRAS)
PYTEST_ARGS ?=
ARGS ?=

.PHONY: help install lint format typecheck pytest test train clean

help:
	@echo "make train   set up $(VENV) and train the default experiment (ARGS='key=value ...')"
	@echo "make test    set up $(VENV), then ruff, mypy and pytest (PYTEST_ARGS='...')"
	@echo "make lint | typecheck | pytest | format | clean"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(STAMP)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: install
	$(BIN)/mypy

pytest: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test: lint typecheck pytest

train: install
	$(BIN)/lit-vae-train $(ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache
