"""Timing primitives of the benchmarks (docs/design.md §5): interleaved speedup ratios and floors.

- ``interleaved_ratio`` times a reference and a fast path alternately in one process, one call of
  each per round (the order flips every round), and reports the median of the per-round ratios
  with its p20-p80 band. Slow drift of the machine (another process starting, frequency changes)
  hits both sides of a round alike, so the ratio is far steadier than two medians taken minutes
  apart. Rounds continue until the band is within ``target_spread`` of the median, or a cap on
  rounds or time is reached and the result is marked unstable.
- ``measure_floor`` gives a time the bounded op cannot beat: the best of many rounds of the
  fastest primitive that does the op's unavoidable work at the op's own size (streaming reads of
  its unique bytes, or its GEMMs), with the same threads.

Whether the machine was busy while a suite ran is the library core's question
(:mod:`bissl_fast._machine`: ``calibrate``, ``machine_load``), since ``bissl-fast run`` asks it too.
"""
from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from .._machine import percentile


def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


@dataclass(frozen=True)
class RatioStats:
    """Reference time / fast time, per round of an interleaved measurement."""

    median: float  # median of the per-round ratios (the speedup)
    p20: float
    p80: float
    rounds: int
    stable: bool  # (p80 - p20) / median <= the target spread
    reference_median_s: float
    fast_median_s: float
    reference_min_s: float
    fast_min_s: float

    @property
    def spread(self) -> float:
        """Width of the p20-p80 band relative to the median."""
        return (self.p80 - self.p20) / self.median

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "spread": self.spread}


def interleaved_ratio(
    reference: Callable[[int], Any],
    fast: Callable[[int], Any],
    *,
    device: torch.device = torch.device("cpu"),
    warmup_rounds: int = 2,
    min_rounds: int = 10,
    max_rounds: int = 400,
    max_time_s: float = 30.0,
    min_time_s: float = 0.0,
    target_spread: float = 0.10,
    timer: Callable[[], float] = time.perf_counter,
    disable_gc: bool = False,
) -> RatioStats:
    """Speedup of ``fast`` over ``reference``, measured round by round in alternation.

    Both callables take the round index (to rotate input sets). Warm-up rounds are not recorded.
    Once ``min_rounds`` rounds and ``min_time_s`` seconds of measured time (both sides, by
    ``timer``) are done, stops at the first round where the p20-p80 band of the ratios is within
    ``target_spread`` of their median; otherwise at ``max_rounds`` or ``max_time_s`` of wall time
    (then the result has ``stable=False``). The minimum time gives a fast op many rounds, so one
    disturbed stretch of the run moves the median little; it counts measured time, not wall time,
    so a loaded machine does not cut the sample short. ``timer`` times each call (``time.process_time``: this
    process's CPU time, for one-thread CPU runs); ``disable_gc`` keeps the garbage collector out of
    the timed calls (it runs between them).
    """
    if min_rounds < 3 or max_rounds < min_rounds:
        raise ValueError(f"need 3 <= min_rounds <= max_rounds, got {min_rounds}, {max_rounds}")
    if not 0 <= min_time_s <= max_time_s:
        raise ValueError(f"need 0 <= min_time_s <= max_time_s, got {min_time_s}, {max_time_s}")
    if not target_spread > 0:
        raise ValueError(f"target_spread must be positive, got {target_spread}")
    sync = _synchronizer(device)

    def timed(fn: Callable[[int], Any], i: int) -> float:
        gc_was_enabled = gc.isenabled()
        if disable_gc:
            gc.disable()
        try:
            sync()
            start = timer()
            fn(i)
            sync()
            return timer() - start
        finally:
            if gc_was_enabled:
                gc.enable()

    for i in range(warmup_rounds):
        reference(i)
        fast(i)
    ref_times: list[float] = []
    fast_times: list[float] = []
    ratios: list[float] = []
    start = time.perf_counter()
    measured = 0.0
    stable = False
    for i in range(max_rounds):
        # Flipping the order each round cancels whatever the first call of a round pays for the second.
        if i % 2 == 0:
            t_ref = timed(reference, i)
            t_fast = timed(fast, i)
        else:
            t_fast = timed(fast, i)
            t_ref = timed(reference, i)
        ref_times.append(t_ref)
        fast_times.append(t_fast)
        ratios.append(t_ref / max(t_fast, 1e-12))
        measured += t_ref + t_fast
        wall = time.perf_counter() - start
        if len(ratios) >= min_rounds and (measured >= min_time_s or wall > max_time_s or i == max_rounds - 1):
            med = statistics.median(ratios)
            stable = (percentile(ratios, 0.8) - percentile(ratios, 0.2)) <= target_spread * med
            if stable or wall > max_time_s:
                break
    return RatioStats(
        median=statistics.median(ratios),
        p20=percentile(ratios, 0.2),
        p80=percentile(ratios, 0.8),
        rounds=len(ratios),
        stable=stable,
        reference_median_s=statistics.median(ref_times),
        fast_median_s=statistics.median(fast_times),
        reference_min_s=min(ref_times),
        fast_min_s=min(fast_times),
    )


def best_time(fn: Callable[[], Any], device: torch.device, rounds: int = 30, max_time_s: float = 2.0) -> float:
    """Fastest of ``rounds`` timed calls (after one warm-up call), stopping early after ``max_time_s``."""
    sync = _synchronizer(device)
    fn()
    sync()
    best = math.inf
    deadline = time.perf_counter() + max_time_s
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
        if time.perf_counter() > deadline:
            break
    return best


@dataclass(frozen=True)
class StreamFloor:
    """The op must move ``nbytes`` bytes ``repeats`` times: no faster than streaming reads of them."""

    nbytes: int
    repeats: int = 1

    def describe(self) -> str:
        times = f" x{self.repeats}" if self.repeats != 1 else ""
        return f"read {self.nbytes / 1e6:.1f} MB{times}"


@dataclass(frozen=True)
class GemmFloor:
    """The op must do ``count`` GEMMs of ``[m, k] x [k, n]`` (in FLOPs): no faster than that many matmuls."""

    m: int
    k: int
    n: int
    count: float

    def describe(self) -> str:
        count = f"{self.count:g}"
        return f"{count} GEMM {self.m}x{self.k}x{self.n}"


_floor_cache: dict[tuple, float] = {}


def measure_floor(spec: StreamFloor | GemmFloor, device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """Seconds the op bounded by ``spec`` cannot beat on ``device`` with the current thread count.

    Streaming: the fastest of a vectorized sum and a BLAS dot over a buffer of ``nbytes``, best of
    many rounds; reads are the cheapest memory traffic there is (a copy pays for a write-allocate
    read as well), so charging every byte at the read rate is a true lower bound. GEMM: the best
    of many ``[m, k] @ [k, n]`` matmuls in ``dtype``, times ``count``. Measured once per
    (spec, device, dtype, threads) per process.
    """
    key = (spec, str(device), str(dtype), torch.get_num_threads())
    if key in _floor_cache:
        return _floor_cache[key]
    if isinstance(spec, StreamFloor):
        elems = max(2, spec.nbytes // 4)
        buf = torch.randn(elems, device=device)
        half_a, half_b = buf[: elems // 2], buf[elems // 2 : 2 * (elems // 2)]
        read_s = min(best_time(lambda: buf.sum(), device), best_time(lambda: torch.dot(half_a, half_b), device))
        seconds = spec.repeats * read_s
    elif isinstance(spec, GemmFloor):
        a = torch.randn(spec.m, spec.k, device=device, dtype=dtype)
        b = torch.randn(spec.k, spec.n, device=device, dtype=dtype)
        seconds = spec.count * best_time(lambda: torch.mm(a, b), device)
    else:
        raise TypeError(f"unknown floor spec {spec!r}")
    _floor_cache[key] = seconds
    return seconds
