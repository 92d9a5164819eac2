#!/usr/bin/env bash
# The two pytest passes of the CPU suite, run by the interpreter PY (default: the dev venv's):
#   1. the Triton kernels on CPU tensors (TRITON_INTERPRET=1, tests marked `triton`; triton 3.6's
#      interpreter needs numpy<2.4, triton 3.8's runs with 2.4: scripts/setup.sh pins each venv's numpy;
#      on a GPU the same tests run compiled, from benchmarks/gpu_check.sh, with whatever numpy is there),
#   2. the main suite (everything not marked `triton` or `cuda`).
# Runs in the current folder, so a caller can put its own build of bissl_fast first on sys.path.
# Usage: bash scripts/run_pytest.sh [PY]
set -uo pipefail
tests="$(cd "$(dirname "$0")/../tests" && pwd)"
PY=${1:-${BISSL_FAST_VENV:-.venv}/bin/python}
status=0
echo "== Triton kernels under TRITON_INTERPRET=1 ($("$PY" -c 'import torch; print("torch", torch.__version__)'))"
TRITON_INTERPRET=1 "$PY" -m pytest -q -p no:cacheprovider -m "triton and not cuda" "$tests" || status=1
echo "== main suite"
# The `integration` tests (real timm / torchvision / lightly) have their own pass: scripts/run_integration.sh.
"$PY" -m pytest -q -p no:cacheprovider -m "not triton and not cuda and not integration" "$tests" || status=1
exit $status
