#!/usr/bin/env bash
# Issue 11: Gemma 3 270M with its real weights (the Q4_K_M GGUF, dequantized on load) fine-tuned on Dolly
# (recipe gemma3-270m-dolly: LoRA r16 on the 7 projections, batch 4 x grad accumulation 4, max length 512), the
# fast engine and the hf engine at the same optimizer steps, in one call: tokens/s of each (the fast engine's
# steady state, compile apart: its summary's steady_tokens_per_s and compile_s), the eval loss of each on the same
# held-out 1% after the same steps, and the targets (fast >= 50,000 tokens/s; eval losses within 1%).
# The two engines draw their batches in different orders (the fast engine's seeded permutation, the Trainer's
# sampler), so the eval losses agree as two runs of the recipe do, not to the last digit.
# GPU (the GGUF assembled beforehand, as bench/README.md says; wheels carried as for run_gpu_fast.sh):
#   GGUF=/tmp/gg/gemma-3-270m-q4_k_m.gguf OUT=$OUT bash bench/run_gpu_gemma3.sh       (STEPS, LIMIT: s per run)
# CPU check of this script (the tiny Gemma-2 twin, a few steps, same commands and report):
#   PY=.venv/bin/python bash bench/run_gpu_gemma3.sh --tiny
set -u
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--tiny" ]; then
  OUT=${OUT:-/tmp/peftlab-gemma3-tiny}; mkdir -p "$OUT"; : > "$OUT/log.txt"
  export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
  log_run() { { echo "=== $1"; tr '\r' '\n' < /tmp/log.txt; } >> "$OUT/log.txt"; }
  MODEL=preset:tiny-gemma2; STEPS=${STEPS:-4}; LIMIT=${LIMIT:-400}; PY=${PY:-python3}
  EXTRA=(--set data.max_samples=300 --set data.max_length=64 --set data.eval_fraction=0.1)
else
  source bench/gpu_env.sh
  MODEL=${GGUF:-/tmp/gg/gemma-3-270m-q4_k_m.gguf}
  [ -f "$MODEL" ] || { echo "error: GGUF: no file at $MODEL; fix: assemble it first (bench/README.md)"; exit 2; }
  STEPS=${STEPS:-200}; LIMIT=${LIMIT:-270}; PY=python3; EXTRA=()
fi
RUNS=/tmp/peftlab-gemma3-runs; rm -rf "$RUNS"
COMMON=(--set "model.source=$MODEL" --set "train.max_steps=$STEPS" --set train.logging_steps=25
        --set train.eval_steps=null --set train.save_steps=null --set eval.compare_base=false
        --set eval.max_new_tokens=16 "${EXTRA[@]}")
one() {  # one ENGINE: gemma3-270m-dolly on that engine, its summary kept as $OUT/ENGINE-summary.json
  local engine=$1
  echo "=== $engine"
  timeout -k 10 "$LIMIT" "$PY" -m peftlab train gemma3-270m-dolly "${COMMON[@]}" --set "train.engine=$engine" \
    --runs-dir "$RUNS" --name "$engine" > /tmp/log.txt 2>&1
  echo "rc=$?"; log_run "$engine"; grep -v "^\s*$" /tmp/log.txt | tail -3
  cp "$RUNS/$engine/summary.json" "$OUT/$engine-summary.json" 2>/dev/null
}
one fast
one hf
"$PY" - "$OUT" "$MODEL" "$STEPS" <<'PY'
import json, sys
from pathlib import Path

out, model, steps = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
runs = {e: json.loads((out / f"{e}-summary.json").read_text()) for e in ("fast", "hf")
        if (out / f"{e}-summary.json").is_file()}
keys = ("status", "steps", "tokens_per_s", "steady_tokens_per_s", "compile_s", "mfu", "eval_loss", "runtime_s",
        "peak_mem_allocated_gib", "plan_text")
result = {"model": model, "recipe": "gemma3-270m-dolly", "steps": steps,
          "runs": {e: {k: s.get(k) for k in keys} for e, s in runs.items()}}
if len(runs) == 2 and all(s.get("eval_loss") is not None for s in runs.values()):
    fast, hf = runs["fast"], runs["hf"]
    rate = fast.get("steady_tokens_per_s") or fast.get("tokens_per_s")
    result["fast_over_hf_tokens_per_s"] = round(rate / hf["tokens_per_s"], 2)
    result["eval_loss_relative_difference"] = round(abs(fast["eval_loss"] - hf["eval_loss"]) / hf["eval_loss"], 5)
    result["targets"] = {"fast_tokens_per_s_at_least_50000": rate >= 50_000,
                         "eval_loss_within_1_percent": result["eval_loss_relative_difference"] <= 0.01}
(out / "gemma3.json").write_text(json.dumps(result, indent=1))
print("RESULT", json.dumps(result))
PY
