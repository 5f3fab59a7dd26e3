#!/usr/bin/env bash
# The issue-3 GPU benchmark: peftlab's classify task vs the plain Hugging Face reference (bench-hf seqcls_gpt2.py,
# experiment B), interleaved in one call on one GPU. DialoGPT-medium architecture (random weights), real Banking77
# lengths, batch 16, 5 warm-up + 60 measured steps each. Needs .bench-hf/ carried as for run_gpu_sft.sh
# (bench/README.md); the benchmark trains only (no validation/test pass), so neither scikit-learn nor optuna is needed.
# Usage: OUT=bench/results/classify bash bench/run_gpu_classify.sh     FAST=1: the fast engine's runs (below) instead;
# OURS_LIMIT (s per peftlab run, default 180), STOP_AFTER (s: the batch-128 run is skipped after it).
set -u
source "$(dirname "$0")/gpu_env.sh"
hf() { hf_run seqcls_gpt2.py 120 "$@"; }  # hf NAME ARGS...
ours() {  # ours METHOD VARIANT [NAME ARGS...]: ARGS replace the default --steps 60
  local name=${3:-peftlab_$1_$2} method=$1 variant=$2; shift 3 2>/dev/null || shift 2
  [ $# -gt 0 ] || set -- --steps 60
  echo "=== $name"; timeout -k 10 "${OURS_LIMIT:-180}" python3 bench/bench_classify.py --method "$method" --variant "$variant" "$@" --out "$OUT/$name.json" > /tmp/log.txt 2>&1
  echo "rc=$?"; log_run "$name"; grep RESULT /tmp/log.txt | tail -1; tail -5 /tmp/log.txt
}
if [ -n "${FAST:-}" ]; then  # issue 11: the fast engine (CUDA graphs) at the recipe's batch 16 and at batch 128
  hf hf_tuned_lora --dtype bf16 --amp bf16 --pad-to 0 --time-cap 10
  FASTSTEPS=(--warmup 5 --set train.logging_steps=20)
  ours lora fast peftlab_lora_fast_b16 --steps 600 "${FASTSTEPS[@]}"
  [ "$SECONDS" -lt "${STOP_AFTER:-100000}" ] && ours lora fast peftlab_lora_fast_b128 --steps 300 "${FASTSTEPS[@]}" --set train.batch_size=128
  exit 0
fi
hf hf_seed_lora --time-cap 20
ours lora seed
hf hf_seed_qlora --quant nf4 --time-cap 20
ours qlora seed
hf hf_tuned_lora --dtype bf16 --amp bf16 --pad-to 0 --time-cap 15
ours lora tuned
hf hf_tuned_qlora --quant nf4 --compute-dtype bf16 --amp bf16 --no-kbit-prep --pad-to 0 --time-cap 15
ours qlora tuned
python3 bench/report_classify.py "$OUT" | tee "$OUT/table.md"
