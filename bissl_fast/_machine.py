"""Is the machine busy? A fixed calibration kernel timed a few times and the load average.

``bissl-fast bench`` calibrates before and after its suites and marks a loaded run in its report;
``bissl-fast run`` calibrates once at the start and warns when its intra-op threads would share
cores with other work (a run with 2 threads on 2 cores, one of them busy, runs several times
slower, since every parallel region waits for its slowest thread).
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Any

import torch


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of ``values`` (``q`` in [0, 1]): always one of the measured values."""
    if not values:
        raise ValueError("percentile of an empty list")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"percentile q must be in [0, 1], got {q}")
    ordered = sorted(values)
    return ordered[round(q * (len(ordered) - 1))]


def load_average() -> float:
    """The 1-minute load average, or -1 where the OS has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return -1.0


def calibrate(device: torch.device = torch.device("cpu"), rounds: int = 25) -> dict[str, float]:
    """Times of a fixed kernel (a 384x384 fp32 matmul and an exp over 1 M elements), current threads.

    Returns ``best_s``, ``median_s`` and ``p80_s`` of ``rounds`` calls, the 1-minute load average
    (CPU; -1 where the OS has none) and the thread count. On an idle machine median/best stays
    close to 1; another process on the cores stretches the median and the tail.
    """
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(384, 384, generator=gen).to(device)
    x = torch.randn(1 << 20, generator=gen).to(device)

    def kernel() -> None:
        torch.mm(a, a)
        torch.exp(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    kernel()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        kernel()
        times.append(time.perf_counter() - start)
    return {
        "best_s": min(times),
        "median_s": statistics.median(times),
        "p80_s": percentile(times, 0.8),
        "loadavg_1min": load_average(),
        "threads": float(torch.get_num_threads()),
    }


# A calibration whose median is more than this over its own best, or over the other
# calibration's best, means something else was running on the cores.
LOADED_STRETCH = 1.25


def machine_load(
    before: dict[str, float], after: dict[str, float], cpu_count: int | None = None, use_loadavg: bool = True
) -> dict[str, Any]:
    """Verdict on whether the machine was loaded around a suite, from two ``calibrate`` results.

    Loaded when either calibration's median is ``LOADED_STRETCH`` x the best of both, or (with
    ``use_loadavg``) when the load average before the suite exceeds half the cores; pass
    ``use_loadavg=False`` when our own earlier work is still in that average. Returns
    ``{"loaded": bool, "reasons": [str, ...], "before": ..., "after": ...}``.
    """
    cores = cpu_count or os.cpu_count() or 1
    best = min(before["best_s"], after["best_s"])
    reasons = []
    for name, cal in (("before", before), ("after", after)):
        stretch = cal["median_s"] / best
        if stretch > LOADED_STRETCH:
            reasons.append(f"calibration kernel {name} the suite: median {stretch:.2f}x its best")
    if use_loadavg and before["loadavg_1min"] > 0.5 * cores:
        reasons.append(f"load average {before['loadavg_1min']:.2f} on {cores} cores before the suite")
    return {"loaded": bool(reasons), "reasons": reasons, "before": before, "after": after}


def shared_cores(calibration: dict[str, float], threads: int, load: float, cpu_count: int | None = None) -> list[str]:
    """Why ``threads`` threads of ours would share cores with other work (empty when they would not).

    ``calibration`` is a :func:`calibrate` result taken with our threads; ``load`` a
    :func:`load_average` taken before our own work started (so it is other processes' work). Busy
    when the cores that load leaves free are fewer than ``threads`` (half a core of slack for
    background noise), or when the calibration's median is ``LOADED_STRETCH`` x its best.
    """
    cores = cpu_count or os.cpu_count() or 1
    reasons = []
    if load >= 0 and cores - load < threads - 0.5:
        reasons.append(f"load average {load:.2f} on {cores} cores")
    stretch = calibration["median_s"] / calibration["best_s"]
    if stretch > LOADED_STRETCH:
        reasons.append(f"a calibration kernel's median took {stretch:.2f}x its best")
    return reasons


__all__ = ["LOADED_STRETCH", "calibrate", "load_average", "machine_load", "percentile", "shared_cores"]
