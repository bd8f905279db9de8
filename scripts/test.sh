#!/usr/bin/env bash
# The README's test command: set everything up (the locked versions of constraints.txt), then lint and run the whole
# test suite. Extra arguments go to pytest. `IFT_DEPS=latest bash scripts/test.sh` does the same on the newest
# releases, in .venv-latest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "${IFT_DEPS:-locked}" = latest ]; then VENV=${VENV:-.venv-latest}; else VENV=${VENV:-.venv}; fi
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=offline DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
# --durations: the slowest tests in every CI log, to keep the suite within its time budget.
exec "$VENV/bin/python" -m pytest tests --durations=30 "$@"
