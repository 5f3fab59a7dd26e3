# Sourced by the bench/run_gpu_*.sh scripts on the GPU machine: installs the carried wheels (the same versions for
# peftlab and the plain-HF reference), sets the offline environment, records the GPU and versions in $OUT/env.txt.
OUT=${OUT:?set OUT}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .bench-hf/whl/*.whl .bench-hf/whl-peftlab/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export PEFTLAB_CACHE=/tmp/peftlab-cache HF_DATASETS_CACHE=/tmp/hf-datasets-cache TQDM_DISABLE=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python3 -c "import sys; sys.path.insert(0, '.bench-hf'); import common, json; print(json.dumps(common.versions()))"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

log_run() {  # log_run NAME: append /tmp/log.txt to $OUT/log.txt under a header
  { echo "=== $1"; tr '\r' '\n' < /tmp/log.txt; } >> "$OUT/log.txt"
}

hf_run() {  # hf_run SCRIPT LIMIT_S NAME ARGS...: one plain-HF reference script of .bench-hf, unchanged
  local script=$1 limit=$2 name=$3; shift 3
  echo "=== $name"; timeout -k 10 "$limit" python3 ".bench-hf/$script" --name "$name" --out "$OUT/$name.json" "$@" > /tmp/log.txt 2>&1
  echo "rc=$?"; log_run "$name"; grep RESULT /tmp/log.txt | tail -1
}
