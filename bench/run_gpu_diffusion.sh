#!/usr/bin/env bash
# The issue-4 GPU benchmark: peftlab's diffusion task vs the plain Hugging Face reference (bench-hf sd15_lora.py,
# experiment C), interleaved in one call on one GPU: SD 1.5 architecture (random weights), 512 px, bs1 x GA4, bf16.
# Group A (~7 min): the seed settings, LoRA vs QLoRA, plus the two QLoRA variants that take the anomaly apart.
# Group B (~6 min): latent caching, and batch 4 x GA 1 (the fp32-activation effect grows with the batch).
# Group F (issue 15, BUDGET s): diffusion.speed's fast step (cache, measured micro-batch, compile + CUDA graphs) for
# QLoRA, the plain script at its best stock tuning (C4) and at the original settings (C1), LoRA, then QLoRA
# uncompiled and QLoRA again on the compile cache the first run left (a warm start).
# Needs .bench-hf/ carried as for run_gpu_sft.sh (bench/README.md). Usage: OUT=... bash bench/run_gpu_diffusion.sh A|B|F
set -u
G=${1:?group: A or B}
source "$(dirname "$0")/gpu_env.sh"
hf() { hf_run sd15_lora.py 110 "$@" --no-flops; }  # hf NAME ARGS...
ours() {  # ours NAME VARIANT [--set KEY=VALUE ...]
  local name=$1 variant=$2 t0=$SECONDS; shift 2
  echo "=== $name"; timeout -k 10 "${OURS_LIMIT:-150}" python3 bench/bench_diffusion.py --variant "$variant" --out "$OUT/$name.json" "$@" > /tmp/log.txt 2>&1
  echo "rc=$? wall=$((SECONDS - t0))s"; log_run "$name"; grep RESULT /tmp/log.txt | tail -1; tail -3 /tmp/log.txt
}
BS4=(--set train.batch_size=4 --set train.grad_accum=1 --warmup 8 --steps 30)
if [ "$G" = A ]; then
  ours peftlab_lora lora              # first: also writes the preset checkpoint (not timed)
  hf C1_seed_lora --time-cap 30
  ours peftlab_qlora qlora
  hf C2_seed_qlora --quant nf4 --time-cap 30
  ours peftlab_qlora_peft_upcast qlora_peft_upcast
  hf C3_seed_qlora_no_kbit_prep --quant nf4 --no-kbit-prep --time-cap 20
  ours peftlab_qlora_lean_stock qlora_lean_stock
  python3 bench/bench_diffusion.py --explain --out "$OUT/explain.json" | tail -1
elif [ "$G" = F ]; then  # issue 15: the fast step beside the plain script, runs skipped once $BUDGET s are spent
  start=$SECONDS; left() { [ $((SECONDS - start)) -lt "${BUDGET:-270}" ] || { echo "=== skipped $1 (budget)"; false; }; }
  # QLoRA first (the first call's limit fell during its compile, after LoRA's), then the plain script at its best
  # stock tuning (C4) and at the original settings (C1); dynamo logs graph breaks and recompiles into log.txt (the
  # summary counts graphs, breaks, CUDA-graph skips).
  # Runs after the first start only while fewer than $BUDGET s are spent; LoRA_LIMIT caps the LoRA run.
  FAST=(--warmup 10 --steps 40 --log-every 5)
  LOGS=graph_breaks,recompiles
  TORCH_LOGS=$LOGS ours peftlab_qlora_fast qlora_fast "${FAST[@]}"
  hf C4_tuned_lora_bs4 --bs 4 --ga 1 --steps 30 --time-cap 8
  hf C1_seed_lora --time-cap 10  # both plain references before LoRA: a budget cut must not leave a ratio without its pair
  left lora && TORCH_LOGS=$LOGS OURS_LIMIT=${LORA_LIMIT:-${OURS_LIMIT:-150}} ours peftlab_lora_fast lora_fast "${FAST[@]}"
  left qlora_eager && ours peftlab_qlora_fast_eager qlora_fast_eager "${FAST[@]}"
  left qlora_warm && ours peftlab_qlora_fast_warm qlora_fast "${FAST[@]}"  # on the compile cache the first run saved
else
  ours peftlab_lora_cache lora_cache
  ours peftlab_qlora_cache qlora_cache
  hf C4_tuned_lora_bs4 --bs 4 --ga 1 --steps 30 --time-cap 20
  ours peftlab_lora_bs4 lora "${BS4[@]}"
  hf C5_tuned_qlora_bs4_no_kbit_prep --quant nf4 --no-kbit-prep --bs 4 --ga 1 --steps 30 --time-cap 20
  ours peftlab_qlora_bs4 qlora "${BS4[@]}"
fi
python3 bench/report_diffusion.py "$OUT" | tee "$OUT/table.md"
