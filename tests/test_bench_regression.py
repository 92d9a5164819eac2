"""The regression flow the README promises, on a tiny suite run through the project's benchmark harness:
save a baseline (``--benchmark-autosave``), compare an unchanged run (passes), compare a deliberately
slowed run (``--benchmark-compare-fail`` fails it)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"

_TINY_SUITE = """
import os
import time

import torch


def work():
    # Sleeping, not spinning: the time barely depends on how busy the machine is.
    time.sleep(0.02 * float(os.environ.get("TINY_SLOWDOWN", "1")))


def test_tiny(benchmark_op):
    benchmark_op(work, [()], op="tiny", provider="reference", mode="fwd", size={"N": 1},
                 dtype=torch.float32, device=torch.device("cpu"), rounds=15)
"""


def _pytest(suite: Path, storage: Path, *flags: str, slowdown: float = 1.0) -> subprocess.CompletedProcess:
    env = dict(os.environ, TINY_SLOWDOWN=str(slowdown), BISSL_BENCH_DEVICE="cpu")
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--benchmark-storage=file://{storage}",
         *flags, "bench_tiny.py"],
        cwd=suite, env=env, capture_output=True, text=True, timeout=300,
    )


@pytest.mark.slow
def test_save_compare_and_fail_on_regression(tmp_path):
    suite = tmp_path / "suite"
    suite.mkdir()
    for name in ("conftest.py", "bench_utils.py"):
        shutil.copy(BENCH_DIR / name, suite / name)
    (suite / "bench_tiny.py").write_text(_TINY_SUITE)
    storage = tmp_path / "storage"

    saved = _pytest(suite, storage, "--benchmark-autosave")
    assert saved.returncode == 0, saved.stdout[-2000:] + saved.stderr[-2000:]
    baselines = list(storage.rglob("0001_*.json"))
    assert len(baselines) == 1, f"expected one saved baseline under {storage}, found {baselines}"

    # 50%: the flow is under test, not the machine's noise (wake-up delays of a loaded machine are a few ms;
    # a 4x slowdown must still fail).
    fail_rule = "--benchmark-compare-fail=median:50%"
    same = _pytest(suite, storage, "--benchmark-compare=0001", fail_rule)
    assert same.returncode == 0, same.stdout[-2000:] + same.stderr[-2000:]

    slowed = _pytest(suite, storage, "--benchmark-compare=0001", fail_rule, slowdown=4.0)
    assert slowed.returncode != 0, "a 4x slower run passed --benchmark-compare-fail"
    assert "Performance has regressed" in slowed.stdout + slowed.stderr
