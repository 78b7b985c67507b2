#!/usr/bin/env bash
# The prepared GPU check, in one command that ends within 8 minutes on one GPU:
#   tests/test_cuda.py on CUDA (the decode-loop equivalences, PersRM head and PCM training,
#   padlm eval, mix and soups, a LoRA PersRM, the server streaming a request), PAD in bf16
#   against fp32, and `padlm bench` (base, prompt, pad, linear-alignment, mix at batch 1, 8
#   and 32) on the default model's shape and on a ~1B Llama shape, all with random weights.
# Each step runs in its own process with its own time limit and the check goes on past a
# failed one; OUT/summary.json records every step (command, exit status, seconds, log under
# OUT/logs/) and the exit status is 1 if any failed. The logic is scripts/gpu_check.py.
#
# On the GPU machine (no package index; the machine's own torch and transformers are used
# and never replaced): build the bundle here first, `make gpu-bundle` (build/gpu-bundle,
# ~13 MB: the missing wheels and the default model's config and tokenizer, no weights), carry
# that directory, and run from the repository root:
#   bash scripts/gpu-check.sh OUT
# It installs the wheels with `pip install --no-index --no-deps --target` into a private
# directory and puts PADLM_HOME in another one, so nothing outside them changes.
#
# On the CPU, the same steps with tiny models and few tokens, installing nothing (this
# checkout's .venv), a few minutes on 2 cores; CI runs it so the check cannot rot:
#   bash scripts/gpu-check.sh --dry-run-cpu OUT
#
# Environment: PYTHON (the interpreter; default python3, .venv/bin/python for the dry run),
# PADLM_GPU_BUNDLE (default build/gpu-bundle), GPU_CHECK_BUDGET_S (all steps' seconds),
# GPU_CHECK_SKIP (comma-separated step names to leave out, e.g. benches measured before).
set -uo pipefail
cd "$(dirname "$0")/.."
mode=gpu
if [ "${1:-}" = "--dry-run-cpu" ]; then
  mode=cpu
  shift
fi
OUT=${1:-out/gpu-check}
if [ "$mode" = cpu ]; then
  PY=${PYTHON:-.venv/bin/python}
else
  PY=${PYTHON:-python3}
fi
mkdir -p "$OUT"
exec "$PY" scripts/gpu_check.py run --mode "$mode" --out "$OUT" --python "$PY" \
  --bundle "${PADLM_GPU_BUNDLE:-build/gpu-bundle}" ${GPU_CHECK_BUDGET_S:+--budget-s "$GPU_CHECK_BUDGET_S"} \
  ${GPU_CHECK_SKIP:+--skip "$GPU_CHECK_SKIP"}
