# gptpipe set-up: both targets create .venv on first use and reuse it after.
#   make pipeline   install what the pipeline runs, then run it on the builtin corpus (dvc repro)
#   make test       install that and the test tools, then ruff and the test suite
#   make docs       rewrite the generated blocks of README.md and docs/*.md from metrics/*.json
#   make lock       resolve pyproject.toml again and rewrite the two lock files
# Both install exact versions from requirements/*.lock, so an install made months later
# computes the same bits (a newer torch, numpy or tokenizers may not).
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
PIPELINE_LOCK := requirements/pipeline.lock
TEST_LOCK := requirements/test.lock
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: pipeline test lint docs install lock clean-venv

# The pipeline's packages from its lock, then gptpipe itself without resolving anything.
$(VENV)/.pipeline: pyproject.toml $(PIPELINE_LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r $(PIPELINE_LOCK)
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

# The test tools and the Transformers, lm-eval and TRL extras on top.
$(VENV)/.installed: $(VENV)/.pipeline $(TEST_LOCK)
	$(BIN)/python -m pip install --quiet -r $(TEST_LOCK)
	touch $@

install: $(VENV)/.installed

pipeline: $(VENV)/.pipeline
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

# A clean venv resolves gptpipe alone (the pipeline's set of packages), then with its test
# extras; both locks take their versions from that one resolution, so they agree. Editable
# installs: nothing is built in the work tree. torch's local build label (+cpu) is dropped:
# a GPU machine installs the CUDA build of that version.
LOCK_VENV := $(VENV)/lock-resolution
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install --quiet -e .
	$(LOCK_VENV)/bin/python -m pip freeze --exclude gptpipe | sed 's/+[a-z0-9.]*$$//' \
		> $(LOCK_VENV)/pipeline.txt
	$(LOCK_VENV)/bin/python -m pip install --quiet -e '.[test]'
	mkdir -p requirements
	{ echo "# make lock: every package make test installs, at exact versions"; \
	  $(LOCK_VENV)/bin/python -m pip freeze --exclude gptpipe | sed 's/+[a-z0-9.]*$$//'; \
	} > $(TEST_LOCK)
	{ echo "# make lock: every package make pipeline installs, at exact versions"; \
	  awk -F'==' 'NR == FNR { keep[$$1]; next } $$1 in keep' $(LOCK_VENV)/pipeline.txt \
		$(TEST_LOCK); \
	} > $(PIPELINE_LOCK)
	rm -rf $(LOCK_VENV)

clean-venv:
	rm -rf $(VENV)
