#!/usr/bin/env bash
# The integration pass: the tests marked `integration`, against the real timm, torchvision, lightly and
# tensorboard installed beside the interpreter PY (default: the dev venv's). They skip elsewhere where a
# package is missing; here (BISSL_FAST_INTEGRATION=1) a missing or broken package fails them, and the pass
# stops first, naming what is missing, when PY lacks one. Prints the versions and the pass's time.
# Runs in the current folder (as scripts/run_pytest.sh), so a caller can put its own build of bissl_fast first
# on sys.path. Usage: bash scripts/run_integration.sh [PY]
set -uo pipefail
tests="$(cd "$(dirname "$0")/../tests" && pwd)"
PY=${1:-${BISSL_FAST_VENV:-.venv}/bin/python}
versions=$("$PY" - <<'PYEOF'
import importlib.metadata as metadata
import importlib.util

names = ("torch", "torchvision", "timm", "lightly", "tensorboard")
missing = [name for name in names if importlib.util.find_spec(name) is None]
if missing:
    raise SystemExit(f"run_integration: {' '.join(missing)} not installed for this interpreter; "
                     f"pip install {' '.join(missing)} (scripts/setup.sh puts them in the dev venv)")
print(", ".join(f"{name} {metadata.version(name)}" for name in names))
PYEOF
) || exit 1
echo "== integration tests ($versions)"
start=$SECONDS
BISSL_FAST_INTEGRATION=1 "$PY" -m pytest -q -p no:cacheprovider -m integration "$tests"
status=$?
echo "== integration pass took $((SECONDS - start)) s"
exit $status
