"""The timing primitives of the benchmarks (bissl_fast.bench.timing) and the per-layer-type profile split."""
from __future__ import annotations

import time

import pytest
import torch

from bissl_fast._machine import calibrate, machine_load, percentile
from bissl_fast.bench.timing import GemmFloor, StreamFloor, interleaved_ratio, measure_floor


def test_percentile_is_nearest_rank():
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert [percentile(values, q) for q in (0.0, 0.2, 0.5, 0.8, 1.0)] == [1.0, 2.0, 3.0, 4.0, 5.0]
    with pytest.raises(ValueError, match="empty"):
        percentile([], 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        percentile([1.0], 1.5)


def test_interleaved_ratio_alternates_and_measures_the_speedup():
    calls = []

    def reference(i):
        calls.append(("ref", i))
        time.sleep(0.012)

    def fast(i):
        calls.append(("fast", i))
        time.sleep(0.004)

    stats = interleaved_ratio(reference, fast, warmup_rounds=1, min_rounds=6, max_rounds=40, max_time_s=10.0,
                              target_spread=0.5)
    assert 6 <= stats.rounds <= 40
    # Sleeps only overshoot, and by the same wake-up delay on both sides: the ratio is below 3, well above 1.
    assert 1.5 < stats.median <= 3.05
    assert stats.p20 <= stats.median <= stats.p80
    timed = calls[2:]  # after the warm-up round
    assert timed[0][0] == "ref" and timed[1][0] == "fast"  # round 0: reference first
    assert timed[2][0] == "fast" and timed[3][0] == "ref"  # round 1: order flipped
    assert {i for _, i in timed} == set(range(stats.rounds))


def test_interleaved_ratio_marks_an_unsteady_ratio_unstable():
    sleeps = iter([0.001, 0.02] * 50)

    stats = interleaved_ratio(lambda i: time.sleep(next(sleeps)), lambda i: time.sleep(0.002), warmup_rounds=0,
                              min_rounds=4, max_rounds=8, max_time_s=10.0, target_spread=0.10)
    assert not stats.stable and stats.rounds == 8
    assert stats.as_dict()["spread"] > 0.10


def test_interleaved_ratio_runs_until_its_minimum_measured_time_with_the_given_timer():
    ticks = iter(range(10_000))

    def clock() -> float:  # every timed call measures exactly 1 "second" on this clock
        return float(next(ticks))

    stats = interleaved_ratio(lambda i: None, lambda i: None, warmup_rounds=0, min_rounds=3, min_time_s=14.0,
                              max_time_s=60.0, timer=clock, target_spread=0.5)
    assert stats.rounds == 7 and stats.median == 1.0 and stats.stable  # 7 rounds x 2 calls >= 14
    assert stats.reference_min_s == stats.fast_min_s == 1.0


def test_interleaved_ratio_keeps_the_garbage_collector_out_of_timed_calls():
    import gc

    seen = []
    interleaved_ratio(lambda i: seen.append(gc.isenabled()), lambda i: seen.append(gc.isenabled()), warmup_rounds=0,
                      min_rounds=3, disable_gc=True, target_spread=10.0)
    assert seen and not any(seen) and gc.isenabled()


def test_interleaved_ratio_rejects_bad_limits():
    with pytest.raises(ValueError, match="min_rounds"):
        interleaved_ratio(lambda i: None, lambda i: None, min_rounds=2)
    with pytest.raises(ValueError, match="target_spread"):
        interleaved_ratio(lambda i: None, lambda i: None, target_spread=0.0)
    with pytest.raises(ValueError, match="min_time_s"):
        interleaved_ratio(lambda i: None, lambda i: None, min_time_s=5.0, max_time_s=1.0)


@pytest.fixture
def one_thread():
    # Two threads on a busy 2-core machine stall at every parallel-region barrier: keep timings meaningful.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_floors_are_measured_once_and_bound_their_work(one_thread):
    cpu = torch.device("cpu")
    stream = StreamFloor(1 << 20)
    first = measure_floor(stream, cpu)
    assert first > 0 and measure_floor(stream, cpu) == first  # cached for the run
    assert measure_floor(StreamFloor(1 << 20, repeats=3), cpu) > 0
    gemm = GemmFloor(64, 32, 64, 2)
    a, b = torch.randn(64, 32), torch.randn(32, 64)
    start = time.perf_counter()
    for _ in range(20):
        torch.mm(a, b)
        torch.mm(a, b)
    two_matmuls = (time.perf_counter() - start) / 20
    # The floor is a best-of-many, so a plain average of the same work can only be slower.
    assert 0 < measure_floor(gemm, cpu) <= two_matmuls
    assert gemm.describe() == "2 GEMM 64x32x64" and StreamFloor(2_000_000, 5).describe() == "read 2.0 MB x5"
    with pytest.raises(TypeError, match="floor spec"):
        measure_floor("copy", cpu)  # type: ignore[arg-type]


def _cal(best, median, load=0.0):
    return {"best_s": best, "median_s": median, "p80_s": median, "loadavg_1min": load, "threads": 2.0}


def test_machine_load_verdict():
    quiet = machine_load(_cal(1.0, 1.05), _cal(1.01, 1.08), cpu_count=2)
    assert not quiet["loaded"] and quiet["reasons"] == []
    stretched = machine_load(_cal(1.0, 1.05), _cal(1.0, 3.0), cpu_count=2)
    assert stretched["loaded"] and "after" in stretched["reasons"][0]
    slower_after = machine_load(_cal(1.0, 1.05), _cal(1.4, 1.45), cpu_count=2)  # the after median vs the best of both
    assert slower_after["loaded"]
    busy = machine_load(_cal(1.0, 1.0, load=3.0), _cal(1.0, 1.0), cpu_count=2)
    assert busy["loaded"] and "load average" in busy["reasons"][0]
    assert not machine_load(_cal(1.0, 1.0, load=3.0), _cal(1.0, 1.0), cpu_count=2, use_loadavg=False)["loaded"]


def test_calibrate_reports_its_kernel_times():
    cal = calibrate(rounds=5)
    assert 0 < cal["best_s"] <= cal["median_s"] <= cal["p80_s"]
    assert cal["threads"] == torch.get_num_threads()


def test_profile_splits_a_bn_net_by_phase_and_layer_type(one_thread):
    from bissl_fast.bench.profile_hvp import (
        LAYER_TYPES,
        PHASES,
        format_breakdown,
        profile_stage,
        stage_backbone,
        stage_problem,
    )

    net, dim = stage_backbone("bnconv")
    problem = stage_problem("simclr", net, dim, batch=4, res=8, device=torch.device("cpu"), solves=2, mark_ranges=True)
    result = profile_stage(problem, damping=10.0, solves=2, cg_iters=2)
    hvp, stage = result["one HVP"], result["upper stage 2x2 CG"]
    for run in (hvp, stage):
        assert set(run["ms"]) == set(PHASES) and all(set(row) == set(LAYER_TYPES) for row in run["ms"].values())
        assert run["total_ms"] == pytest.approx(sum(sum(row.values()) for row in run["ms"].values()))
    # Every layer type of this net shows up where it must: conv and BatchNorm in all three autograd phases,
    # the loss in the forward, products in the double backward only, CG vector work in the stage only.
    for phase in ("forward", "first-order graph", "double backward"):
        assert hvp["ms"][phase]["conv"] > 0 and hvp["ms"][phase]["BatchNorm"] > 0, phase
    assert hvp["ms"]["forward"]["loss"] > 0 and hvp["ms"]["forward"]["linear"] > 0
    assert sum(hvp["ms"]["CG vector work"].values()) == 0
    assert sum(stage["ms"]["CG vector work"].values()) > 0
    table = format_breakdown("bnconv", result)
    assert "| double backward |" in table and "BatchNorm" in table


def test_stage_backbone_rejects_unknown_names():
    from bissl_fast.bench.profile_hvp import stage_backbone, stage_problem

    with pytest.raises(ValueError, match="unknown stage backbone"):
        stage_backbone("vgg")
    net, dim = stage_backbone("small")
    with pytest.raises(ValueError, match="simclr"):
        stage_problem("moco", net, dim, 2, 8, torch.device("cpu"), 1)
