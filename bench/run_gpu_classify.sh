#!/usr/bin/env bash
# The issue-3 GPU benchmark: peftlab's classify task vs the plain Hugging Face reference (bench-hf seqcls_gpt2.py,
# experiment B), interleaved in one call on one GPU. DialoGPT-medium architecture (random weights), real Banking77
# lengths, batch 16, 5 warm-up + 60 measured steps each. Needs .bench-hf/ carried as for run_gpu_sft.sh
# (bench/README.md); the benchmark trains only (no validation/test pass), so neither scikit-learn nor optuna is needed.
# Usage: OUT=bench/results/classify bash bench/run_gpu_classify.sh
set -u
source "$(dirname "$0")/gpu_env.sh"
hf() { hf_run seqcls_gpt2.py 120 "$@"; }  # hf NAME ARGS...
ours() {  # ours METHOD VARIANT
  local name=peftlab_$1_$2
  echo "=== $name"; timeout -k 10 180 python3 bench/bench_classify.py --method "$1" --variant "$2" --steps 60 --out "$OUT/$name.json" > /tmp/log.txt 2>&1
  echo "rc=$?"; log_run "$name"; grep RESULT /tmp/log.txt | tail -1; tail -5 /tmp/log.txt
}
hf hf_seed_lora --time-cap 20
ours lora seed
hf hf_seed_qlora --quant nf4 --time-cap 20
ours qlora seed
hf hf_tuned_lora --dtype bf16 --amp bf16 --pad-to 0 --time-cap 15
ours lora tuned
hf hf_tuned_qlora --quant nf4 --compute-dtype bf16 --amp bf16 --no-kbit-prep --pad-to 0 --time-cap 15
ours qlora tuned
python3 bench/report_classify.py "$OUT" | tee "$OUT/table.md"
