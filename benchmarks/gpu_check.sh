#!/usr/bin/env bash
# One command for a CUDA machine as it is (nothing installed from the network), sized to a time budget:
# build the extension's CUDA kernels, compile the Triton kernels in parallel, run the CUDA- and
# Triton-marked tests on the GPU, then the core benchmark suites, then the rest if time is left. Every
# result file goes to benchmarks/results/<date>_<gpu>/ as it is written (commit that folder).
#
#   bash benchmarks/gpu_check.sh                        # all steps in 480 s: build warm tests core rest
#   bash benchmarks/gpu_check.sh --budget 300 tests     # some steps, a smaller budget
#   bash benchmarks/gpu_check.sh --dry-run              # no GPU: the plan, the packing, the travel size
#
# Needs python3 with a CUDA build of torch (>= 2.11), triton, numpy, and pytest + pytest-benchmark for
# the tests and benchmarks; nvcc (or CUDA_HOME) for the CUDA kernels. If pytest or pytest-benchmark is
# missing the script says so and installs them from wheels in .whl/ (no network: make that folder on a
# machine with one, `pip download pytest pytest-benchmark -d .whl`, and bring it along; the device tool
# needs `carry: [".whl"]`, the folder is git-ignored) into build/gpu_pydeps/, never into the system env.
#
# Steps, in order, each under its own deadline: min(its cap, what is left of the budget minus 20 s for
# packing). A step whose deadline would be under its floor (30 s) is skipped (said in summary.txt):
#   build  cap 150 s  setup.py build_ext --inplace for sm_90 only (TORCH_CUDA_ARCH_LIST=9.0), 16 jobs
#   warm   cap  75 s  every tile of every Triton route compiled for sm_90 in 16 processes
#                     (python -m bissl_fast.kernels.triton_aot --compile --unaligned): the source the JIT
#                     builds for a launch, so the launches of the next steps find it in triton's cache;
#                     registers and spills of each tile on this machine go to triton_aot.json
#   tests  cap 150 s  pytest -m "cuda or triton" with BISSL_FAST_TRITON_FIXED_CONFIG=1: each Triton
#                     route compiles its first tile only, no autotuning (correctness needs no fastest
#                     tile); every Triton compile and its time go to triton_compiles.jsonl, the totals
#                     to triton_compiles.json
#   core   cap 100 s per suite, suites nt_xent byol solver batch_norm (bissl-fast bench --select)
#   rest   cap 120 s, suite reference, only with at least 60 s left
# Caps: GPU_CHECK_BUILD_S, GPU_CHECK_WARM_S, GPU_CHECK_TESTS_S, GPU_CHECK_SUITE_S, GPU_CHECK_REST_S;
# seconds of timing per benchmark: GPU_CHECK_MAX_TIME (default 0.5).
#
# Results are packed after every step into $OUT/gpu_results_<date>_<gpu>.tar.gz (plus summary.txt)
# when $OUT is set: the device tool brings back what is under it, also after a timeout.

set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUDGET=480
DRY_RUN=0
steps=()
while [ $# -gt 0 ]; do
  case $1 in
    --budget) [ $# -ge 2 ] && [[ $2 =~ ^[0-9]+$ ]] || { echo "gpu_check: --budget needs whole seconds"; exit 2; }
      BUDGET=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    build|warm|tests|core|rest) steps+=("$1"); shift ;;
    *) echo "gpu_check: unknown argument '$1' (options: --budget S, --dry-run; steps: build warm tests core rest)"; exit 2 ;;
  esac
done
[ ${#steps[@]} -eq 0 ] && steps=(build warm tests core rest)
BUILD_S=${GPU_CHECK_BUILD_S:-150}
WARM_S=${GPU_CHECK_WARM_S:-75}
TESTS_S=${GPU_CHECK_TESTS_S:-150}
SUITE_S=${GPU_CHECK_SUITE_S:-100}
REST_S=${GPU_CHECK_REST_S:-120}
MAX_TIME=${GPU_CHECK_MAX_TIME:-0.5}
CORE_SUITES=(nt_xent byol solver batch_norm)
REST_SUITES=(reference)
PACK_RESERVE=20   # seconds kept back for the last pack
MIN_STEP=30       # a step is started only with at least this long before its deadline
REST_FLOOR=60
TRAVEL_LIMIT=$((64 * 1024 * 1024))
start_all=$SECONDS

if [ $DRY_RUN -eq 1 ]; then
  gpu=dryrun
  results=$(mktemp -d)/results
  OUT=${OUT:-$(mktemp -d)}
else
  if ! gpu=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_'))" 2>/dev/null); then
    echo "gpu_check: no CUDA GPU visible to $PY ($("$PY" -c 'import torch; print("torch", torch.__version__)' 2>&1))"
    exit 1
  fi
  results=benchmarks/results
fi
name=$(date -u +%Y%m%d)_${gpu}
out=$results/$name
mkdir -p "$out"
status=0
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

note() { echo "$*" | tee -a "$out/summary.txt"; }
pack() {  # the results so far, as one file (the device tool brings back few, shallow files)
  [ -n "${OUT:-}" ] || return 0
  tar czf "$OUT/gpu_results_$name.tar.gz" -C "$results" "$name" && cp "$out/summary.txt" "$OUT/"
}
# A dry run spends no time in its steps: its clock advances by each step's whole deadline instead (and
# not by its own checks), so its summary shows the deadlines and skips of a run whose every step runs
# to its deadline.
dry_clock=0
elapsed() { if [ $DRY_RUN -eq 1 ]; then echo $dry_clock; else echo $((SECONDS - start_all)); fi; }
left() { echo $((BUDGET - $(elapsed) - PACK_RESERVE)); }
deadline() {  # deadline <cap> <floor>: seconds this step may run now (0: skip it)
  local cap=$1 floor=$2 rest
  rest=$(left)
  [ "$rest" -lt "$cap" ] && cap=$rest
  [ "$cap" -lt "$floor" ] && cap=0
  echo "$cap"
}
run_step() {  # run_step <label> <cap> <floor> <command...>: under its deadline, logged to <label>.log
  local label=$1 cap=$2 floor=$3 limit t0 rc
  shift 3
  limit=$(deadline "$cap" "$floor")
  if [ "$limit" -eq 0 ]; then
    note "step $label: skipped, $(left) s left of the budget"
    return 0
  fi
  t0=$(elapsed)
  if [ $DRY_RUN -eq 1 ]; then
    echo "would run (deadline ${limit} s): $*" > "$out/$label.log"
    dry_clock=$((dry_clock + limit))
    rc=0
  else
    # SIGINT first: pytest and `bissl-fast bench` then write what finished (bench: the report of its
    # finished suites); the packing margin covers the 15 s before the hard kill.
    timeout --signal=INT --kill-after=15 "$limit" "$@" > "$out/$label.log" 2>&1
    rc=$?
    tail -15 "$out/$label.log"
  fi
  [ $rc -eq 124 ] && note "gpu_check: step $label hit its ${limit} s deadline"
  [ $rc -eq 0 ] || status=1
  note "step $label: exit $rc, $(($(elapsed) - t0)) s (deadline ${limit} s)"
  pack
}

note "== gpu_check $(date -u +%FT%TZ): steps ${steps[*]} on $gpu, budget ${BUDGET} s$([ $DRY_RUN -eq 1 ] && echo ' (dry run)')"
plan=$((0))
for step in "${steps[@]}"; do
  case $step in
    build) plan=$((plan + BUILD_S)); note "plan: build ${BUILD_S} s (by $plan s)" ;;
    warm) plan=$((plan + WARM_S)); note "plan: warm ${WARM_S} s (by $plan s)" ;;
    tests) plan=$((plan + TESTS_S)); note "plan: tests ${TESTS_S} s (by $plan s)" ;;
    core) for s in "${CORE_SUITES[@]}"; do plan=$((plan + SUITE_S)); note "plan: core $s ${SUITE_S} s (by $plan s)"; done ;;
    rest) for s in "${REST_SUITES[@]}"; do plan=$((plan + REST_S)); note "plan: rest $s ${REST_S} s (by $plan s)"; done ;;
  esac
done
note "plan: $plan s of steps at their caps in a budget of $((BUDGET - PACK_RESERVE)) s: the later ones get what is left"

if [ $DRY_RUN -eq 1 ]; then
  # What the device tool sends: tracked files and untracked ones git does not ignore, plus .whl if carried.
  travel=$( { git ls-files -co --exclude-standard -z; [ -d .whl ] && find .whl -type f -print0; } \
    | xargs -0 cat 2>/dev/null | wc -c)
  note "dry run: the tree that travels is $((travel / 1024)) KiB (limit $((TRAVEL_LIMIT / 1024)) KiB)"
  [ "$travel" -lt $TRAVEL_LIMIT ] || { note "dry run: over the device tool's limit"; status=1; }
else
  "$PY" - > "$out/env.json" <<'PY'
import json, platform, shutil
import torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0), "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
        "multiprocessors": torch.cuda.get_device_properties(0).multi_processor_count, "nvcc": shutil.which("nvcc")}
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
        "the tests and benchmark steps will fail"
    fi
  fi
fi
pack

# The tests step's driver: pytest in this process with a triton compile listener that appends every
# compile (kernel, seconds, cache hit) to triton_compiles.jsonl as it happens and sums them at the end.
# With --aot it compiles one route tile for sm_90 instead of running pytest (the dry run's check).
read -r -d '' TESTS_DRIVER <<'PY'
import collections, json, pathlib, sys, time
from triton import knobs
out = pathlib.Path(sys.argv[1])
log = (out / "triton_compiles.jsonl").open("a")
records = []

def listener(*, src, metadata, metadata_group, times, cache_hit):
    record = {"kernel": src.name, "seconds": round(times.total / 1e6, 3), "cache_hit": cache_hit,
              "num_warps": metadata.get("num_warps"), "num_stages": metadata.get("num_stages")}
    records.append(record)
    log.write(json.dumps(record) + "\n")
    log.flush()

knobs.compilation.listener = listener
start = time.perf_counter()
if sys.argv[2] == "--aot":
    import torch
    from bissl_fast.kernels import nt_xent_triton, triton_aot
    route = nt_xent_triton.route("bwd_bwd", torch.float32, "ieee", 256)
    triton_aot.compile_resources(route, route.tiles[0], "sm_90", fresh=True)
    code = 0
else:
    import pytest
    code = int(pytest.main(sys.argv[2:]))
by_kernel = collections.defaultdict(lambda: [0, 0.0])
for r in records:
    if not r["cache_hit"]:
        by_kernel[r["kernel"]][0] += 1
        by_kernel[r["kernel"]][1] += r["seconds"]
fresh = [r for r in records if not r["cache_hit"]]
summary = {"compiles": len(fresh), "cache_hits": len(records) - len(fresh),
           "compile_seconds": round(sum(r["seconds"] for r in fresh), 1),
           "wall_seconds": round(time.perf_counter() - start, 1),
           "by_kernel": {k: {"compiles": n, "seconds": round(s, 1)} for k, (n, s) in sorted(by_kernel.items())}}
(out / "triton_compiles.json").write_text(json.dumps(summary, indent=1) + "\n")
print(f"triton: {summary['compiles']} compiles, {summary['compile_seconds']} s compiling, "
      f"{summary['cache_hits']} cache hits, {summary['wall_seconds']} s in all")
sys.exit(code)
PY

for step in "${steps[@]}"; do
  case $step in
    build)
      # In place (no pip: nothing to resolve or download). sm_90 only: this machine's GPU.
      run_step build "$BUILD_S" $MIN_STEP env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 "$PY" setup.py build_ext --inplace
      if [ $DRY_RUN -eq 0 ]; then
        "$PY" - > "$out/backends.json" 2>&1 <<'PY' || status=1
import json
import torch
import bissl_fast
import bissl_fast._C as C
print(json.dumps({"cuda_compiled": C.cuda_compiled(), "backends": bissl_fast.backends(),
                  "reasons": bissl_fast.backend_reasons(), "torch": torch.__version__}, indent=1))
PY
        cat "$out/backends.json"
        pack
      fi ;;
    warm)
      if [ $DRY_RUN -eq 1 ]; then
        # The same command on one route here, as a check that it runs.
        "$PY" -m bissl_fast.kernels.triton_aot --compile --unaligned --workers 2 --match "bwd_bwd tf32 r256" \
          --json "$out/triton_aot_dry.json" > "$out/warm_dry.log" 2>&1
        rc=$?
        [ $rc -eq 0 ] || status=1
        note "dry run: warm on one route: exit $rc, $(grep -c '^| bwd_bwd' "$out/warm_dry.log") tiles reported"
      fi
      run_step warm "$WARM_S" $MIN_STEP "$PY" -m bissl_fast.kernels.triton_aot --compile --unaligned --workers 16 \
        --json "$out/triton_aot.json" ;;
    tests)
      if [ $DRY_RUN -eq 1 ]; then
        # Collecting needs no GPU: how many tests the step will run; then the compile log on one AOT compile.
        "$PY" -m pytest --collect-only -q -p no:cacheprovider -m "cuda or triton" tests > "$out/tests_collect.log" 2>&1
        note "dry run: tests step selects $(grep -c '::' "$out/tests_collect.log") tests"
        "$PY" -c "$TESTS_DRIVER" "$out" --aot >> "$out/summary.txt" 2>&1 || status=1
        tail -1 "$out/summary.txt"
      fi
      run_step tests "$TESTS_S" $MIN_STEP env BISSL_FAST_TRITON_FIXED_CONFIG=1 "$PY" -c "$TESTS_DRIVER" "$out" \
        -q -p no:cacheprovider -m "cuda or triton" tests --junitxml="$out/gpu_tests.xml" ;;
    core|rest)
      if [ "$step" = core ]; then
        suites=("${CORE_SUITES[@]}"); cap=$SUITE_S; floor=$MIN_STEP
      else
        suites=("${REST_SUITES[@]}"); cap=$REST_S; floor=$REST_FLOOR
      fi
      for suite in "${suites[@]}"; do
        run_step "bench_$suite" "$cap" "$floor" "$PY" -m bissl_fast.cli bench --device cuda --select "$suite" \
          --max-time "$MAX_TIME" --out "$out/bench_$suite"
      done ;;
  esac
done
note "results in $out ($(du -sk "$out" | cut -f1) KiB; commit it), $(elapsed) s of ${BUDGET}"
pack
[ -n "${OUT:-}" ] && note "packed: $(ls -l "$OUT/gpu_results_$name.tar.gz" | awk '{print $5}') bytes in $OUT"
exit $status
