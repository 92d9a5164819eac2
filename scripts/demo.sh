#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job: a replicated experiment on scikit-learn's digits comparing
# BiSSL's lower backbone with compute-matched continued pretext training (README "The demo (main job)").
# Extra arguments go to `bissl-fast demo` (e.g. --quick, --pretext byol, --out DIR --readme README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${BISSL_FAST_VENV:-.venv}/bin/bissl-fast" demo "$@"
