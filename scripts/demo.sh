#!/usr/bin/env bash
# The README's demo command: set everything up, then run the demo. Until the trainer lands, the demo prepares the
# demo's training data with the real SmolLM2 tokenizer and prints the data report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
rm -rf runs/demo-cpu/data
.venv/bin/ift data prepare configs/demo_cpu.yaml --out runs/demo-cpu/data --num-proc 2
.venv/bin/ift data preview configs/demo_cpu.yaml -n 1 --html runs/demo-cpu/preview.html
.venv/bin/ift data stats configs/demo_cpu.yaml
