#!/usr/bin/env bash
# The CPU suite (scripts/run_pytest.sh) against each end of the tested torch range, both pinned in
# scripts/setup.sh (pyproject.toml: torch>=2.11, no upper bound; setup.py warns above the newest tested):
#   newest, 2.14.1: the dev venv (.venv, the index's default CUDA 13.0 wheel), set up by scripts/setup.sh;
#   oldest, 2.11.0: the index's CUDA 13.0 build (the GPU machines' version; it runs on CPU) in a cached
#     venv, bissl_fast built against it by scripts/build_against_torch.sh (with the CUDA kernels for
#     sm_80/sm_90 when nvcc exists), the suite run against that build.
# Older torch is not supported: 2.4.1 rejects the custom ops' string annotations and 2.5.1 fails the
# torch.compile test; 2.6-2.10 and 2.12-2.13 are not tested (2.13.0 was the dev venv's torch until 2.14.1).
# Usage: bash scripts/test_torch_range.sh [--oldest] [--cuda]
#   --oldest: only the oldest end (CI, after scripts/test.sh ran the newest); --cuda: require nvcc.
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
source scripts/setup.sh  # only its pins
NEWEST=${PINS[0]#torch==}
OLDEST=${OLDEST_PINS[0]#torch==}
only_oldest=0
build_args=()
for arg in "$@"; do
  case $arg in
    --oldest) only_oldest=1 ;;
    --cuda) build_args+=(--cuda) ;;
    *) echo "usage: scripts/test_torch_range.sh [--oldest] [--cuda]" >&2; exit 2 ;;
  esac
done
status=0

if [ "$only_oldest" = 0 ]; then
  echo "== newest end: torch $NEWEST (dev venv)"
  bash scripts/setup.sh || exit 1
  bash scripts/run_pytest.sh || status=1
fi

echo "== oldest end: torch $OLDEST"
lib=$(bash scripts/build_against_torch.sh "${build_args[@]}" "$OLDEST" | tail -1) || exit 1
venv=$(bash scripts/torch_venv.sh "$OLDEST")
# From inside the build, so `python -m pytest` and the tests' subprocesses import it, not this checkout.
(cd "$lib" && PYTHONPATH="$lib" bash "$repo/scripts/run_pytest.sh" "$venv/bin/python") || status=1
exit $status
