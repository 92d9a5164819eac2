#!/usr/bin/env bash
# One command for a CUDA machine: build the extension with its CUDA kernels, run the CUDA- and
# Triton-marked tests on the GPU, run the benchmark suites, and write everything to
# benchmarks/results/<date>_<gpu>/ (commit that folder). Sized for < 10 minutes on one GPU.
#   bash benchmarks/gpu_check.sh            # uses the python on PATH (torch with CUDA already installed)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
gpu=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_'))") || { echo "no CUDA GPU visible"; exit 1; }
out=benchmarks/results/$(date -u +%Y%m%d)_${gpu}
mkdir -p "$out"
status=0

"$PY" -m pip install -q "numpy<2.4" pytest pytest-benchmark ninja pybind11 matplotlib scikit-learn tqdm pillow || status=1
MAX_JOBS=${MAX_JOBS:-16} "$PY" -m pip install -q --no-build-isolation -e . 2>&1 | tail -20 | tee "$out/build.log"
"$PY" -c "import bissl_fast, torch, json; print(json.dumps({'backends': bissl_fast.backends(), 'reasons': bissl_fast.backend_reasons(), 'torch': torch.__version__, 'cuda': torch.version.cuda}))" | tee "$out/backends.json" || status=1

timeout 240 "$PY" -m pytest -q -p no:cacheprovider -m "cuda or triton" tests --junitxml="$out/gpu_tests.xml" 2>&1 | tail -30 | tee "$out/gpu_tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

timeout 420 "$PY" -m bissl_fast.cli bench --device cuda --out "$out" 2>&1 | tail -80 | tee "$out/bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "results in $out (commit it)"
exit $status
