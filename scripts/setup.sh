#!/usr/bin/env bash
# Sets up everything on a fresh machine: a virtual environment in .venv with the CPU build
# of PyTorch (installed first, so no multi-GB CUDA build is pulled), then this package in
# editable mode with its dev tools. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q --upgrade pip
  # Where pip's index serves CUDA wheels for Linux, set TORCH_INDEX_URL (e.g.
  # https://download.pytorch.org/whl/cpu) to keep the CPU build.
  .venv/bin/python -m pip install -q torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
.venv/bin/python -m pip install -q -e ".[dev]"
