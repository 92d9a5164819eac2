"""pytest-benchmark harness shared by every ``bench_<stem>.py`` suite (docs/design.md §5).

The ``benchmark_op`` fixture times ``fn(*inputs[i])`` rotating over several input sets (so caches
and allocator reuse do not flatter a provider), synchronizes CUDA inside the timed function, warms
up, measures peak memory once outside the timed loop, and stores everything the report needs in
``benchmark.extra_info``. Given the ``reference`` step of the same case, a fast provider's speedup
is measured by ``bissl_fast.bench.timing.interleaved_ratio``: reference and fast path alternating in this
process until the p20-p80 band of the ratio is within 10% (or the row is marked unstable). Given a
floor spec, the floor is measured once per run at the op's own size and thread count.

The intra-op thread count is fixed for the whole session (``BISSL_BENCH_THREADS``, default: what
torch picked at start-up) and recorded per row; suites of many tiny ops ask for one thread through
the ``single_cpu_thread`` fixture. A fixed calibration kernel runs before and after the session,
and the verdict (loaded machine or not) goes into the JSON pytest-benchmark writes.
"""
from __future__ import annotations

import os
import platform
import sys
from typing import Any, Callable, Sequence

import pytest
import torch

from bissl_fast.bench.memory import peak_memory_bytes
from bissl_fast._machine import calibrate, machine_load
from bissl_fast.bench.timing import GemmFloor, StreamFloor, interleaved_ratio, measure_floor

sys.path.insert(0, os.path.dirname(__file__))

_SESSION_THREADS = int(os.environ.get("BISSL_BENCH_THREADS", "0")) or torch.get_num_threads()
torch.set_num_threads(_SESSION_THREADS)
_calibration: dict[str, dict[str, float]] = {}


def _session_device() -> torch.device:
    return torch.device(os.environ.get("BISSL_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))


@pytest.fixture(scope="session", autouse=True)
def _calibration_before_suite() -> None:
    _calibration["before"] = calibrate(_session_device())


def pytest_benchmark_update_json(config: pytest.Config, benchmarks: list, output_json: dict) -> None:
    """Adds the thread count and the before/after calibration verdict to the saved JSON."""
    if "before" not in _calibration:
        return
    _calibration["after"] = calibrate(_session_device())
    # Our own process has been busy for at most a moment when "before" ran, so the load average
    # then is other processes' work -- unless a previous suite of ours ran just before (bench_report
    # runs suites back to back and says so through BISSL_BENCH_SKIP_LOADAVG).
    use_loadavg = os.environ.get("BISSL_BENCH_SKIP_LOADAVG", "0") != "1"
    output_json["bissl_fast"] = {
        "threads": _SESSION_THREADS,
        "machine_load": machine_load(_calibration["before"], _calibration["after"], use_loadavg=use_loadavg),
    }


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    return _session_device()


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
        size: dict[str, Any],
        dtype: torch.dtype,
        device: torch.device,
        reference: Callable[..., Any] | None = None,
        floor: StreamFloor | GemmFloor | None = None,
        flops: float | None = None,
        bytes_moved: float | None = None,
        rounds: int | None = None,
        ratio_min_rounds: int = 10,
        ratio_max_time_s: float = 10.0,
    ) -> Any:
        """Time ``fn`` with pytest-benchmark; with ``reference``, also the interleaved speedup over it.

        ``reference`` takes the same inputs as ``fn``; ``floor`` is the work the op cannot avoid
        (``flops`` / ``bytes_moved`` are informational). ``rounds`` fixes pytest-benchmark's rounds
        (default: its own calibration); the ratio runs ``ratio_min_rounds`` rounds or more, at most
        ``ratio_max_time_s`` seconds.
        """
        if not inputs:
            raise ValueError("benchmark_op needs at least one input set")
        if provider == "reference" and reference is not None:
            raise ValueError("the reference provider is the baseline: it takes no reference")
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        position = [0]

        def timed() -> Any:
            out = fn(*inputs[position[0] % len(inputs)])
            position[0] += 1
            sync()
            return out

        for args in inputs:
            fn(*args)
        sync()
        peak = peak_memory_bytes(lambda: fn(*inputs[0]), device)
        ratio = None
        if reference is not None:
            ratio = interleaved_ratio(
                lambda i: reference(*inputs[i % len(inputs)]), lambda i: fn(*inputs[i % len(inputs)]),
                device=device, warmup_rounds=1, min_rounds=ratio_min_rounds, max_time_s=ratio_max_time_s,
            )
        floor_s = measure_floor(floor, device, dtype) if floor is not None else None
        if rounds is None:
            result = benchmark(timed)
        else:
            result = benchmark.pedantic(timed, rounds=rounds, warmup_rounds=1, iterations=1)
        benchmark.extra_info.update(
            op=op,
            provider=provider,
            mode=mode,
            size=dict(size),
            dtype=str(dtype).replace("torch.", ""),
            device=_device_name(device),
            device_type=device.type,
            threads=torch.get_num_threads() if device.type == "cpu" else None,
            torch=torch.__version__,
            triton=_triton_version(),
            peak_memory_bytes=peak,
            flops=flops,
            bytes_moved=bytes_moved,
            floor_s=floor_s,
            floor_method=floor.describe() if floor is not None else None,
            speedup_vs_reference=1.0 if provider == "reference" else (ratio.median if ratio else None),
            ratio=ratio.as_dict() if ratio else None,
        )
        return result

    return run
