#!/usr/bin/env bash
# The fast-engine GPU benchmark (issue 11): in ONE call, bench-hf's plain-stack reference for gemma2-dolly on the
# gemma-2-2b architecture -- the original settings (batch 1, accumulation 8, checkpointing) and the best stock
# tuning (batch 16, padding-free, no checkpointing: run_device.sh's A7) -- then peftlab's fast step on the same
# recipe (bench/bench_fast.py), whose JSON gets the references and the ratios. Carried: .bench-hf/ (with its
# wheels) and a clean tree, as bench/README.md "Set-up" says.
# Usage: OUT=bench/results/fast-h200 bash bench/run_gpu_fast.sh        FAST_ONLY=1 skips the references.
# Time caps (s, measured part of each reference): SEED_CAP (default 20), TUNED_CAP (default 12).
set -u
source "$(dirname "$0")/gpu_env.sh"
if [ -z "${FAST_ONLY:-}" ]; then
  hf_run sft_gemma2.py 110 hf_seed_lora --warmup 2 --time-cap "${SEED_CAP:-20}"
  hf_run sft_gemma2.py 80 hf_tuned_lora --bs 16 --ga 1 --no-gc --padding-free --time-cap "${TUNED_CAP:-12}"
fi
fast() {  # fast NAME ARGS...
  local name=$1; shift
  echo "=== $name"; timeout -k 10 "${FAST_LIMIT:-170}" python3 bench/bench_fast.py --name "$name" --out "$OUT/$name.json" \
    --reference "$OUT/hf_seed_lora.json" "$OUT/hf_tuned_lora.json" "$@" > /tmp/log.txt 2>&1
  echo "rc=$?"; log_run "$name"; grep RESULT /tmp/log.txt | tail -1; grep -v -E "Warning|warn" /tmp/log.txt | tail -6
}
fast fast_lora_recipe ${FAST_ARGS:-}
