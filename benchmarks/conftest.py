"""pytest-benchmark harness shared by every ``bench_<stem>.py`` suite.

The ``benchmark_op`` fixture times ``fn(*inputs[i])`` rotating over several input sets (so caches
and allocator reuse do not flatter a provider), synchronizes CUDA inside the timed function, warms
up, measures peak memory once outside the timed loop, and stores everything the report needs in
``benchmark.extra_info``: op, provider, mode, size, dtype, device name, torch/triton versions, peak
memory, FLOPs/bytes for the floor, and the speedup against the ``reference`` provider of the same
(op, mode, size, dtype) when that ran earlier in the session.
"""
from __future__ import annotations

import itertools
import os
import sys
import platform
from typing import Any, Callable, Sequence

import pytest
import torch

from bissl_fast._memory import peak_memory_bytes

sys.path.insert(0, os.path.dirname(__file__))

_reference_medians: dict[tuple, float] = {}


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    return torch.device(os.environ.get("BISSL_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


@pytest.fixture
def single_cpu_thread(bench_device):
    """One intra-op thread on CPU, for suites of many tiny ops: there a second thread only adds
    synchronization and run-to-run noise (measured: 1.1-2.0x spread between runs with 2 threads)."""
    threads = torch.get_num_threads()
    if bench_device.type == "cpu":
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def benchmark_op(benchmark) -> Callable[..., Any]:
    def run(
        fn: Callable[..., Any],
        inputs: Sequence[tuple],
        *,
        op: str,
        provider: str,
        mode: str,
        size: dict[str, int],
        dtype: torch.dtype,
        device: torch.device,
        flops: float | None = None,
        bytes_moved: float | None = None,
        rounds: int | None = None,
    ) -> Any:
        if not inputs:
            raise ValueError("benchmark_op needs at least one input set")
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        cycle = itertools.cycle(inputs)

        def timed() -> Any:
            out = fn(*next(cycle))
            sync()
            return out

        for args in inputs:
            fn(*args)
        sync()
        peak = peak_memory_bytes(lambda: fn(*inputs[0]), device)
        if rounds is None:
            result = benchmark(timed)
        else:
            result = benchmark.pedantic(timed, rounds=rounds, warmup_rounds=1, iterations=1)
        key = (op, mode, tuple(sorted(size.items())), str(dtype))
        stats = benchmark.stats.stats if benchmark.stats is not None else None
        median = stats.median if stats is not None else None
        if provider == "reference" and median is not None:
            _reference_medians[key] = median
        reference_median = _reference_medians.get(key)
        benchmark.extra_info.update(
            op=op,
            provider=provider,
            mode=mode,
            size=dict(size),
            dtype=str(dtype).replace("torch.", ""),
            device=_device_name(device),
            device_type=device.type,
            torch=torch.__version__,
            triton=_triton_version(),
            peak_memory_bytes=peak,
            flops=flops,
            bytes_moved=bytes_moved,
            speedup_vs_reference=(reference_median / median) if (reference_median and median) else None,
        )
        return result

    return run
