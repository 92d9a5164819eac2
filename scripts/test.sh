#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run every check that runs without a GPU:
#   1. nvcc compile check of each csrc/**/*.cu alone for sm_80 and sm_90 (when nvcc is present; no
#      torch headers, which keeps the kernel files torch-free),
#   2. the C++ tests of the shared host/device math headers (cmake + ctest),
#   3. the Triton kernels on CPU tensors (TRITON_INTERPRET=1, tests marked `triton`),
#   4. the main suite (everything not marked `triton` or `cuda`), 3 and 4 by scripts/run_pytest.sh.
# The CUDA-marked tests and the compiled Triton kernels run on a GPU machine: benchmarks/gpu_check.sh.
# The full extension build with the CUDA kernels, and the oldest supported torch, are
# scripts/test_torch_range.sh (CI runs both).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
PY=${BISSL_FAST_VENV:-.venv}/bin/python
status=0

if command -v nvcc >/dev/null 2>&1; then
  echo "== nvcc compile check (sm_80, sm_90)"
  while IFS= read -r cu; do
    for arch in sm_80 sm_90; do
      if nvcc -std=c++17 -O3 -arch="$arch" -Icsrc/include -c "$cu" -o /dev/null; then
        echo "ok   $cu ($arch)"
      else
        echo "FAIL $cu ($arch)"; status=1
      fi
    done
  done < <(find csrc -name '*.cu' | sort)
  "$PY" scripts/cuda_resources.py || status=1
else
  echo "== nvcc not found: skipping the CUDA compile check"
fi

echo "== C++ math header tests (ctest)"
if command -v cmake >/dev/null 2>&1; then
  cmake -S . -B build/cmake-tests -DBISSL_FAST_BUILD_EXTENSION=OFF >/dev/null \
    && cmake --build build/cmake-tests -j2 >/dev/null \
    && ctest --test-dir build/cmake-tests --output-on-failure || status=1
else
  echo "cmake not found"; status=1
fi

bash scripts/run_pytest.sh "$PY" || status=1

exit $status
