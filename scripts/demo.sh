#!/usr/bin/env bash
# Set up (first time) and run the demo: LoRA vs QLoRA on the tiny Gemma-2 twin, bundled Dolly data, CPU only.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/peftlab demo "$@"
