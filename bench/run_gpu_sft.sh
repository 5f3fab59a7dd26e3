#!/usr/bin/env bash
# The issue-2 GPU benchmark: peftlab vs the plain Hugging Face reference, interleaved in one call on one GPU.
# Needs (carried to the GPU machine, see bench/README.md): .bench-hf/ (copy of ../shared/bench-hf with its wheels in
# .bench-hf/whl from get_wheels.sh) and .bench-hf/whl-peftlab (pydantic, typer, rich, pyyaml wheels for Python 3.12).
# Usage: OUT=bench/results/sft bash bench/run_gpu_sft.sh
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
  echo "=== $name"; timeout -k 10 200 python3 .bench-hf/sft_gemma2.py --name "$name" --out "$OUT/$name.json" "$@" > /tmp/log.txt 2>&1
  echo "rc=$?"; { echo "=== $name"; tr '\r' '\n' < /tmp/log.txt; } >> "$OUT/log.txt"; grep RESULT /tmp/log.txt | tail -1
}
ours() {  # ours METHOD
  echo "=== peftlab_$1"; timeout -k 10 240 python3 bench/bench_sft.py --method "$1" --out "$OUT/peftlab_$1.json" > /tmp/log.txt 2>&1
  echo "rc=$?"; { echo "=== peftlab_$1"; tr '\r' '\n' < /tmp/log.txt; } >> "$OUT/log.txt"; grep RESULT /tmp/log.txt | tail -1; tail -5 /tmp/log.txt
}
hf hf_seed_lora --time-cap 35
ours lora
hf hf_seed_qlora --quant nf4 --time-cap 35
ours qlora
python3 bench/report_sft.py "$OUT" | tee "$OUT/table.md"
