#!/usr/bin/env bash
# The fast-engine GPU benchmark (issue 11): in ONE call, bench-hf's plain-stack reference for gemma2-dolly on the
# gemma-2-2b architecture -- the original settings (batch 1, accumulation 8, checkpointing) and the best stock
# tuning (batch 16, padding-free, no checkpointing: run_device.sh's A7) -- then peftlab's fast step
# (bench/bench_fast.py) in the variants FAST_RUNS names, each JSON with the references and the ratios:
#   fast_lora_recipe        the recipe's 8-row step, LoRA          fast_qlora_recipe   the same on the 4-bit base
#   fast_lora_batch64       the planner's batch: 64 rows per step  fast_qlora_batch64  the same, QLoRA
#   fast_lora_batch64_cap16 64 rows per step under train.memory_limit_gib 16
# Carried: .bench-hf/ (with its wheels) and the tree, as bench/README.md "Set-up" says.
# Usage: OUT=bench/results/fast-h200 bash bench/run_gpu_fast.sh      FAST_ONLY=1 skips the references;
# REFERENCE_DIR (default $OUT): where the reference JSONs are read (an earlier call's, with FAST_ONLY=1).
# Time caps (s, measured part of each reference): SEED_CAP (default 20), TUNED_CAP (default 12); FAST_LIMIT (s per
# fast run, default 170); STOP_AFTER (s since the start): later runs are skipped, not started.
set -u
source "$(dirname "$0")/gpu_env.sh"
if [ -z "${FAST_ONLY:-}" ]; then
  hf_run sft_gemma2.py 110 hf_seed_lora --warmup 2 --time-cap "${SEED_CAP:-20}"
  hf_run sft_gemma2.py 80 hf_tuned_lora --bs 16 --ga 1 --no-gc --padding-free --time-cap "${TUNED_CAP:-12}"
fi
declare -A VARIANT=(
  [fast_lora_recipe]="" [fast_qlora_recipe]="--qlora" [fast_lora_batch64]="--rows-per-step 64"
  [fast_qlora_batch64]="--qlora --rows-per-step 64" [fast_lora_batch64_cap16]="--rows-per-step 64 --memory-limit-gib 16"
)
fast() {  # fast NAME ARGS...
  local name=$1; shift
  if [ "$SECONDS" -ge "${STOP_AFTER:-100000}" ]; then echo "=== $name skipped (STOP_AFTER)"; return; fi
  echo "=== $name"; timeout -k 10 "${FAST_LIMIT:-170}" python3 bench/bench_fast.py --name "$name" --out "$OUT/$name.json" \
    --reference "${REFERENCE_DIR:-$OUT}/hf_seed_lora.json" "${REFERENCE_DIR:-$OUT}/hf_tuned_lora.json" "$@" > /tmp/log.txt 2>&1
  echo "rc=$?"; log_run "$name"; grep RESULT /tmp/log.txt | tail -1; grep -v -E "Warning|warn" /tmp/log.txt | tail -4
}
for name in ${FAST_RUNS:-fast_lora_recipe}; do
  # shellcheck disable=SC2086  # the variant's flags are words
  fast "$name" ${VARIANT[$name]} ${FAST_ARGS:-}
done
