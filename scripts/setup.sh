#!/usr/bin/env bash
# Create .venv and install peftlab with its test tools. Sourced by demo.sh and test.sh.
# On a machine without an NVIDIA GPU this installs torch's CPU build, never the multi-GB CUDA one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    .venv/bin/pip install -q "torch>=2.6,<2.15"
  else
    .venv/bin/pip install -q --retries 0 --timeout 20 "torch>=2.6,<2.15" --index-url https://download.pytorch.org/whl/cpu \
      || .venv/bin/pip install -q "torch==2.13.0"   # a local CPU wheel where the PyTorch index is unreachable
  fi
fi
if ! .venv/bin/python -c "import peftlab, pytest" 2>/dev/null; then
  .venv/bin/pip install -q -e ".[test]"
fi
