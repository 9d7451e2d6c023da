# gptpipe set-up: both targets create .venv on first use and reuse it after.
#   make pipeline   install, then run the whole pipeline on the builtin corpus (dvc repro)
#   make test       install with test tools, then ruff and the test suite
#   make docs       rewrite the generated blocks of README.md and docs/*.md from metrics/*.json
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: pipeline test lint docs install clean-venv

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

pipeline: install
	test -d .git || git init --quiet
	dvc repro
	@$(BIN)/python -m pipeline.report

lint: install
	ruff check .

docs: install
	python -m pipeline.docs

test: install
	ruff check .
	python -m pytest -q -n 2 --dist loadfile

clean-venv:
	rm -rf $(VENV)
