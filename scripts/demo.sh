#!/usr/bin/env bash
# Set up (first time: .venv, the packages, the real model converted once into $PEFTLAB_CACHE) and run the demo:
# the real Gemma 3 270M learning 4 Banking77 intents with LoRA and QLoRA, and the health guard, on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -c "from peftlab.demo import prepare_model; prepare_model()"   # set-up: a no-op once cached
exec .venv/bin/peftlab demo "$@"
