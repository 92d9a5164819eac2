"""The machine-load probe of the library core (bissl_fast._machine): when do our threads share busy cores?"""
from __future__ import annotations

from bissl_fast._machine import LOADED_STRETCH, calibrate, shared_cores


def _calibration(stretch: float) -> dict[str, float]:
    return {"best_s": 1.0, "median_s": stretch, "p80_s": stretch, "loadavg_1min": 0.0, "threads": 2.0}


def test_threads_that_the_load_average_leaves_no_core_for_are_reported():
    quiet = _calibration(1.0)
    assert shared_cores(quiet, threads=2, load=0.2, cpu_count=2) == []
    assert shared_cores(quiet, threads=1, load=1.0, cpu_count=2) == []  # the other process has its own core
    assert shared_cores(quiet, threads=2, load=1.0, cpu_count=2) == ["load average 1.00 on 2 cores"]
    assert shared_cores(quiet, threads=16, load=0.3, cpu_count=16) == []  # background noise is not a busy core
    assert shared_cores(quiet, threads=16, load=1.0, cpu_count=16) == ["load average 1.00 on 16 cores"]
    assert shared_cores(quiet, threads=2, load=-1.0, cpu_count=2) == []  # no load average on this OS


def test_a_stretched_calibration_is_reported():
    stretched = shared_cores(_calibration(LOADED_STRETCH + 0.5), threads=1, load=0.0, cpu_count=2)
    assert stretched == [f"a calibration kernel's median took {LOADED_STRETCH + 0.5:.2f}x its best"]
    assert shared_cores(_calibration(LOADED_STRETCH - 0.05), threads=1, load=0.0, cpu_count=2) == []


def test_calibration_times_are_ordered():
    cal = calibrate(rounds=3)
    assert 0 < cal["best_s"] <= cal["median_s"] <= cal["p80_s"]
