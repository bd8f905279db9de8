#!/usr/bin/env bash
# The demo's second half (run after scripts/demo.sh): answers to held-out Vicuna prompts before and after the
# identity fine-tune (`ift eval generate`, 2 ranks), then an LLM judge comparing them pairwise (`ift eval judge`),
# the judge being a local OpenAI-compatible server (`transformers serve`) on the pretrained SmolLM2-135M-Instruct.
# Prints the win rate with its bootstrap interval and where the answers page and the chart are.
#
# A 135M judge is a toy: it shows the pipeline, offline, in minutes; its verdicts are often unparseable (counted,
# never dropped) and say little. For a real judgment point --judge-url at a strong model (docs/eval.md).
# Usage: bash scripts/demo_eval.sh [number of Vicuna prompts, default 8]
set -euo pipefail
cd "$(dirname "$0")/.."
PROMPTS=${1:-8}
BEFORE=runs/smollm2-135m-instruct
AFTER=runs/demo-cpu/hf_model
OUT=runs/demo-eval
for model in "$BEFORE" "$AFTER"; do
  if [ ! -f "$model/config.json" ]; then
    echo "demo_eval: $model is missing: run bash scripts/demo.sh first" >&2
    exit 2
  fi
done
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  RANKS=(--num-gpus "$(nvidia-smi -L | wc -l)")
  DEVICE=cuda
else
  export DS_ACCELERATOR=cpu
  RANKS=(--num-gpus 2)
  DEVICE=cpu
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
rm -rf "$OUT"

# The same prompts, greedy, both models through the tokenizer and chat template the fine-tune was trained and
# exported with (its empty system message included: configs/demo_cpu.yaml).
for side in before after; do
  model=$BEFORE
  [ "$side" = after ] && model=$AFTER
  .venv/bin/ift eval generate "$model" --tokenizer "$AFTER" --prompts vicuna_bench --limit "$PROMPTS" \
    --max-new-tokens 128 --system-prompt "" --batch-size 4 --out "$OUT/$side" "${RANKS[@]}"
done

# The judge's model directory: the pretrained weights with SmolLM2's own tokenizer (transformers serve loads both).
JUDGE=$OUT/judge-model
mkdir -p "$JUDGE"
for file in "$BEFORE"/* ../shared/tokenizers/smollm2-135m-instruct/*; do ln -sf "$(realpath "$file")" "$JUDGE/"; done

PORT=$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
.venv/bin/transformers serve "$JUDGE" --device "$DEVICE" --host 127.0.0.1 --port "$PORT" >"$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true' EXIT
for _ in $(seq 180); do
  if .venv/bin/python -c "import urllib.request, sys; urllib.request.urlopen('http://127.0.0.1:$PORT/health', timeout=2)" 2>/dev/null; then
    break
  fi
  kill -0 "$SERVER" 2>/dev/null || { echo "demo_eval: transformers serve died:" >&2; tail -20 "$OUT/serve.log" >&2; exit 1; }
  sleep 1
done

.venv/bin/ift eval judge --mode pairwise --answers "$OUT/after" --labels fine-tuned --baseline "$OUT/before" \
  --judge-url "http://127.0.0.1:$PORT/v1" --judge-model "$JUDGE" --judge-key-env IFT_DEMO_NO_KEY \
  --max-tokens 200 --concurrency 2 --out "$OUT/judge"
echo
echo "demo_eval: answers side by side: $OUT/before/answers.html, $OUT/after/answers.html"
echo "demo_eval: judgments: $OUT/judge/judgments.jsonl, chart: $OUT/judge/judge_chart.png"
