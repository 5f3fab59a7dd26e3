#!/usr/bin/env bash
# The original gemma2-dolly recipe, unchanged, through the CLI on one GPU: train.engine auto (the fast engine on CUDA)
# and, in the same call, the hf engine (trl's SFTTrainer) at the same settings; preset:gemma-2-2b (random weights).
# Usage (device tool, carry .bench-hf and the tree): OUT=$OUT bash bench/run_gpu_recipe.sh
set -u
source bench/gpu_env.sh
RUNS=/tmp/runs-recipe
one() {  # one NAME LIMIT_S ARGS...
  local name=$1 limit=$2; shift 2
  echo "=== $name"
  timeout -k 10 "$limit" python3 -m peftlab train gemma2-dolly --set model.source=preset:gemma-2-2b \
    --runs-dir "$RUNS" --name "$name" "$@" > /tmp/log.txt 2>&1
  echo "rc=$?"; log_run "$name"; grep -v "^\s*$" /tmp/log.txt | tail -6
  cp "$RUNS/$name/summary.json" "$OUT/$name-summary.json" 2>/dev/null
}
one auto ${AUTO_LIMIT:-300} --set train.max_steps=${AUTO_STEPS:-120} --set train.logging_steps=20
one hf ${HF_LIMIT:-150} --set train.engine=hf --set train.max_steps=${HF_STEPS:-12} --set train.logging_steps=4
python3 -m peftlab compare "$RUNS/hf" "$RUNS/auto" --format markdown | tee "$OUT/table.md"
