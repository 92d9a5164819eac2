#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job: pretext pretraining -> BiSSL -> fine-tuning on the
# scikit-learn digits dataset. Extra arguments go to `bissl-fast demo` (e.g. --quick, --pretext byol).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${BISSL_FAST_VENV:-.venv}/bin/bissl-fast" demo "$@"
