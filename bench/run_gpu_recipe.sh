#!/usr/bin/env bash
# The original gemma2-dolly recipe, unchanged, through the CLI on one GPU: train.engine auto (the fast engine on CUDA)
# and, in the same call, the hf engine (trl's SFTTrainer) at the same settings; preset:gemma-2-2b (random weights).
# Usage (device tool, carry .bench-hf and the tree): OUT=$OUT bash bench/run_gpu_recipe.sh
#   WARM_START=1: instead, the fast engine twice in a row on an empty compile cache (cold, then warm), each timed
#   from the command's launch to its first optimizer step (the first train record in metrics.jsonl, logged every
#   step): $OUT/warm_start.json. START_STEPS (default 30), START_LIMIT (s per run, default 200), START_ARGS.
set -u
source bench/gpu_env.sh
RUNS=/tmp/runs-recipe
one() {  # one NAME LIMIT_S ARGS...: one CLI run; prints launch-to-first-step seconds into /tmp/first_step.txt
  local name=$1 limit=$2; shift 2
  echo "=== $name"
  local start; start=$(date +%s.%N); echo none > /tmp/first_step.txt
  timeout -k 10 "$limit" python3 -m peftlab train gemma2-dolly --set model.source=preset:gemma-2-2b \
    --runs-dir "$RUNS" --name "$name" "$@" > /tmp/log.txt 2>&1 &
  local pid=$!
  while kill -0 $pid 2>/dev/null; do
    if grep -qs '"kind": *"train"' "$RUNS/$name/metrics.jsonl"; then
      python3 -c "print(round($(date +%s.%N) - $start, 1))" > /tmp/first_step.txt; break
    fi
    sleep 0.2
  done
  wait $pid; echo "rc=$? first step after $(cat /tmp/first_step.txt) s"; log_run "$name"; grep -v "^\s*$" /tmp/log.txt | tail -4
  cp "$RUNS/$name/summary.json" "$OUT/$name-summary.json" 2>/dev/null
}
if [ -n "${WARM_START:-}" ]; then
  rm -rf "$PEFTLAB_CACHE/compile"
  for name in cold warm; do
    # shellcheck disable=SC2086  # START_ARGS: more --set words (e.g. a shorter generation after training)
    # engine forced: on a run this short `auto` weighs the cold compile and picks hf (it did, 2026-12-02)
    one "$name" "${START_LIMIT:-200}" --set train.engine=fast --set train.max_steps="${START_STEPS:-30}" \
      --set train.logging_steps=1 ${START_ARGS:-}
    echo "{\"$name\": $(sed 's/none/null/' /tmp/first_step.txt)}" > "/tmp/first_$name.json"
  done
  python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
times = {k: v for n in ("cold", "warm") for k, v in json.loads(Path(f"/tmp/first_{n}.json").read_text()).items()}
fields = ("compile_s", "compile_cache_hit", "first_step_s", "steady_tokens_per_s", "mfu", "runtime_s")
runs = {n: {k: json.loads((out / f"{n}-summary.json").read_text()).get(k) for k in fields}
        for n in times if (out / f"{n}-summary.json").is_file()}
result = {"launch_to_first_step_s": times, "summaries": runs}
(out / "warm_start.json").write_text(json.dumps(result, indent=1))
print("RESULT", json.dumps(result))
PY
  exit 0
fi
one auto ${AUTO_LIMIT:-300} --set train.max_steps=${AUTO_STEPS:-120} --set train.logging_steps=20
one hf ${HF_LIMIT:-150} --set train.engine=hf --set train.max_steps=${HF_STEPS:-12} --set train.logging_steps=4
python3 -m peftlab compare "$RUNS/hf" "$RUNS/auto" --format markdown | tee "$OUT/table.md"
