#!/usr/bin/env bash
# Build bissl_fast (package + extension) against torch==VERSION in its cached venv (scripts/torch_venv.sh)
# into build/torch-VERSION/lib and import that build. With nvcc on PATH the CUDA kernels are compiled
# too, as a user on a CUDA machine does: the CUDA build of torch from the package index, nvcc,
# FORCE_CUDA=1 (no GPU needed), TORCH_CUDA_ARCH_LIST (default "8.0;9.0"); setup.py finds the toolkit
# behind an nvcc wrapper. Then cuda_compiled() must be True, every op must have its CUDA kernel
# registered, and the cubins per arch are listed (cuobjdump).
#   --cuda: fail when nvcc is missing (CI) instead of building the CPU kernels only.
# The build folder persists, so ninja recompiles only what changed. Prints the lib folder on the last line.
# Usage: lib=$(bash scripts/build_against_torch.sh [--cuda] VERSION | tail -1)
set -euo pipefail
cd "$(dirname "$0")/.."
cuda=0
if [ "${1:-}" = "--cuda" ]; then cuda=1; shift; fi
version=${1:?usage: scripts/build_against_torch.sh [--cuda] TORCH_VERSION}
venv=$(bash scripts/torch_venv.sh "$version")
base=$PWD/build/torch-$version
if command -v nvcc >/dev/null; then
  cuda=1
  export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}
elif [ "$cuda" = 1 ]; then
  echo "build_against_torch: --cuda needs nvcc on PATH" >&2; exit 1
fi
kernels=$([ "$cuda" = 1 ] && echo "CPU + CUDA for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST" || echo "CPU only")
echo "== build against torch $version ($kernels) in $base" >&2
start=$SECONDS
MAX_JOBS=${MAX_JOBS:-2} "$venv/bin/python" setup.py -q build --build-base "$base" --build-lib "$base/lib" \
  --build-temp "$base/temp" >&2
echo "== built in $((SECONDS - start)) s" >&2
# Results' provenance hashes csrc/, setup.py and benchmarks/ beside the package (bissl_fast/_provenance.py): linked
# here, a test run from this build computes the checkout's source hash, as the README blocks' staleness checks expect.
for source in csrc setup.py benchmarks; do ln -sfn "$PWD/$source" "$base/lib/$source"; done
so=$(ls "$base"/lib/bissl_fast/_C.*.so)
# -P: do not put the current folder (this checkout, whose in-place _C may be built for another torch) on sys.path.
PYTHONPATH="$base/lib" "$venv/bin/python" -P - "$base/lib" "$cuda" <<'PY' >&2
import sys

import torch

import bissl_fast
from bissl_fast._backends import build_mismatch, extension

lib, want_cuda = sys.argv[1], sys.argv[2] == "1"
assert bissl_fast.__file__.startswith(lib), f"imported {bissl_fast.__file__}, not the build in {lib}"
C = extension()  # loads the library after checking the torch it records against this one
assert build_mismatch(C.__file__) is None
print(f"imported {C.__file__} with torch {torch.__version__}: cuda_compiled() = {C.cuda_compiled()}; {C.build_info()}")
assert C.cuda_compiled() == want_cuda, "cuda_compiled() does not match the build"
if want_cuda:
    ops = ("byol_fwd", "byol_bwd", "byol_hvp", "cg_dot", "cg_update", "cg_direction",
           "batch_norm_fwd", "batch_norm_bwd", "batch_norm_dbwd")
    missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"bissl_fast::{op}", "CUDA")]
    assert not missing, f"no CUDA kernel registered for {missing}"
    print("CUDA kernels registered for", ", ".join(ops))
PY
if [ "$cuda" = 1 ]; then
  echo "== cubins in $(basename "$so") (du: $(du -h "$so" | cut -f1))" >&2
  # cuobjdump is not in every toolkit install; triton ships one.
  cuobjdump=$(command -v cuobjdump || "$venv/bin/python" -c \
    "import os, triton; print(os.path.join(os.path.dirname(triton.__file__), 'backends/nvidia/bin/cuobjdump'))")
  "$cuobjdump" --list-elf "$so" >&2 && echo >&2
fi
echo "$base/lib"
