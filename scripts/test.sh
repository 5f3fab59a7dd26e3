#!/usr/bin/env bash
# Set up (first time) and run the checks CI runs: ruff, then the pytest suite (CPU only).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests
exec .venv/bin/pytest -q "$@"
