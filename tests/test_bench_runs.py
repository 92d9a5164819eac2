"""``bissl-fast bench``'s suite runs: --select, --quick, and what Ctrl-C keeps (on small stand-in suites that
use the real harness: conftest.py and bench_utils.py copied from benchmarks/)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from bissl_fast.bench.suite_runs import BenchError, select_suites

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"

_FAST_SUITE = '''
import os

import torch


def test_fast(benchmark_op, benchmark, request):
    x = torch.randn(64, 64)
    benchmark_op(lambda: torch.mm(x, x), [()], op="mm", provider="reference", mode="fwd", size={"N": 64},
                 dtype=torch.float32, device=torch.device("cpu"))
    benchmark.extra_info.update(sizes=os.environ.get("BISSL_BENCH_SIZES"), ratio_max_time=request.config.getoption("ratio_max_time"),
                                min_rounds=request.config.getoption("benchmark_min_rounds"))
'''

_HANGING_SUITE = '''
import os
import time
from pathlib import Path


def test_hangs(benchmark_op):
    Path(os.environ["HANGING_SUITE_STARTED"]).touch()
    time.sleep(300)
'''


@pytest.fixture
def suite_dir(tmp_path) -> Path:
    suites = tmp_path / "suites"
    suites.mkdir()
    for name in ("conftest.py", "bench_utils.py"):
        shutil.copy(BENCH_DIR / name, suites / name)
    (suites / "bench_a_fast.py").write_text(_FAST_SUITE)
    (suites / "bench_b_hangs.py").write_text(_HANGING_SUITE)
    return suites


def _env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "tmp").mkdir(exist_ok=True)
    # The run's temporary folders (bissl_bench_*) land in tmp_path/tmp, so the test can see that none is left behind.
    return dict(os.environ, TMPDIR=str(tmp_path / "tmp"), HANGING_SUITE_STARTED=str(tmp_path / "hanging_started"))


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "bissl_fast.cli", "bench", "--device", "cpu", "--threads", "1", *args]


def test_select_takes_comma_separated_names_and_lists_the_suites_when_one_matches_nothing():
    suites = [Path(f"bench_{name}.py") for name in ("batch_norm", "byol", "nt_xent", "solver")]
    assert select_suites(suites, None) == suites
    assert select_suites(suites, "byol, nt_xent") == [Path("bench_byol.py"), Path("bench_nt_xent.py")]
    assert select_suites(suites, "b") == [Path("bench_batch_norm.py"), Path("bench_byol.py")]  # not "bench_"
    assert select_suites(suites, "bench_solver.py") == [Path("bench_solver.py")]
    with pytest.raises(BenchError, match=r"'moco' \(suites: bench_batch_norm, bench_byol, bench_nt_xent, bench_solver\)"):
        select_suites(suites, "byol,moco")
    with pytest.raises(BenchError, match="names no suite"):
        select_suites(suites, " , ")


@pytest.mark.slow
def test_quick_and_select_reach_the_suites(suite_dir, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(_cli("--suite-dir", str(suite_dir), "--out", str(out), "--quick", "--select", "a_fast"),
                          env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[1/1] bench_a_fast.py" in proc.stdout and "bench_b_hangs" not in proc.stdout
    (row,) = json.loads((out / "pytest_benchmark.json").read_text())["benchmarks"]
    assert row["extra_info"]["sizes"] == "quick"
    assert row["extra_info"]["ratio_max_time"] == 2.0 and row["extra_info"]["min_rounds"] == 3
    assert row["options"]["max_time"] == 0.25 and row["options"]["timer"] == "process_time"
    meta = json.loads((out / "results.json").read_text())
    assert meta["quick"] is True and meta["suites"] == {"finished": ["bench_a_fast"], "interrupted": None, "not_run": []}
    assert "--quick: one size per op" in (out / "results.md").read_text()
    assert not any((tmp_path / "tmp").glob("bissl_bench_*"))  # torch may leave its own caches there


def _interrupt_when(proc: subprocess.Popen, started: Callable[[], bool]) -> tuple[str, str]:
    """Waits until ``started()``, then sends SIGINT to the run's process group (what a terminal's Ctrl-C does)."""
    deadline = time.monotonic() + 240
    while not started():
        assert proc.poll() is None, "the run ended before it could be interrupted:\n" + "".join(proc.communicate())[-3000:]
        assert time.monotonic() < deadline, "the run did not get to the point of interruption in 240 s"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    return proc.communicate(timeout=120)


def _start(args: list[str], tmp_path: Path) -> subprocess.Popen:
    # SIGINT at its default in the run (a shell may start background jobs with it ignored), so Python turns it
    # into KeyboardInterrupt there and in the suites' pytest processes.
    return subprocess.Popen(args, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.mark.slow
def test_ctrl_c_keeps_the_finished_suites_and_removes_temporary_files(suite_dir, tmp_path):
    out = tmp_path / "out"
    proc = _start(_cli("--suite-dir", str(suite_dir), "--out", str(out)), tmp_path)
    stdout, stderr = _interrupt_when(proc, (tmp_path / "hanging_started").exists)
    assert proc.returncode == 130, stdout[-3000:] + stderr[-3000:]
    assert "[1/2] bench_a_fast.py: exit code 0" in stdout
    assert "[2/2] bench_b_hangs.py: interrupted (its partial results are dropped)" in stdout
    assert "interrupted: the report holds the suites that finished (bench_a_fast)" in stderr
    meta = json.loads((out / "results.json").read_text())
    assert meta["suites"] == {"finished": ["bench_a_fast"], "interrupted": "bench_b_hangs", "not_run": []}
    assert [row["op"] for row in meta["results"]] == ["mm"]
    assert "INTERRUPTED: only bench_a_fast finished" in (out / "results.md").read_text()
    assert not any((tmp_path / "tmp").glob("bissl_bench_*"))  # torch may leave its own caches there


@pytest.mark.slow
def test_ctrl_c_before_any_suite_finished_writes_nothing(suite_dir, tmp_path):
    out = tmp_path / "out"
    proc = _start(_cli("--suite-dir", str(suite_dir), "--out", str(out)), tmp_path)
    # The run's temporary folder exists from just before the first suite starts.
    stdout, stderr = _interrupt_when(proc, lambda: any((tmp_path / "tmp").glob("bissl_bench_*")))
    assert proc.returncode == 130, stdout[-3000:] + stderr[-3000:]
    assert "interrupted before any suite finished: nothing written" in stderr
    assert not out.exists()  # not even an empty folder
    assert not any((tmp_path / "tmp").glob("bissl_bench_*"))  # torch may leave its own caches there
