#!/usr/bin/env bash
# The issue-3 GPU benchmark: peftlab's classify task vs the plain Hugging Face reference (bench-hf seqcls_gpt2.py,
# experiment B), interleaved in one call on one GPU. DialoGPT-medium architecture (random weights), real Banking77
# lengths, batch 16, 5 warm-up + 60 measured steps each. Needs .bench-hf/ carried as for run_gpu_sft.sh
# (bench/README.md); the benchmark trains only (no validation/test pass), so neither scikit-learn nor optuna is needed.
# Usage: OUT=bench/results/classify bash bench/run_gpu_classify.sh
set -u
OUT=${OUT:?set OUT}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .bench-hf/whl/*.whl .bench-hf/whl-peftlab/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export PEFTLAB_CACHE=/tmp/peftlab-cache HF_DATASETS_CACHE=/tmp/hf-datasets-cache TQDM_DISABLE=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python3 -c "import sys; sys.path.insert(0, '.bench-hf'); import common, json; print(json.dumps(common.versions()))"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
hf() {  # hf NAME ARGS...: the reference script, unchanged
  local name=$1; shift
  echo "=== $name"; timeout -k 10 120 python3 .bench-hf/seqcls_gpt2.py --name "$name" --out "$OUT/$name.json" "$@" > /tmp/log.txt 2>&1
  echo "rc=$?"; { echo "=== $name"; tr '\r' '\n' < /tmp/log.txt; } >> "$OUT/log.txt"; grep RESULT /tmp/log.txt | tail -1
}
ours() {  # ours METHOD VARIANT
  local name=peftlab_$1_$2
  echo "=== $name"; timeout -k 10 180 python3 bench/bench_classify.py --method "$1" --variant "$2" --steps 60 --out "$OUT/$name.json" > /tmp/log.txt 2>&1
  echo "rc=$?"; { echo "=== $name"; tr '\r' '\n' < /tmp/log.txt; } >> "$OUT/log.txt"; grep RESULT /tmp/log.txt | tail -1; tail -5 /tmp/log.txt
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
