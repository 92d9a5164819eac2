#!/usr/bin/env bash
# One command for a CUDA machine as it is (nothing installed from the network): build the extension
# with its CUDA kernels, run the CUDA- and Triton-marked tests on the GPU (Triton compiled, so any
# numpy works), run the benchmark suites, and write everything to benchmarks/results/<date>_<gpu>/
# (commit that folder).
#
#   bash benchmarks/gpu_check.sh                  # all steps: build tests bench
#   bash benchmarks/gpu_check.sh build tests      # some steps (a later call reuses the build in place)
#
# Needs python3 with a CUDA build of torch (2.11-2.13), triton, numpy, and pytest + pytest-benchmark for
# the tests and benchmarks; nvcc (or CUDA_HOME) for the CUDA kernels. If pytest or pytest-benchmark is
# missing the script says so and installs them from wheels in .whl/ (no network: make that folder on a
# machine with one, `pip download pytest pytest-benchmark -d .whl`, and bring it along; the device tool
# needs `carry: [".whl"]`, the folder is git-ignored) into build/gpu_pydeps/, never into the system env.
#
# Budget: one 30-minute device lease, machine start included. Each step has its own timeout
# (GPU_CHECK_BUILD_S=240, GPU_CHECK_TESTS_S=300, GPU_CHECK_BENCH_S=540: about 18 minutes); a command
# on the device tool may run 10 minutes, so there run `build tests` in one call and `bench` in the
# next. Every step writes its results as it goes, so a timeout still leaves them; when $OUT is set
# (the device tool brings back what is under it) the results folder is also packed into
# $OUT/gpu_results_<date>_<gpu>.tar.gz after every step.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUILD_S=${GPU_CHECK_BUILD_S:-240}
TESTS_S=${GPU_CHECK_TESTS_S:-300}
BENCH_S=${GPU_CHECK_BENCH_S:-540}
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(build tests bench)

if ! gpu=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_'))" 2>/dev/null); then
  echo "gpu_check: no CUDA GPU visible to $PY ($("$PY" -c 'import torch; print("torch", torch.__version__)' 2>&1))"
  exit 1
fi
name=$(date -u +%Y%m%d)_${gpu}
out=benchmarks/results/$name
mkdir -p "$out"
status=0
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

pack() {  # copy the results so far to $OUT (one file: the device tool brings back few, shallow files)
  if [ -n "${OUT:-}" ]; then
    tar czf "$OUT/gpu_results_$name.tar.gz" -C benchmarks/results "$name" && cp "$out/summary.txt" "$OUT/" 2>/dev/null
  fi
}
note() { echo "$*" | tee -a "$out/summary.txt"; }

note "== gpu_check $(date -u +%FT%TZ): steps ${steps[*]} on $gpu"
"$PY" - > "$out/env.json" <<'PY'
import json, platform, shutil
import torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0), "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
        "nvcc": shutil.which("nvcc")}
for mod in ("triton", "numpy", "pytest", "pytest_benchmark", "ninja", "torchvision", "timm", "matplotlib"):
    try:
        info[mod] = __import__(mod).__version__
    except Exception as exc:  # report, do not fail: the steps below say what they miss
        info[mod] = f"missing ({type(exc).__name__})"
print(json.dumps(info, indent=1))
PY
cat "$out/env.json" >> "$out/summary.txt"

if ! "$PY" -c "import pytest, pytest_benchmark" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    note "gpu_check: pytest or pytest-benchmark missing: installing them from .whl/ into build/gpu_pydeps"
    "$PY" -m pip install -q --no-index --find-links .whl --target build/gpu_pydeps pytest pytest-benchmark \
      2>&1 | tail -5 | tee -a "$out/summary.txt"
    export PYTHONPATH="$PYTHONPATH:$PWD/build/gpu_pydeps"
  else
    note "gpu_check: pytest or pytest-benchmark missing and no wheels in .whl/ (see the header of this script):" \
      "the tests and bench steps will fail"
  fi
fi
pack

for step in "${steps[@]}"; do
  start=$SECONDS
  case $step in
    build)
      # In place (no pip: nothing to resolve or download). sm_90 only: this machine's GPU.
      TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
        timeout "$BUILD_S" "$PY" setup.py build_ext --inplace > "$out/build.log" 2>&1
      rc=$?
      tail -5 "$out/build.log"
      "$PY" - > "$out/backends.json" 2>&1 <<'PY' || rc=1
import json
import torch
import bissl_fast
import bissl_fast._C as C
print(json.dumps({"cuda_compiled": C.cuda_compiled(), "backends": bissl_fast.backends(),
                  "reasons": bissl_fast.backend_reasons(), "torch": torch.__version__}, indent=1))
PY
      cat "$out/backends.json" ;;
    tests)
      timeout "$TESTS_S" "$PY" -m pytest -q -p no:cacheprovider -m "cuda or triton" tests \
        --junitxml="$out/gpu_tests.xml" > "$out/gpu_tests.log" 2>&1
      rc=$?
      tail -15 "$out/gpu_tests.log" ;;
    bench)
      # SIGINT at the time limit: bench then writes the report of the suites that finished.
      timeout --signal=INT --kill-after=120 "$BENCH_S" "$PY" -m bissl_fast.cli bench --device cuda --out "$out" > "$out/bench.log" 2>&1
      rc=$?
      tail -40 "$out/bench.log" ;;
    *)
      echo "gpu_check: unknown step '$step' (steps: build tests bench)"; exit 2 ;;
  esac
  [ "$rc" -eq 124 ] && note "gpu_check: step $step hit its timeout"
  [ "$rc" -eq 0 ] || status=1
  note "step $step: exit $rc, $((SECONDS - start)) s"
  pack
done
note "results in $out (commit it)"
exit $status
