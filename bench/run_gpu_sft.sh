#!/usr/bin/env bash
# The issue-2 GPU benchmark: peftlab vs the plain Hugging Face reference, interleaved in one call on one GPU.
# Needs (carried to the GPU machine, see bench/README.md): .bench-hf/ (copy of ../shared/bench-hf with its wheels in
# .bench-hf/whl from get_wheels.sh) and .bench-hf/whl-peftlab (pydantic, typer, rich, pyyaml wheels for Python 3.12).
# Usage: OUT=bench/results/sft bash bench/run_gpu_sft.sh
set -u
source "$(dirname "$0")/gpu_env.sh"
hf() { hf_run sft_gemma2.py 200 "$@"; }  # hf NAME ARGS...
ours() {  # ours METHOD
  echo "=== peftlab_$1"; timeout -k 10 240 python3 bench/bench_sft.py --method "$1" --out "$OUT/peftlab_$1.json" > /tmp/log.txt 2>&1
  echo "rc=$?"; log_run "peftlab_$1"; grep RESULT /tmp/log.txt | tail -1; tail -5 /tmp/log.txt
}
hf hf_seed_lora --time-cap 35
ours lora
hf hf_seed_qlora --quant nf4 --time-cap 35
ours qlora
python3 bench/report_sft.py "$OUT" | tee "$OUT/table.md"
