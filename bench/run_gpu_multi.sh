#!/usr/bin/env bash
# Issue 13's benchmark, in ONE call on a 2-GPU machine: preset:gemma-2-2b (gemma2-dolly), 1 GPU and 2 GPUs,
# LoRA and QLoRA, DDP and FSDP, with the tuned settings (batch 16 per GPU, padding-free, no gradient
# checkpointing) and the original recipe (batch 1 x grad accumulation 8, max length 768, checkpointing).
# Order: tuned runs, an FSDP resume check (interrupt after a checkpoint, --resume, completed at step 8:
# resume-check-fsdp.json; DDP in --tiny), then the original recipe's runs.
# Each run is short (MAX_STEPS optimizer steps, the first WARMUP not measured) and time-limited (RUN_LIMIT s);
# runs that would start after BUDGET s are skipped, most important first. Writes one JSON per run, log.txt and
# table.md (tokens/s, scaling efficiency = tokens/s(2) / (2 x tokens/s(1)), peak memory per rank) to $OUT.
# These runs name their engine: train.engine=hf (the Trainer's DDP/FSDP; `auto` would take the fast engine for DDP).
# SETS=fast (a call of its own: each fast run compiles, about a minute cold): the fast engine's DDP, the recipe
# unchanged (8 rows per GPU per step), 1 GPU then 2 GPUs, LoRA then QLoRA (FAST_STEPS steps, FAST_LIMIT s each;
# the 2-GPU run reuses the 1-GPU run's compile cache when its plan is the same); the table adds the summary's steady-state tokens/s and
# per-GPU MFU, and its scaling efficiency uses the steady-state rate (compiling steps excluded).
# GPU: OUT=bench/results/multi-h200 bash bench/run_gpu_multi.sh   (wheels carried as for run_gpu_sft.sh)
#      OUT=bench/results/multi-fast-h200 SETS=fast bash bench/run_gpu_multi.sh
# CPU smoke test of the same script (tiny twin, gloo, LoRA, DDP only: FSDP needs GPUs; SETS=fast works too):
#   PY=.venv/bin/python bash bench/run_gpu_multi.sh --tiny
set -u
cd "$(dirname "$0")/.."
START=$SECONDS
if [ "${1:-}" = "--tiny" ]; then
  OUT=${OUT:-/tmp/peftlab-multi-tiny}; mkdir -p "$OUT"; : > /tmp/log.txt
  export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
  log_run() { { echo "=== $1"; tr '\r' '\n' < /tmp/log.txt; } >> "$OUT/log.txt"; }
  RECIPE=tiny-gemma2-dolly; MODEL=preset:tiny-gemma2; STRATEGIES="ddp"; MAX_STEPS=${MAX_STEPS:-5}
  METHODS=${METHODS:-lora}; RESUME_STRATEGY=ddp
  RUN_LIMIT=${RUN_LIMIT:-240}; BUDGET=${BUDGET:-900}; PY=${PY:-python3}; SETS=${SETS:-tuned}
  FAST_STEPS=${FAST_STEPS:-$MAX_STEPS}; FAST_LIMIT=${FAST_LIMIT:-$RUN_LIMIT}
else
  source bench/gpu_env.sh
  RECIPE=gemma2-dolly; MODEL=preset:gemma-2-2b; STRATEGIES="ddp fsdp"; MAX_STEPS=${MAX_STEPS:-15}
  METHODS="lora qlora"; RESUME_STRATEGY=fsdp
  RUN_LIMIT=${RUN_LIMIT:-75}; BUDGET=${BUDGET:-470}; PY=python3; SETS=${SETS:-tuned original}
  FAST_STEPS=${FAST_STEPS:-30}; FAST_LIMIT=${FAST_LIMIT:-200}
fi
WARMUP=3
RUNS=/tmp/peftlab-multi-runs; rm -rf "$RUNS"
COMMON=(--set "model.source=$MODEL" --set "train.max_steps=$MAX_STEPS" --set train.logging_steps=1
        --set train.eval_steps=null --set train.save_steps=null --set data.eval_max_samples=16
        --set eval.compare_base=false --set eval.max_new_tokens=8)
TUNED=(--set train.batch_size=16 --set train.grad_accum=1 --set train.padding_free=true
       --set train.gradient_checkpointing=false)

one() {  # one SETTINGS METHOD GPUS [STRATEGY]
  local settings=$1 method=$2 gpus=$3 strategy=${4:-} name extra=(--set train.engine=hf) steps=$MAX_STEPS
  local limit=$RUN_LIMIT
  name="$settings-$method-${gpus}g${strategy:+-$strategy}"
  if (( SECONDS - START > BUDGET )); then echo "=== $name skipped (budget ${BUDGET}s spent)"; return; fi
  [ "$settings" = tuned ] && extra+=("${TUNED[@]}")
  [ "$settings" = fast ] && { extra=(--set train.engine=fast); steps=$FAST_STEPS; limit=$FAST_LIMIT; }
  [ "$gpus" -gt 1 ] && extra+=(--gpus "$gpus" --strategy "$strategy")
  echo "=== $name"
  timeout -k 10 "$limit" "$PY" -m peftlab train "$RECIPE" "${COMMON[@]}" --set "method.name=$method" "${extra[@]}" \
    --set "train.max_steps=$steps" --runs-dir "$RUNS" --name "$name" --overwrite > /tmp/log.txt 2>&1
  echo "rc=$? ($((SECONDS - START))s)"; log_run "$name"; grep -E "^step $steps |^error" /tmp/log.txt | tail -1
}

settings_runs() {  # settings_runs SETTINGS: the 1-GPU run of each method first (it also builds the preset's
  # weights once, in one process: several ranks building a fresh preset cache at once race)
  local strategies=$STRATEGIES
  [ "$1" = fast ] && strategies=ddp  # the fast engine replicates the model: DDP only
  for method in $METHODS; do
    one "$1" "$method" 1
    for strategy in $strategies; do one "$1" "$method" 2 "$strategy"; done
  done
}
resume_check() {  # QLoRA on 2 GPUs: Ctrl-C after the first checkpoint (saves one), then --resume to the end
  local name="resume-check-$RESUME_STRATEGY" dir="$RUNS/resume-check-$RESUME_STRATEGY" pid
  if (( SECONDS - START > BUDGET )); then echo "=== $name skipped (budget ${BUDGET}s spent)"; return; fi
  echo "=== $name"
  setsid "$PY" -m peftlab train "$RECIPE" "${COMMON[@]}" "${TUNED[@]}" --set train.engine=hf --set method.name=qlora --set train.max_steps=8 \
    --set train.save_steps=4 --gpus 2 --strategy "$RESUME_STRATEGY" --runs-dir "$RUNS" --name "$name" > /tmp/log.txt 2>&1 &
  pid=$!
  for _ in $(seq 240); do [ -f "$dir/checkpoints/checkpoint-4/trainer_state.json" ] && break; sleep 0.5; done
  kill -INT -- -"$pid"; wait "$pid"; echo "interrupted rc=$?"; log_run "$name"
  timeout -k 10 "$RUN_LIMIT" "$PY" -m peftlab train --resume "$dir" --gpus 2 --strategy "$RESUME_STRATEGY" > /tmp/log.txt 2>&1
  echo "resumed rc=$? ($((SECONDS - START))s)"; log_run "$name-resumed"
  "$PY" - "$dir" "$OUT/$name.json" <<'PYEOF'
import json, sys
from pathlib import Path
run, out = Path(sys.argv[1]), Path(sys.argv[2])
s = json.loads((run / "summary.json").read_text())
check = {"status": s.get("status"), "steps": s.get("steps"), "resumes": s.get("resumes"),
         "adapter": (run / "adapter" / "adapter_model.safetensors").is_file(),
         "ok": s.get("status") == "completed" and s.get("steps") == 8 and bool(s.get("resumes"))}
out.write_text(json.dumps(check, indent=2)); print("RESUME", json.dumps(check))
PYEOF
}
if [ "$SETS" = fast ]; then
  settings_runs fast
else
  settings_runs tuned
  resume_check
  [ "$SETS" = "tuned original" ] && settings_runs original
fi
PYTHONPATH=$PYTHONPATH:$PWD/bench "$PY" bench/report_multi.py "$RUNS" "$OUT" --warmup "$WARMUP"
echo "total $((SECONDS - START))s"
