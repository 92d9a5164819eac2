#!/usr/bin/env bash
# Print the path of a cached venv holding torch==VERSION from the package index plus the test
# toolchain, creating it first when missing. VERSION is one of the two pinned in scripts/setup.sh (the
# dev venv's newest torch, with its pins, or the oldest supported, with OLDEST_PINS). The index's default
# Linux wheel of torch is the CUDA build (2.11.0: CUDA 13.0, ~4.7 GB with its nvidia-* wheels); it also
# runs on machines without a GPU.
# The venv lives under ${BISSL_FAST_CACHE:-~/.cache/bissl_fast}, named by a hash of the pins below and
# the Python version, so later runs (CI included) reuse it while the pins do not change; venvs of the
# same torch version with other pins are deleted to bound the disk.
# Usage: venv=$(bash scripts/torch_venv.sh 2.11.0)   (pip's progress goes to stderr)
set -euo pipefail
version=${1:?usage: scripts/torch_venv.sh TORCH_VERSION}
PYTHON=${PYTHON:-python3}
source "$(dirname "$0")/setup.sh"  # only its pins: PINS, OLDEST_PINS, TOOLS
case "torch==$version" in
  "${PINS[0]}") REQS=("${PINS[@]}" "${TOOLS[@]}") ;;
  "${OLDEST_PINS[0]}")
    REQS=("${OLDEST_PINS[@]}" "$(printf '%s\n' "${PINS[@]}" | grep '^scikit-learn==')" "${TOOLS[@]}") ;;
  *) echo "torch_venv: scripts/setup.sh pins ${PINS[0]} and ${OLDEST_PINS[0]}, not torch==$version" >&2; exit 2 ;;
esac
key=$({ "$PYTHON" --version; printf '%s\n' "${REQS[@]}"; } | sha256sum | cut -c1-12)
root=${BISSL_FAST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/bissl_fast}
venv=$root/venv-torch$version-$key
if [ ! -f "$venv/.complete" ]; then
  start=$SECONDS
  mkdir -p "$root"
  find "$root" -maxdepth 1 -name "venv-torch$version-*" -exec rm -rf {} + >&2
  "$PYTHON" -m venv "$venv" >&2
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
  "$venv/bin/python" -m pip install -q "${REQS[@]}" >&2
  touch "$venv/.complete"
  echo "== created $venv in $((SECONDS - start)) s ($(du -sh "$venv" | cut -f1))" >&2
fi
echo "$venv"
