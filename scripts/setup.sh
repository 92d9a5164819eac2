#!/usr/bin/env bash
# Set up a development environment from a fresh checkout: a venv in .venv with the pinned CPU
# toolchain, bissl_fast installed in editable mode, and its C++ extension built in place.
# Idempotent and quick when nothing changed (a few seconds):
#   - the pinned packages are installed only when the pin list changed (stamp in the venv);
#   - the editable install is pure Python (BISSL_FAST_SKIP_EXT=1) and redone only when the packaging files
#     changed: `pip install -e .` with the extension would recompile it from scratch in a temporary folder
#     on every call;
#   - the extension is built with `setup.py build_ext --inplace`, whose build folder (build/) persists, so
#     ninja recompiles only changed sources; it is skipped entirely when no C++ source, header, setup.py,
#     the torch version or the CUDA settings changed (stamp in build/).
# Usage: `bash scripts/setup.sh`. BISSL_FAST_VENV picks the venv folder, PYTHON the interpreter that creates it.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${BISSL_FAST_VENV:-.venv}
PY="$VENV/bin/python"

if [ ! -x "$PY" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# torch==2.13.0 is the CPU wheel on these machines; a CUDA machine keeps the torch it already has
# when BISSL_FAST_KEEP_TORCH=1 (see README). numpy<2.4 only for the Triton interpreter tests (README).
if [ "${BISSL_FAST_KEEP_TORCH:-0}" = "1" ]; then
  TORCH_REQ=()
else
  TORCH_REQ=("torch==2.13.0" "triton==3.6.0")
fi
REQS=("${TORCH_REQ[@]}" "numpy<2.4" pytest pytest-benchmark ninja pybind11 "setuptools>=64" wheel scikit-learn
  matplotlib tqdm pillow)
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
