#!/usr/bin/env bash
# Issue 13's benchmark, in ONE call on a 2-GPU machine: preset:gemma-2-2b (gemma2-dolly), 1 GPU and 2 GPUs,
# LoRA and QLoRA, DDP and FSDP, with the tuned settings (batch 16 per GPU, padding-free, no gradient
# checkpointing) and the original recipe (batch 1 x grad accumulation 8, max length 768, checkpointing).
# Each run is short (MAX_STEPS optimizer steps, the first WARMUP not measured) and time-limited (RUN_LIMIT s);
# runs that would start after BUDGET s are skipped, most important first. Writes one JSON per run, log.txt and
# table.md (tokens/s, scaling efficiency = tokens/s(2) / (2 x tokens/s(1)), peak memory per rank) to $OUT.
# GPU: OUT=bench/results/multi-h200 bash bench/run_gpu_multi.sh   (wheels carried as for run_gpu_sft.sh)
# CPU smoke test of the same script (tiny twin, gloo, DDP only: FSDP needs GPUs): bash bench/run_gpu_multi.sh --tiny
set -u
cd "$(dirname "$0")/.."
START=$SECONDS
if [ "${1:-}" = "--tiny" ]; then
  OUT=${OUT:-/tmp/peftlab-multi-tiny}; mkdir -p "$OUT"; : > /tmp/log.txt
  export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
  log_run() { { echo "=== $1"; tr '\r' '\n' < /tmp/log.txt; } >> "$OUT/log.txt"; }
  RECIPE=tiny-gemma2-dolly; MODEL=preset:tiny-gemma2; STRATEGIES="ddp"; MAX_STEPS=${MAX_STEPS:-5}
  RUN_LIMIT=${RUN_LIMIT:-240}; BUDGET=${BUDGET:-900}; PY=${PY:-python3}; SETS="tuned"
else
  source bench/gpu_env.sh
  RECIPE=gemma2-dolly; MODEL=preset:gemma-2-2b; STRATEGIES="ddp fsdp"; MAX_STEPS=${MAX_STEPS:-15}
  RUN_LIMIT=${RUN_LIMIT:-75}; BUDGET=${BUDGET:-500}; PY=python3; SETS="tuned original"
fi
WARMUP=3
RUNS=/tmp/peftlab-multi-runs; rm -rf "$RUNS"
COMMON=(--set "model.source=$MODEL" --set "train.max_steps=$MAX_STEPS" --set train.logging_steps=1
        --set train.eval_steps=null --set train.save_steps=null --set data.eval_max_samples=16
        --set eval.compare_base=false --set eval.max_new_tokens=8)
TUNED=(--set train.batch_size=16 --set train.grad_accum=1 --set train.padding_free=true
       --set train.gradient_checkpointing=false)

one() {  # one SETTINGS METHOD GPUS [STRATEGY]
  local settings=$1 method=$2 gpus=$3 strategy=${4:-} name extra=()
  name="$settings-$method-${gpus}g${strategy:+-$strategy}"
  if (( SECONDS - START > BUDGET )); then echo "=== $name skipped (budget ${BUDGET}s spent)"; return; fi
  [ "$settings" = tuned ] && extra=("${TUNED[@]}")
  [ "$gpus" -gt 1 ] && extra+=(--gpus "$gpus" --strategy "$strategy")
  echo "=== $name"
  timeout -k 10 "$RUN_LIMIT" "$PY" -m peftlab train "$RECIPE" "${COMMON[@]}" --set "method.name=$method" "${extra[@]}" \
    --runs-dir "$RUNS" --name "$name" --overwrite > /tmp/log.txt 2>&1
  echo "rc=$? ($((SECONDS - START))s)"; log_run "$name"; grep -E "^step $MAX_STEPS |^error" /tmp/log.txt | tail -1
}

# 1-GPU runs first: they also build the preset's weights once, in one process.
for settings in $SETS; do
  for method in lora qlora; do
    one "$settings" "$method" 1
    for strategy in $STRATEGIES; do one "$settings" "$method" 2 "$strategy"; done
  done
done
PYTHONPATH=$PYTHONPATH:$PWD/bench "$PY" bench/report_multi.py "$RUNS" "$OUT" --warmup "$WARMUP"
echo "total $((SECONDS - START))s"
