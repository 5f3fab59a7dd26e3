#!/usr/bin/env bash
# Where the fast engine's step time goes (issue 11): bench/bench_fast.py on preset:gemma-2-2b, each variant with
# `--profile` (torch.profiler over already compiled steps: wall time vs GPU busy time per step, the top kernels
# in <name>.profile.txt). Variants: the recipe's 8-row step; the same with CUDA graphs (compile mode
# reduce-overhead); the planner's batch (64 rows per step). Usage: OUT=$OUT bash bench/run_gpu_profile.sh
set -u
source "$(dirname "$0")/gpu_env.sh"
prof() {  # prof NAME LIMIT_S ARGS...
  local name=$1 limit=$2; shift 2
  echo "=== $name"; timeout -k 10 "$limit" python3 bench/bench_fast.py --name "$name" --out "$OUT/$name.json" \
    --warmup 3 --steps "${PROFILE_STEPS:-20}" --profile 3 "$@" > /tmp/log.txt 2>&1
  echo "rc=$?"; log_run "$name"; grep RESULT /tmp/log.txt | tail -1; grep -v -E "Warning|warn" /tmp/log.txt | tail -4
}
prof recipe_step "${LIMIT_RECIPE:-120}"
prof recipe_step_cudagraphs "${LIMIT_GRAPHS:-120}" --compile-mode reduce-overhead
prof planner_batch64 "${LIMIT_BATCH:-130}" --rows-per-step 64
(cd "$OUT" && tar czf profiles.tgz ./*.profile.txt && rm -f ./*.profile.txt)
