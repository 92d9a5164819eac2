"""The speed-regression flow of README "Benchmarks" on a real suite, and the arithmetic of its checks.

The flow test runs ``benchmarks/bench_byol.py`` at its quick size (BISSL_BENCH_SIZES=quick: B=256, D=256 on
CPU, every provider and mode timed here) with the harness's default settings: it saves a baseline, compares
unchanged code three times in a row (each must pass the CI gate), then compares a run in which the ``cpp``
BYOL loss does its work three times (a planted slowdown of one fast path), which must fail naming exactly the
``cpp`` rows.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bissl_fast.bench.regression import (
    PairScore,
    false_alarm_rate,
    pair_scores,
    report,
    slow_change_pct,
    speedup_regressions,
)
from bissl_fast.bench.report import DEFAULT_SUITE_DIR

# The suites of the bissl_fast under test (a build elsewhere, in CI's oldest-torch pass): pytest puts the folder
# above a suite's package first on sys.path, so the checkout's benchmarks/ would import the checkout's bissl_fast,
# whose extension is built for another torch, and time the cpp rows of nothing.
BENCH_DIR = DEFAULT_SUITE_DIR
# The CI gate README "Benchmarks" documents (its threshold chosen there from measured false-alarm rates). The
# absolute-time check (--benchmark-compare-fail=min:50%) is not gated here: on a shared machine it false-alarms
# in 15-25% of compares (measured, README).
SPEEDUP_CHECK = "--speedup-compare-fail=33%"

# A pytest plugin (-p) loaded before the suite imports bissl_fast.byol_loss: the cpp backend computes the
# loss three times and averages, so forward, backward and double backward do three times the kernel work. Twice
# is not enough at this size: the HVP row's fixed autograd cost is about half its time, so doubled kernels cut its
# speedup by about a third: missed by the 33% gate in 5 of 11 runs with torch 2.11 (CI's oldest pass), where
# three times the work cut it by 55-66% in 4 of 4.
_SLOW_CPP_PLUGIN = '''
import bissl_fast

_byol_loss = bissl_fast.byol_loss


def byol_loss(*args, backend="auto", **kwargs):
    if backend == "cpp":
        return sum(_byol_loss(*args, backend=backend, **kwargs) for _ in range(3)) / 3
    return _byol_loss(*args, backend=backend, **kwargs)


bissl_fast.byol_loss = byol_loss
'''


def _bench(tmp_path: Path, *flags: str, slow_cpp: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, BISSL_BENCH_SIZES="quick", BISSL_BENCH_DEVICE="cpu")
    env.pop("BISSL_BENCH_THREADS", None)  # the default (1 thread) is under test
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
    plugin = ["-p", "slow_cpp_byol"] if slow_cpp else []
    # --ratio-max-time=3 (default 10 s) keeps the five runs to a few minutes: the 0.1 ms rows never reach the
    # 10% band here and would otherwise run their ratio to the cap.
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *plugin, "bench_byol.py", "--benchmark-only",
         "--ratio-max-time=3", f"--benchmark-storage=file://{tmp_path / 'storage'}", *flags],
        cwd=BENCH_DIR, env=env, capture_output=True, text=True, timeout=600,
    )


def _regressed_rows(output: str, heading: str) -> set[str]:
    """The test ids listed (one per tab-indented line) under the ``heading`` line of a run's output."""
    lines = output.splitlines()
    if heading not in lines:
        return set()
    rows = set()
    for line in lines[lines.index(heading) + 1:]:
        if not line.startswith("\t"):
            break
        rows.add(line.strip().split(" ")[0].rsplit("::", 1)[-1])
    return rows


@pytest.mark.slow
def test_save_compare_unchanged_passes_and_a_3x_slower_fast_path_fails(tmp_path):
    (tmp_path / "slow_cpp_byol.py").write_text(_SLOW_CPP_PLUGIN)
    saved = _bench(tmp_path, "--benchmark-autosave")
    assert saved.returncode == 0, saved.stdout[-3000:] + saved.stderr[-3000:]
    assert "intra-op threads 1 (BISSL_BENCH_THREADS, default 1)" in saved.stdout  # fixed and printed
    assert len(list((tmp_path / "storage").rglob("0001_*.json"))) == 1

    compare = ("--benchmark-compare=0001", SPEEDUP_CHECK)
    for attempt in range(3):
        same = _bench(tmp_path, *compare)
        assert same.returncode == 0, f"unchanged code failed compare #{attempt + 1}:\n" + same.stdout[-3000:] + same.stderr[-3000:]
        assert "speedup check: 6 rows compared with the saved run, 0 more than 33% down" in same.stdout

    slowed = _bench(tmp_path, *compare, slow_cpp=True)
    output = slowed.stdout + slowed.stderr
    assert slowed.returncode == pytest.ExitCode.TESTS_FAILED, "a 3x slower cpp BYOL loss passed:\n" + output[-3000:]
    cpp_rows = {f"test_byol[256-256-float32-{mode}-cpp]" for mode in ("fwd", "fwd+bwd", "hvp")}
    assert _regressed_rows(output, "Speedup has regressed:") == cpp_rows, "\n".join(
        line for line in output.splitlines() if "speedup" in line.lower())


def _run(rows: dict[str, tuple[str, float, float]]) -> dict:
    """A saved pytest-benchmark run: fullname -> (provider, min seconds, speedup)."""
    return {"benchmarks": [
        {"fullname": name, "stats": {"min": t, "median": 1.1 * t},
         "extra_info": {"provider": provider, "speedup_vs_reference": speedup}}
        for name, (provider, t, speedup) in rows.items()
    ]}


def test_speedup_regressions_name_rows_that_lost_more_than_the_threshold():
    baseline = _run({"a[ref]": ("reference", 2.0, 1.0), "a[cpp]": ("cpp", 1.0, 2.0), "b[cpp]": ("cpp", 1.0, 4.0)})
    current = {"a[ref]": {"provider": "reference", "speedup": 1.0},
               "a[cpp]": {"provider": "cpp", "speedup": 1.0},   # halved: -50%
               "b[cpp]": {"provider": "cpp", "speedup": 3.2},   # -20%
               "c[cpp]": {"provider": "cpp", "speedup": 0.1}}   # not in the baseline: not compared
    check = speedup_regressions(current, [baseline], 30.0)
    assert check.compared == 2
    assert check.regressions == ["a[cpp] - speedup over the reference 2.00x -> 1.00x (-50%, more than 30% down)"]
    assert len(speedup_regressions(current, [baseline], 15.0).regressions) == 2
    faster = speedup_regressions({"a[cpp]": {"provider": "cpp", "speedup": 2.5}}, [baseline], 10.0)
    assert faster.compared == 1 and faster.regressions == []
    with pytest.raises(ValueError, match="between 0% and 100%"):
        speedup_regressions(current, [baseline], 100.0)


def test_false_alarm_rates_score_each_pair_by_its_slowest_row():
    assert slow_change_pct("min", 1.0, 2.0) == pytest.approx(100.0)
    assert slow_change_pct("speedup", 2.0, 1.0) == pytest.approx(50.0)
    runs = [
        _run({"x": ("cpp", 1.00, 2.0), "y": ("cpp", 1.0, 3.0)}),
        _run({"x": ("cpp", 1.20, 2.0), "y": ("cpp", 1.0, 3.0)}),
        _run({"x": ("cpp", 1.00, 2.0), "y": ("cpp", 1.0, 1.5)}),
    ]
    scores = pair_scores(runs, "min")
    assert len(scores) == 6
    assert PairScore(0, 1, pytest.approx(20.0), "x") in scores
    assert max(s.change_pct for s in scores) == pytest.approx(20.0)
    # Pairs 0->1 and 2->1 are 20% slower on x; the other four are not slower on any row.
    assert false_alarm_rate(scores, 10.0) == pytest.approx(2 / 6)
    assert false_alarm_rate(scores, 25.0) == 0.0
    speedup = pair_scores(runs, "speedup")
    assert false_alarm_rate(speedup, 40.0) == pytest.approx(2 / 6)  # y's speedup halved in run 2
    text = report(runs, thresholds=(10.0, 60.0))
    assert "| min | " in text and "33% (2/6)" in text and "0% (0/6)" in text
    assert "| speedup | " in text and "worst pair" in text
