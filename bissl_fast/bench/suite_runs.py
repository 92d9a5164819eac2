"""The suite runs of ``bissl-fast bench``: which suites, one pytest process each, and what an interrupt keeps.

Each suite runs in its own pytest process and writes pytest-benchmark's JSON into a temporary
folder, which is always removed (also on Ctrl-C or an error). Ctrl-C stops the suite running at
that moment (its partial results are dropped) and keeps every suite that finished before it, so the
caller can still write the report of those.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# pytest exit code when every case of a suite was skipped or deselected here.
_NO_TESTS_RAN = 5
# Seconds a suite's pytest gets to stop after Ctrl-C before it is killed.
_STOP_GRACE_S = 10.0

# Options of --quick (one size per op, BISSL_BENCH_SIZES=quick): fewer rounds, a short ratio, and no
# pytest-benchmark warm-up (benchmark_op has run every input set, and the ratio, just before).
QUICK_PYTEST_OPTIONS = ("--benchmark-min-rounds=3", "--benchmark-warmup=off", "--ratio-min-rounds=3",
                        "--ratio-max-time=2")
QUICK_MAX_TIME_S = 0.25


class BenchError(RuntimeError):
    """A problem that stops ``bissl-fast bench`` before it runs anything (reported as one line)."""


def check_requirements(suite_dir: Path, device: str | None) -> list[Path]:
    """The suites in ``suite_dir``, after checking the packages, the device and the folder."""
    missing = [name for name in ("pytest", "pytest_benchmark", "matplotlib") if importlib.util.find_spec(name) is None]
    if missing:
        raise BenchError(f"bissl-fast bench needs {', '.join(missing)}: pip install 'bissl_fast[test]'")
    if device not in (None, "cpu", "cuda"):
        raise BenchError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: this torch sees no CUDA device")
    if not suite_dir.is_dir():
        raise BenchError(f"benchmark suites not found at {suite_dir}; pass --suite-dir <folder with bench_*.py>")
    suites = sorted(p for p in suite_dir.glob("bench_*.py") if p.name != "bench_utils.py")
    if not suites:
        raise BenchError(f"no bench_*.py suites in {suite_dir}")
    return suites


def _suite_name(text: str) -> str:
    return text.strip().removesuffix(".py").removeprefix("bench_")


def select_suites(suites: list[Path], select: str | None) -> list[Path]:
    """The suites whose name (file stem without ``bench_``) contains one of the comma-separated names in
    ``select`` (all when None): ``byol,nt_xent``, ``bench_byol.py`` and ``norm`` all work."""
    if not select:
        return suites
    names = [_suite_name(name) for name in select.split(",") if _suite_name(name)]
    if not names:
        raise BenchError(f"--select {select!r} names no suite")
    chosen = [s for s in suites if any(name in _suite_name(s.stem) for name in names)]
    unmatched = [name for name in names if not any(name in _suite_name(s.stem) for s in suites)]
    if unmatched:
        available = ", ".join(s.stem for s in suites)
        raise BenchError(f"--select: no suite name contains {', '.join(map(repr, unmatched))} (suites: {available})")
    return chosen


@dataclass
class SuiteRuns:
    """What the suites produced: the finished suites' rows merged into one pytest-benchmark JSON."""

    merged: dict[str, Any] = field(default_factory=lambda: {"benchmarks": []})
    machine_loads: dict[str, Any] = field(default_factory=dict)  # suite stem -> the conftest's verdict
    exit_codes: list[int] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    interrupted: str | None = None  # the suite that Ctrl-C stopped
    not_run: list[str] = field(default_factory=list)


def _stop(proc: subprocess.Popen) -> None:
    """Ends a suite's pytest after Ctrl-C (a terminal's Ctrl-C reached it too: give it a moment first)."""
    try:
        proc.wait(timeout=_STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_suites(suites: list[Path], env: dict[str, str], pytest_options: list[str]) -> SuiteRuns:
    """Runs each suite with ``pytest_options`` in its own process; stops at Ctrl-C keeping what finished."""
    runs = SuiteRuns()
    env = dict(env)
    raw_dir = Path(tempfile.mkdtemp(prefix="bissl_bench_"))
    proc: subprocess.Popen | None = None
    position = 0
    start = time.perf_counter()
    try:
        for position, suite in enumerate(suites, 1):
            print(f"[{position}/{len(suites)}] {suite.name}: running ({time.perf_counter() - start:.0f} s so far)", flush=True)
            raw = raw_dir / f"{suite.stem}.json"
            # Skip reasons are printed by -rs; pytest-benchmark's own table is replaced by the report's.
            cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "--benchmark-quiet",
                   "--benchmark-save-data", f"--benchmark-json={raw}", *pytest_options, str(suite)]
            proc = subprocess.Popen(cmd, cwd=suite.parent, env=env)
            code = proc.wait()
            # After the first suite our own work is in the load average: judge by calibration only.
            env["BISSL_BENCH_SKIP_LOADAVG"] = "1"
            runs.exit_codes.append(0 if code == _NO_TESTS_RAN else code)
            if raw.exists():
                data = json.loads(raw.read_text())
                runs.merged["benchmarks"] += data.get("benchmarks", [])
                runs.merged.setdefault("machine_info", data.get("machine_info", {}))
                runs.machine_loads[suite.stem] = data.get("bissl_fast", {}).get("machine_load")
            runs.finished.append(suite.stem)
            print(f"[{position}/{len(suites)}] {suite.name}: exit code {code}", flush=True)
    except KeyboardInterrupt:
        if proc is not None and proc.poll() is None:
            _stop(proc)
        current = suites[position - 1] if position else None
        if current is not None and current.stem not in runs.finished:
            runs.interrupted = current.stem
            print(f"[{position}/{len(suites)}] {current.name}: interrupted (its partial results are dropped)", flush=True)
        runs.not_run = [s.stem for s in suites[position:]]
    finally:
        if proc is not None and proc.poll() is None:  # a second Ctrl-C while stopping it
            proc.kill()
        shutil.rmtree(raw_dir, ignore_errors=True)
    return runs
