"""The benchmark harness's settings (benchmarks/conftest.py): defaults for a noisy machine that the command line
can override, the thread count fixed and printed, and one-line errors for bad settings (collection only)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


def _collect(*flags: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("BISSL_BENCH_") and k != "PYTEST_ADDOPTS"}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "bench_reference.py", *flags],
        cwd=BENCH_DIR, env={**environ, **env}, capture_output=True, text=True, timeout=300,
    )


def _settings(proc: subprocess.CompletedProcess) -> str:
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("bissl_fast benchmarks:")]
    return line


@pytest.mark.slow
def test_defaults_are_printed_and_the_command_line_wins():
    default = _collect(BISSL_BENCH_DEVICE="cpu")
    assert default.returncode == 0, default.stdout + default.stderr
    assert _settings(default) == (
        "bissl_fast benchmarks: device cpu, intra-op threads 1 (BISSL_BENCH_THREADS, default 1), sizes small "
        "(BISSL_BENCH_SIZES), timer time.process_time, min rounds 10, max time 1.0 s, GC off in timed calls: True"
    )
    given = _collect("--benchmark-min-rounds=4", "--benchmark-max-time", "0.5", BISSL_BENCH_DEVICE="cpu",
                     BISSL_BENCH_THREADS="2", BISSL_BENCH_SIZES="quick", PYTEST_ADDOPTS="--benchmark-timer=time.time")
    assert given.returncode == 0, given.stdout + given.stderr
    # Two threads: process_time would add both threads' times up, so the default timer is the wall clock;
    # here PYTEST_ADDOPTS sets another one, and the command line sets the rounds and time.
    assert _settings(given) == (
        "bissl_fast benchmarks: device cpu, intra-op threads 2 (BISSL_BENCH_THREADS, default 1), sizes quick "
        "(BISSL_BENCH_SIZES), timer time.time, min rounds 4, max time 0.5 s, GC off in timed calls: True"
    )
    two_threads = _collect(BISSL_BENCH_DEVICE="cpu", BISSL_BENCH_THREADS="2")
    assert "timer time.perf_counter" in _settings(two_threads)


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags,env,message",
    [
        ((), {"BISSL_BENCH_THREADS": "two"}, "BISSL_BENCH_THREADS must be a positive integer, got 'two'"),
        ((), {"BISSL_BENCH_SIZES": "tiny"}, "BISSL_BENCH_SIZES must be one of auto, small, full, quick, got 'tiny'"),
        (("--speedup-compare-fail=25%",), {}, "--speedup-compare-fail needs --benchmark-compare and a saved run"),
        (("--speedup-compare-fail=lots",), {}, "--speedup-compare-fail takes a percentage such as 33%, got 'lots'"),
    ],
)
def test_bad_settings_stop_with_one_line(flags, env, message):
    proc = _collect(*flags, **env)
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR, proc.stdout + proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
