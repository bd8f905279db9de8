#!/usr/bin/env bash
# The prepared GPU check of issue 16 (GPU speed), for device runs on the lent H200 (an H100 works too): every step
# under `timeout`, the whole run within GPU_CHECK_BUDGET_S (540 s: one device call), everything written under
# $OUT/gpu_check/, a summary printed at the end. The default run (tests kernels attention profile search) fills one
# call and leaves the search a lower bound or skipped; a second call runs `bash scripts/gpu_check.sh search levers`.
#
# How to run it through the device tool (../shared/tools/device/README.md):
#   1. here, from the repository root, at the commit to measure:   bash ../shared/tools/device/pack.sh
#   2. the device run, from the repository root:
#        run(command="bash scripts/gpu_check.sh", carry=[".device-pack"], kind="nvidia-h200", timeout_s=600)
#      It sources .device-pack/setup.sh itself (wheels into /tmp/site, the tree copied to $IFT_WORK, ../shared beside
#      it) and runs every step from $IFT_WORK. Steps by name run only those, in the order given, e.g. a second run
#      with what the first one left out:   bash scripts/gpu_check.sh search
#
# Steps (name: what it measures against the issue's goals; time budgeted):
#   tests    pytest -m gpu on tests/kernels/test_gpu.py, tests/unit/test_packed_attention.py, test_model_load.py:
#            the kernels (each autotune config too), packed attention backends and model loading still pass on the
#            GPU (~90 s, limit 180 s)
#   kernels  bench/kernels_bench.py --devices cuda at the issue's four shapes: ours (auto, and each dW strategy of
#            --ours-variants: rows_inplace, rows_inplace_x4, rows) / torch / Liger, with x-Liger ratios: the kernel
#            goal, time <= 0.75x Liger and memory <= 0.5x Liger, 50% ignored <= 0.6x all supervised (limit 240 s)
#   kernels_tuned  (not in the default run) the same with the row kernel autotuned (IFT_TUNE_ROW_KERNEL=1), ours only
#   attention bench/attention_bench.py: each packed attention backend (flash_attn, torch_varlen, flex, sdpa, eager)
#            on the same 4096-token rows of real chat lengths, checked against sdpa first, fwd+bwd ms and memory, the
#            fastest correct one and what "auto" picks today (~60 s, limit 150 s)
#   profile  bench/profile_step.py on the 1.24B Llama (hidden 2048, 16 layers, 32 heads, 8 kv heads, MLP 8192,
#            llama-3.1 tokenizer, 4096 tokens per row), micro batch 1 x 2 accumulation and 8 x 1: where a step's time
#            goes (attention, matmuls, ZeRO-3, optimizer, loss, data, host gaps), the issue's "before" table
#            (limit 150 s each; the random model is written once first, limit 120 s)
#   search   bench/train_throughput.py --search-micro-batch for ift, hf_flat, hf_padded on the same model, one rank:
#            each contender's largest micro batch that fits and its tokens/s, MFU and peak memory: the training goal
#            (>= 40% MFU; >= 1.5x the best HF Trainer contender at its best micro batch). It gets what is left of
#            GPU_CHECK_BUDGET_S; no probe starts in its last 150 s, so a short budget yields lower bounds.
#   levers   (not in the default run: a second session) one ift run per lever on the same model, micro batch
#            GPU_CHECK_LEVER_ROWS (4) x 1, 5 steps: today's defaults, ZeRO-3 at one rank without the persistence
#            shortcut (train.zero_single_rank=zero3), regional compile (model.compile), activation checkpointing of
#            every 2nd layer, the flex and torch_varlen attention backends, the fused loss's 3-matmul dW strategy
#            (train.fused_loss_dw=rows_inplace) (GPU_CHECK_LEVERS: NAME=key=value,...; ~60 s each, limit 150 s each):
#              bash scripts/gpu_check.sh levers
#
# Environment: GPU_CHECK_BUDGET_S (default 540: the whole script), OUT (default runs/), PYTHON (default python3 on
# the device). Off the device (no .device-pack/setup.sh or GPU_CHECK_LOCAL=1) it runs from this checkout with
# PYTHON (e.g. .venv/bin/python); GPU_CHECK_DEVICE=cpu with GPU_CHECK_MODEL="--hidden 64 --layers 2 --heads 4
# --kv-heads 2 --intermediate 128", GPU_CHECK_MAX_LENGTH=128 and GPU_CHECK_KERNEL_SHAPES="1024,64,8000,float32,0.5"
# runs every step at a tiny size on the CPU (how this script is checked without a GPU).
set -uo pipefail

started=$SECONDS
BUDGET=${GPU_CHECK_BUDGET_S:-540}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
MODEL_ARGS=${GPU_CHECK_MODEL:---hidden 2048 --layers 16 --heads 32 --kv-heads 8 --intermediate 8192}
MAX_LENGTH=${GPU_CHECK_MAX_LENGTH:-4096}
# The issue's loss-kernel shapes, N,H,V,dtype,ignored fraction.
KERNEL_SHAPES=${GPU_CHECK_KERNEL_SHAPES:-8192,4096,128256,bfloat16,0.0 8192,4096,128256,bfloat16,0.5 \
32768,4096,151936,bfloat16,0.0 16384,2048,32000,bfloat16,0.0}
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(tests kernels attention profile search)

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$repo/runs}
RESULTS="$OUT/gpu_check"
mkdir -p "$RESULTS"
if [ -f "$repo/.device-pack/setup.sh" ] && [ -z "${GPU_CHECK_LOCAL:-}" ]; then
  # shellcheck disable=SC1091
  source "$repo/.device-pack/setup.sh" || { echo "gpu_check: device setup failed"; exit 1; }
  cd "$IFT_WORK" || exit 1
  WORK=/tmp/ift/gpu_check
else
  cd "$repo" || exit 1
  WORK="$RESULTS/work"
fi
PY=${PYTHON:-python3}
TOKENIZER=../shared/tokenizers/llama-3.1-instruct
[ "$DEVICE" = cpu ] && TOKENIZER=../shared/tokenizers/smollm2-135m-instruct
MODEL="$WORK/model-llama-1.24b"
[ "$DEVICE" = cpu ] && MODEL="$WORK/model-tiny"
CPU_FLAG=()
[ "$DEVICE" = cpu ] && CPU_FLAG=(--cpu)
mkdir -p "$WORK"
summary="$RESULTS/summary.txt"
: > "$summary"

# step NAME LIMIT_S COMMAND...: runs it under timeout, output to $RESULTS/NAME.log (and the screen), status noted.
# The whole check stays within GPU_CHECK_BUDGET_S (one device call is at most 600 s): a step gets at most what is
# left, and none starts with under 45 s left; a skipped step is named in the summary with the command to rerun it.
step() {
  local name=$1 limit=$2
  shift 2
  local begin=$SECONDS
  local left=$((BUDGET - (SECONDS - started)))
  if [ $left -lt 45 ]; then
    echo "=== $name: SKIPPED, ${left} s of GPU_CHECK_BUDGET_S left (next run: bash scripts/gpu_check.sh <step>)" \
      | tee -a "$summary"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (limit ${limit} s, $((SECONDS - started)) s into the check): $*" | tee -a "$summary"
  timeout --kill-after=15 "$limit" "$@" > >(tee "$RESULTS/$name.log") 2>&1
  local code=$?
  local verdict="ok"
  [ $code -eq 124 ] || [ $code -eq 137 ] && verdict="TIMED OUT"
  [ $code -ne 0 ] && [ "$verdict" = ok ] && verdict="FAILED (exit $code)"
  echo "=== $name: $verdict after $((SECONDS - begin)) s" | tee -a "$summary"
  grep -E '^(\||# )' "$RESULTS/$name.log" >> "$summary"  # its tables and notes, for the summary at the end
  return 0  # a failed step is in the summary; the next step runs
}

run_tests() {
  step tests 180 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/kernels/test_gpu.py \
    tests/unit/test_packed_attention.py tests/unit/test_model_load.py
}

run_kernels() {
  local shapes=()
  for shape in $KERNEL_SHAPES; do shapes+=(--shape "$shape"); done
  step kernels 240 "$PY" bench/kernels_bench.py --devices "$DEVICE" --impls ours torch liger "${shapes[@]}"
}

run_kernels_tuned() {
  # The row kernel autotuned (IFT_TUNE_ROW_KERNEL=1; by default its configuration is fixed by the shape, for bitwise
  # reproducibility): whether a tuned configuration beats the fixed one enough to become the new fixed one.
  local shapes=()
  for shape in $KERNEL_SHAPES; do shapes+=(--shape "$shape"); done
  export IFT_TUNE_ROW_KERNEL=1
  step kernels_tuned 240 "$PY" bench/kernels_bench.py --devices "$DEVICE" --impls ours "${shapes[@]}"
  unset IFT_TUNE_ROW_KERNEL
}

run_attention() {
  local sizes=()
  [ "$DEVICE" = cpu ] && sizes=(--device cpu --max-length "$MAX_LENGTH" --heads 4 --kv-heads 2 --head-dim 16 \
    --lengths lognormal:24,0.8)
  step attention 150 "$PY" bench/attention_bench.py "${sizes[@]}" --json "$RESULTS/attention.json"
}

# Each lever of the issue as one ift-dist run of the same model, rows and steps, one rank, micro batch
# LEVER_ROWS x 1: NAME=key=value,key=value (no overrides = today's defaults). One table per run; compare tokens/s.
LEVERS=${GPU_CHECK_LEVERS:-"defaults= zero3_single_rank=train.zero_single_rank=zero3 compile=model.compile=true \
ckpt_every2=model.gradient_checkpointing=true,model.gradient_checkpointing_every=2 \
flex=model.attention=flex torch_varlen=model.attention=torch_varlen rows_inplace=train.fused_loss_dw=rows_inplace"}
LEVER_ROWS=${GPU_CHECK_LEVER_ROWS:-4}

run_levers() {
  local variant name overrides override
  for variant in $LEVERS; do
    name=${variant%%=*}
    overrides=${variant#*=}
    local extra=()
    IFS=',' read -ra parts <<< "$overrides"
    for override in "${parts[@]}"; do [ -n "$override" ] && extra+=(--ift-override "$override"); done
    # shellcheck disable=SC2086
    step "lever_$name" 150 "$PY" bench/train_throughput.py "${CPU_FLAG[@]}" $MODEL_ARGS --model "$MODEL" \
      --tokenizer "$TOKENIZER" --max-length "$MAX_LENGTH" --ranks 1 --micro-batch-rows "$LEVER_ROWS" \
      --accumulation 1 --steps 5 --warmup-steps 2 --contenders ift --timeout 140 --workdir "$WORK/lever_$name" \
      "${extra[@]}"
  done
}

run_profile() {
  local rows accumulation
  for geometry in "1 2" "8 1"; do
    read -r rows accumulation <<< "$geometry"
    # shellcheck disable=SC2086
    step "profile_micro${rows}x${accumulation}" 150 "$PY" bench/profile_step.py "${CPU_FLAG[@]}" $MODEL_ARGS \
      --model "$MODEL" --tokenizer "$TOKENIZER" --max-length "$MAX_LENGTH" --micro-batch-rows "$rows" \
      --accumulation "$accumulation" --steps 2 --warmup-steps 1 --out "$RESULTS/profile_micro${rows}x${accumulation}"
    local profiled="$RESULTS/profile_micro${rows}x${accumulation}"
    gzip -f "$profiled/trace.json" 2>/dev/null
    # The run directory holds a copy of the tokenizer (MBs): keep its metrics only.
    mv "$profiled/run/metrics.jsonl" "$profiled/metrics.jsonl" 2>/dev/null
    rm -rf "$profiled/run"
  done
}

run_model() {
  # The random 1.24B Llama once, for the profile and search steps (profile_step writes it when --model has none).
  [ -f "$MODEL/.written" ] && return  # a run stopped while writing it leaves no marker
  rm -rf "$MODEL"
  # shellcheck disable=SC2086
  step model 120 "$PY" -c "
import argparse, sys
sys.path.insert(0, 'bench')
from train_throughput import write_model
from ift_dist.data.render import load_tokenizer
p = argparse.ArgumentParser()
for name in ('--hidden', '--layers', '--heads', '--kv-heads', '--intermediate', '--max-length', '--seed'):
    p.add_argument(name, type=int, default=0)
args = p.parse_args(sys.argv[1:])
write_model(args, load_tokenizer('$TOKENIZER'), '$MODEL')
print('wrote $MODEL')" $MODEL_ARGS --max-length "$MAX_LENGTH"
  [ -f "$MODEL/config.json" ] && touch "$MODEL/.written"
}

run_search() {
  local left=$((BUDGET - (SECONDS - started)))
  if [ $left -lt 200 ]; then
    echo "=== search: skipped, ${left} s of GPU_CHECK_BUDGET_S left (run: bash scripts/gpu_check.sh search)" \
      | tee -a "$summary"
    return
  fi
  # shellcheck disable=SC2086
  step search "$((left - 10))" "$PY" bench/train_throughput.py "${CPU_FLAG[@]}" $MODEL_ARGS --model "$MODEL" \
    --tokenizer "$TOKENIZER" --max-length "$MAX_LENGTH" --ranks 1 --accumulation 1 --steps 4 --warmup-steps 2 \
    --contenders ift,hf_flat,hf_padded --search-micro-batch --search-start ift=8,hf_flat=2,hf_padded=2 \
    --search-max 32 --search-tolerance 0.25 --timeout 140 --search-deadline-s "$((left - 160))" \
    --workdir "$WORK/search"
  cp "$WORK/search/search.json" "$RESULTS/search.json" 2>/dev/null
  mkdir -p "$RESULTS/search_logs"  # each probe's log: why a contender did not fit
  for log in "$WORK"/search/micro*/*.log; do
    [ -f "$log" ] && cp "$log" "$RESULTS/search_logs/$(basename "$(dirname "$log")")-$(basename "$log")"
  done
}

for name in "${STEPS[@]}"; do
  case $name in
    tests) run_tests ;;
    kernels) run_kernels ;;
    kernels_tuned) run_kernels_tuned ;;
    attention) run_attention ;;
    profile) run_model; run_profile ;;
    search) run_model; run_search ;;
    levers) run_model; run_levers ;;
    *) echo "gpu_check: unknown step $name (tests, kernels, kernels_tuned, attention, profile, search, levers)"; exit 2 ;;
  esac
done
echo "=== gpu_check done in $((SECONDS - started)) s; results in $RESULTS" | tee -a "$summary"
cat "$summary"
