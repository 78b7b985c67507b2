#!/usr/bin/env bash
# The prepared GPU check: the decode-loop equivalence tests on CUDA (tests/test_cuda.py), then
# `padlm bench` on the default model at batch 1 and 8, then tests/test_vllm.py where vLLM is
# installed, in one command that finishes in under 8 minutes (13 with vLLM). It uses the
# machine's own CUDA torch and installs only what is missing, without dependencies (so it
# never replaces that torch). Usage: bash scripts/gpu-check.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${1:-out/gpu-check}
mkdir -p "$OUT"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible to torch'; \
print('torch', torch.__version__, torch.cuda.get_device_name(0))" | tee "$OUT/device.txt"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
missing=$("$PY" - <<'PY'
import importlib.util
needed = {"typer": "typer", "rich": "rich", "transformers": "transformers", "gguf": "gguf",
          "filelock": "filelock", "safetensors": "safetensors", "peft": "peft",
          "pydantic": "pydantic", "textstat": "textstat", "vaderSentiment": "vaderSentiment",
          "pytest": "pytest", "pytest_timeout": "pytest-timeout"}
print(" ".join(pkg for mod, pkg in needed.items() if importlib.util.find_spec(mod) is None))
PY
)
if [ -n "$missing" ]; then
  echo "installing (no deps): $missing"
  "$PY" -m pip install --quiet --no-deps $missing
fi
export PYTHONUNBUFFERED=1
timeout 420 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/tests.txt"
timeout 180 "$PY" -m padlm bench --device cuda --batch-size 1,8 --max-new-tokens 64 \
  --repeats 3 --strategies base,prompt,pad,linear-alignment,args --json \
  | tee "$OUT/bench.json"
# vLLM's GPU paths (Model Runner V2; tensor parallelism with two GPUs), where vLLM is
# installed: the device machine reaches no package index, so it is not installed here
if "$PY" -c "import vllm" 2>/dev/null; then
  timeout 300 "$PY" -m pytest -q -p no:cacheprovider tests/test_vllm.py 2>&1 \
    | tee "$OUT/vllm-tests.txt"
else
  echo "vLLM is not installed on this machine: its GPU paths were not checked" \
    | tee "$OUT/vllm-tests.txt"
fi
