#!/usr/bin/env bash
# Set up a development environment from a fresh checkout: a venv in .venv with the pinned CPU
# toolchain, and bissl_fast installed in editable mode with its C++ extension built.
# Idempotent: re-running only rebuilds what changed. Usage: source-free, `bash scripts/setup.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${BISSL_FAST_VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch==2.13.0 is the CPU wheel on these machines; a CUDA machine keeps the torch it already has
# when BISSL_FAST_KEEP_TORCH=1 (see README).
if [ "${BISSL_FAST_KEEP_TORCH:-0}" = "1" ]; then
  TORCH_REQ=()
else
  TORCH_REQ=("torch==2.13.0" "triton==3.6.0")
fi
"$VENV/bin/python" -m pip install -q "${TORCH_REQ[@]}" "numpy<2.4" pytest pytest-benchmark ninja pybind11 \
  setuptools wheel scikit-learn matplotlib tqdm pillow
MAX_JOBS=${MAX_JOBS:-2} "$VENV/bin/python" -m pip install -q --no-build-isolation -e .
"$VENV/bin/python" -c "import bissl_fast; print('bissl_fast backends:', bissl_fast.backends())"
