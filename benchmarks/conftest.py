"""pytest-benchmark harness shared by every ``bench_<stem>.py`` suite (docs/design.md §5).

The ``benchmark_op`` fixture times ``fn(*inputs[i])`` rotating over several input sets (so caches
and allocator reuse do not flatter a provider), synchronizes CUDA inside the timed function, warms
up, measures peak memory once outside the timed loop, and stores everything the report needs in
``benchmark.extra_info``. Given the ``reference`` step of the same case, a fast provider's speedup
is measured by ``bissl_fast.bench.timing.interleaved_ratio``: reference and fast path alternating in this
process until the p20-p80 band of the ratio is within 10% (or the row is marked unstable). Given a
floor spec, the floor is measured once per run at the op's own size and thread count.

Settings for a shared, noisy machine (README "Benchmarks" has the measurements behind them): the
intra-op thread count is fixed for the session (``BISSL_BENCH_THREADS``, default 1) and printed
with the other settings at the top and the end of a run; pytest-benchmark's rounds, warm-up, GC and timer get the defaults of
``noisy_machine_defaults`` unless the command line sets them. ``--speedup-compare-fail=PCT%`` fails
a run whose interleaved speedups fell by more than PCT% against the run ``--benchmark-compare``
loads (the check the README recommends for CI: both sides of a ratio see the same load).

A fixed calibration kernel runs before and after the session, and the verdict (loaded machine or
not) goes into the JSON pytest-benchmark writes.
"""
from __future__ import annotations

import gc
import importlib
import os
import platform
import shlex
import sys
from typing import Any, Callable, Sequence

import pytest
import torch

from bissl_fast.bench.memory import peak_memory_bytes
from bissl_fast._machine import calibrate, machine_load
from bissl_fast.bench.regression import SpeedupCheck, speedup_regressions
from bissl_fast.bench.timing import GemmFloor, StreamFloor, interleaved_ratio, measure_floor

sys.path.insert(0, os.path.dirname(__file__))

from bench_utils import SIZES_ENV, bench_sizes  # noqa: E402  (needs the folder on sys.path)

THREADS_ENV = "BISSL_BENCH_THREADS"
_RATIO_MAX_ROUNDS = 20_000  # the time limits end a ratio first; this only bounds its memory
_calibration: dict[str, dict[str, float]] = {}
_compared_runs: list[dict[str, Any]] = []  # the saved runs --benchmark-compare loaded
_speedups: dict[str, dict[str, Any]] = {}  # this run's rows: fullname -> provider and ratio
_speedup_check: list[SpeedupCheck] = []  # set at the end of a run with --speedup-compare-fail


def _session_device() -> torch.device:
    return torch.device(os.environ.get("BISSL_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))


def _session_threads() -> int:
    raw = os.environ.get(THREADS_ENV, "1")
    if not raw.isdigit() or int(raw) < 1:
        raise pytest.UsageError(f"{THREADS_ENV} must be a positive integer, got {raw!r}")
    return int(raw)


def noisy_machine_defaults(device: torch.device, threads: int) -> dict[str, tuple[str, Any]]:
    """pytest-benchmark settings for this harness: ``{"--option": (dest, value)}``.

    At least 10 rounds and 1 s per row (pytest-benchmark's max_time), two warm-up rounds (one per
    input set), the garbage collector off inside timed calls (it runs between them). On CPU with one
    thread the timer is ``time.process_time``: this process's CPU time, which does not count the
    time another process holds the core; with more threads that would add the threads' times up,
    and on CUDA it would miss the GPU, so there it is ``time.perf_counter``.
    """
    timer = "time.process_time" if device.type == "cpu" and threads == 1 else "time.perf_counter"
    return {
        "--benchmark-min-rounds": ("benchmark_min_rounds", 10),
        "--benchmark-max-time": ("benchmark_max_time", "1.0"),
        "--benchmark-warmup": ("benchmark_warmup", True),
        "--benchmark-warmup-iterations": ("benchmark_warmup_iterations", 2),
        "--benchmark-disable-gc": ("benchmark_disable_gc", True),
        "--benchmark-timer": ("benchmark_timer", timer),
    }


def _given(config: pytest.Config, option: str) -> bool:
    """Whether the command line, ``PYTEST_ADDOPTS`` or the ini file's ``addopts`` sets ``option``."""
    tokens = [*config.invocation_params.args, *shlex.split(os.environ.get("PYTEST_ADDOPTS", "")),
              *config.getini("addopts")]
    return any(str(t) == option or str(t).startswith(option + "=") for t in tokens)


def _percentage(text: str) -> float:
    number = text.removesuffix("%")
    try:
        value = float(number)
    except ValueError:
        raise pytest.UsageError(f"--speedup-compare-fail takes a percentage such as 33%, got {text!r}") from None
    if not 0 < value < 100:
        raise pytest.UsageError(f"--speedup-compare-fail must be between 0% and 100%, got {text!r}")
    return value


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("bissl_fast", "bissl_fast benchmarks")
    group.addoption(
        "--speedup-compare-fail", metavar="PCT%", default=None,
        help="with --benchmark-compare: fail when a fast path's speedup over its reference (the two timed "
             "alternately in this run) is more than PCT%% below the compared run's, e.g. 33%%",
    )
    group.addoption("--ratio-min-rounds", metavar="NUM", type=int, default=None,
                    help="cap on the rounds every interleaved speedup runs at least (default: each row's, 6-10)")
    group.addoption("--ratio-max-time", metavar="SECONDS", type=float, default=None,
                    help="cap on the seconds each interleaved speedup may take (default: each row's, 10-30)")


def pytest_configure(config: pytest.Config) -> None:
    # Runs before pytest-benchmark's own pytest_configure (trylast), which reads these options.
    threads = _session_threads()
    device = _session_device()
    try:
        bench_sizes(device)  # a bad BISSL_BENCH_SIZES stops here, not in every test
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    torch.set_num_threads(threads)
    for option, (dest, value) in noisy_machine_defaults(device, threads).items():
        if not _given(config, option):
            setattr(config.option, dest, value)
    if config.getoption("speedup_compare_fail") is not None:
        config.option.speedup_compare_fail = _percentage(config.getoption("speedup_compare_fail"))


def _settings_line(config: pytest.Config) -> str:
    device = _session_device()
    return (
        f"bissl_fast benchmarks: device {device.type}, intra-op threads {torch.get_num_threads()} ({THREADS_ENV}, "
        f"default 1), sizes {bench_sizes(device)} ({SIZES_ENV}), timer {config.getoption('benchmark_timer')}, "
        f"min rounds {config.getoption('benchmark_min_rounds')}, max time {config.getoption('benchmark_max_time')} s, "
        f"GC off in timed calls: {config.getoption('benchmark_disable_gc')}"
    )


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [_settings_line(config)]


def pytest_benchmark_compare_machine_info(config, benchmarksession, machine_info, compared_benchmark) -> None:
    """Keeps each saved run that ``--benchmark-compare`` loads, for ``--speedup-compare-fail``."""
    _compared_runs.append(compared_benchmark)


def pytest_sessionstart(session: pytest.Session) -> None:
    if session.config.getoption("speedup_compare_fail") is not None and not _compared_runs:
        raise pytest.UsageError("--speedup-compare-fail needs --benchmark-compare and a saved run to compare with")


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    threshold = session.config.getoption("speedup_compare_fail")
    if threshold is None:
        return
    check = speedup_regressions(_speedups, _compared_runs, threshold)
    _speedup_check.append(check)
    if check.regressions:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter) -> None:
    # Runs before pytest-benchmark's summary, which raises when its own --benchmark-compare-fail fails.
    if _speedups:  # also under -q, which hides the header
        terminalreporter.write_line(_settings_line(terminalreporter.config))
    if _speedup_check:
        check = _speedup_check[0]
        threshold = terminalreporter.config.getoption("speedup_compare_fail")
        terminalreporter.write_line(f"speedup check: {check.compared} rows compared with the saved run, "
                                    f"{len(check.regressions)} more than {threshold:g}% down")
        if check.regressions:
            terminalreporter.write_line("Speedup has regressed:\n" + "\n".join("\t" + line for line in check.regressions))


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
        "threads": torch.get_num_threads(),
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


def _timer(config: pytest.Config) -> Callable[[], float]:
    """The clock pytest-benchmark times with (``--benchmark-timer``), for the interleaved ratio too."""
    module, name = str(config.getoption("benchmark_timer")).rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


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
def benchmark_op(benchmark, request) -> Callable[..., Any]:
    config = request.config

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
        ratio_min_rounds: int = 10,
        ratio_max_time_s: float = 10.0,
    ) -> Any:
        """Time ``fn`` with pytest-benchmark; with ``reference``, also the interleaved speedup over it.

        ``reference`` takes the same inputs as ``fn``; ``floor`` is the work the op cannot avoid
        (``flops`` / ``bytes_moved`` are informational). Rounds, warm-up, GC and timer are
        pytest-benchmark's options (``noisy_machine_defaults``); the ratio runs at least
        ``ratio_min_rounds`` rounds and pytest-benchmark's max_time, at most ``ratio_max_time_s`` seconds
        (``--ratio-min-rounds`` and ``--ratio-max-time`` cap these), with the same timer and GC setting.
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
        # The previous row's garbage is collected here, not inside this row's measurements.
        gc.collect()
        ratio = None
        if reference is not None:
            for args in inputs:  # fn is warm already: the ratio needs no warm-up round of its own
                reference(*args)
            sync()
            rounds_cap, time_cap = config.getoption("ratio_min_rounds"), config.getoption("ratio_max_time")
            max_time_s = ratio_max_time_s if time_cap is None else min(ratio_max_time_s, time_cap)
            ratio = interleaved_ratio(
                lambda i: reference(*inputs[i % len(inputs)]), lambda i: fn(*inputs[i % len(inputs)]),
                device=device, warmup_rounds=0,
                min_rounds=ratio_min_rounds if rounds_cap is None else max(3, min(ratio_min_rounds, rounds_cap)),
                # As long as pytest-benchmark times each side (its max_time): a fast op gets many rounds.
                min_time_s=min(float(config.getoption("benchmark_max_time")), max_time_s), max_time_s=max_time_s,
                max_rounds=_RATIO_MAX_ROUNDS,
                timer=_timer(config), disable_gc=bool(config.getoption("benchmark_disable_gc")),
            )
        floor_s = measure_floor(floor, device, dtype) if floor is not None else None
        result = benchmark(timed)
        speedup = 1.0 if provider == "reference" else (ratio.median if ratio else None)
        _speedups[benchmark.fullname] = {"provider": provider, "speedup": speedup}
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
            speedup_vs_reference=speedup,
            ratio=ratio.as_dict() if ratio else None,
        )
        return result

    return run
