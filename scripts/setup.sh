#!/usr/bin/env bash
# Set up a development environment from a fresh checkout: a venv in .venv with the pinned packages
# (PINS below: the newest torch this index serves, its triton and torchvision, the integration packages),
# bissl_fast installed in editable mode, and its C++ extension built in place.
# Idempotent and quick when nothing changed (a few seconds):
#   - the pinned packages are installed only when the pin list changed (stamp in the venv);
#   - the editable install is pure Python (BISSL_FAST_SKIP_EXT=1) and redone only when the packaging files
#     changed: `pip install -e .` with the extension would recompile it from scratch in a temporary folder
#     on every call;
#   - the extension is built with `setup.py build_ext --inplace`, whose build folder (build/) persists, so
#     ninja recompiles only changed sources; it is skipped entirely when no C++ source, header, setup.py,
#     the torch version or the CUDA settings changed (stamp in build/).
# Usage: `bash scripts/setup.sh`. BISSL_FAST_VENV picks the venv folder, PYTHON the interpreter that creates it.
# `source scripts/setup.sh` only defines the pins below (scripts/torch_venv.sh reads them).

# Exact pins of everything that changes numbers or behaviour, one reason each; the tools are unpinned.
# The dev venv: the newest torch this index serves and what goes with it (torch first: torch_venv.sh
# and test_torch_range.sh read it).
PINS=(
  "torch==2.14.1"        # the newest torch here; its default wheel (the CUDA 13.0 build) also runs on CPU
  "triton==3.8.0"        # the triton torch 2.14.1 requires (triton~=3.8.0)
  "torchvision==0.29.1"  # the release built for torch 2.14: another one's C++ ops do not load beside it
  "numpy==2.4.6"         # the newest numpy here; triton 3.8's interpreter runs the Triton tests with it
  "scikit-learn==1.9.1"  # the demo's probes and digits data: its solvers set the demo's numbers
  "timm==1.0.31"         # real models for the integration tests
  "lightly==1.6.0"       # real SimCLR/BYOL heads and losses for the integration tests
)
# The oldest supported torch, as CI tests it (scripts/test_torch_range.sh --oldest, in scripts/torch_venv.sh;
# torch first).
OLDEST_PINS=(
  "torch==2.11.0"        # the oldest supported torch, the GPU machines' (the index's CUDA 13.0 build)
  "triton==3.6.0"        # the triton torch 2.11.0 requires
  "numpy==2.3.5"         # triton 3.6's interpreter fails on numpy 2.4 (an array of ndim > 0 made a scalar)
)
TOOLS=(pytest pytest-benchmark ninja pybind11 "setuptools>=64" wheel matplotlib tqdm pillow tensorboard)
if [ "${BASH_SOURCE[0]}" != "$0" ]; then return 0; fi

set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${BISSL_FAST_VENV:-.venv}
PY="$VENV/bin/python"

if [ ! -x "$PY" ]; then
  "$PYTHON" -m venv "$VENV"
fi
if [ "${BISSL_FAST_KEEP_TORCH:-0}" = "1" ]; then
  # A CUDA machine's venv (BISSL_FAST_VENV) keeps its torch and what is paired with one torch release (triton,
  # torchvision, numpy; timm and lightly would pull in torchvision): naming the installed torch makes pip fail
  # rather than replace it.
  if ! torch_version=$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null); then
    echo "setup: BISSL_FAST_KEEP_TORCH=1 but $PY has no torch; install one, or drop BISSL_FAST_KEEP_TORCH" >&2
    exit 1
  fi
  REQS=("torch==$torch_version")
  for pin in "${PINS[@]}"; do
    case $pin in torch==* | triton==* | torchvision==* | numpy==* | timm==* | lightly==*) ;; *) REQS+=("$pin") ;; esac
  done
  REQS+=("${TOOLS[@]}")
else
  REQS=("${PINS[@]}" "${TOOLS[@]}")
fi
deps_stamp="$VENV/.bissl_fast_deps"
if [ "$(cat "$deps_stamp" 2>/dev/null)" != "${REQS[*]}" ]; then
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q "${REQS[@]}"
  printf '%s' "${REQS[*]}" > "$deps_stamp"
fi

pkg_key=$(cat pyproject.toml setup.py | sha256sum | cut -d' ' -f1)
pkg_stamp="$VENV/.bissl_fast_editable"
if [ "$(cat "$pkg_stamp" 2>/dev/null)" != "$pkg_key" ]; then
  BISSL_FAST_SKIP_EXT=1 "$PY" -m pip install -q --no-build-isolation --no-deps -e .
  printf '%s' "$pkg_key" > "$pkg_stamp"
fi

if [ "${BISSL_FAST_SKIP_EXT:-0}" != "1" ]; then
  torch_dist=$(cd "$VENV" && ls -d lib/python*/site-packages/torch-*.dist-info 2>/dev/null || true)
  ext_key=$( { find csrc -type f | LC_ALL=C sort | xargs sha256sum; sha256sum setup.py;
               echo "$torch_dist ${FORCE_CUDA:-} ${TORCH_CUDA_ARCH_LIST:-} ${CUDA_HOME:-}"; } | sha256sum | cut -d' ' -f1)
  ext_stamp=build/.bissl_fast_ext
  if [ "$(cat "$ext_stamp" 2>/dev/null)" != "$ext_key" ] || ! ls bissl_fast/_C.*.so >/dev/null 2>&1; then
    echo "== building bissl_fast._C (C++ sources changed)"
    MAX_JOBS=${MAX_JOBS:-2} "$PY" setup.py -q build_ext --inplace
    mkdir -p build && printf '%s' "$ext_key" > "$ext_stamp"
  fi
fi
"$PY" -c "import bissl_fast; print('bissl_fast backends:', bissl_fast.backends())"
