"""``bissl-fast bench``: run the benchmark suites for this device and write a table, JSON, Markdown and plots.

The suites are the pytest-benchmark files in the repository's ``benchmarks/`` folder. Besides
timing, this measures two device ceilings (a large copy and a large matmul) so each result can
be put against the floor of DESIGN §5: ``floor = flops / matmul_rate`` or ``bytes / copy_rate``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

DEFAULT_SUITE_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


def measure_ceilings(device: torch.device) -> dict[str, float]:
    """Copy bandwidth (bytes/s, read + write) and fp32 matmul rate (FLOP/s) measured on ``device``."""
    big = 1 << (26 if device.type == "cuda" else 24)
    src = torch.empty(big, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)

    def best_time(fn, reps: int = 5) -> float:
        fn()
        times = []
        for _ in range(reps):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        return min(times)

    copy_s = best_time(lambda: dst.copy_(src))
    mm_s = best_time(lambda: torch.mm(a, b))
    return {"copy_bytes_per_s": 2 * big * 4 / copy_s, "matmul_flops_per_s": 2 * n ** 3 / mm_s}


def _percentile(sorted_values: list[float], q: float) -> float:
    idx = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[idx]


def summarize(bench_json: dict[str, Any], ceilings: dict[str, float]) -> list[dict[str, Any]]:
    rows = []
    for bench in bench_json.get("benchmarks", []):
        info = bench.get("extra_info", {})
        data = sorted(bench["stats"].get("data") or [bench["stats"]["median"]])
        median = bench["stats"]["median"]
        floor = None
        if info.get("flops"):
            floor = info["flops"] / ceilings["matmul_flops_per_s"]
        elif info.get("bytes_moved"):
            floor = info["bytes_moved"] / ceilings["copy_bytes_per_s"]
        rows.append(
            {
                "name": bench["name"],
                "op": info.get("op", bench["group"] or bench["name"]),
                "provider": info.get("provider", "?"),
                "mode": info.get("mode", "?"),
                "size": info.get("size", {}),
                "dtype": info.get("dtype", "?"),
                "median_s": median,
                "p20_s": _percentile(data, 0.2),
                "p80_s": _percentile(data, 0.8),
                "peak_memory_bytes": info.get("peak_memory_bytes"),
                "speedup_vs_reference": info.get("speedup_vs_reference"),
                "pct_of_floor": (100.0 * floor / median) if floor else None,
            }
        )
    return rows


def _fmt_size(size: dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in size.items())


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| op | mode | size | dtype | provider | median ms | p20 ms | p80 ms | peak MB | vs reference | % of floor |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        peak = None if r["peak_memory_bytes"] is None else r["peak_memory_bytes"] / 1e6
        lines.append(
            f"| {r['op']} | {r['mode']} | {_fmt_size(r['size'])} | {r['dtype']} | {r['provider']} | "
            f"{r['median_s'] * 1e3:.3f} | {r['p20_s'] * 1e3:.3f} | {r['p80_s'] * 1e3:.3f} | {_fmt(peak, '.1f')} | "
            f"{_fmt(r['speedup_vs_reference'], '.2f', 'x')} | {_fmt(r['pct_of_floor'], '.1f', '%')} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """One PNG per (op, mode, dtype): median time and peak memory vs size, a line per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["op"], r["mode"], r["dtype"]), []).append(r)
    written = []
    for (op, mode, dtype), group in groups.items():
        order = {_fmt_size(r["size"]): tuple(r["size"].values()) for r in group}
        sizes = sorted(order, key=order.get)
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
        for provider in sorted({r["provider"] for r in group}):
            by_size = {_fmt_size(r["size"]): r for r in group if r["provider"] == provider}
            xs = [i for i, s in enumerate(sizes) if s in by_size]
            ax_t.plot(xs, [by_size[sizes[i]]["median_s"] * 1e3 for i in xs], marker="o", label=provider)
            mem = [(i, by_size[sizes[i]]["peak_memory_bytes"]) for i in xs if by_size[sizes[i]]["peak_memory_bytes"] is not None]
            if mem:
                ax_m.plot([i for i, _ in mem], [m / 1e6 for _, m in mem], marker="o", label=provider)
        for ax, ylabel in ((ax_t, "median time (ms)"), (ax_m, "peak memory (MB)")):
            ax.set_xticks(range(len(sizes)))
            ax.set_xticklabels(sizes, rotation=20, fontsize=8)
            ax.set_ylabel(ylabel)
            ax.set_yscale("log")
            ax.legend()
            ax.grid(alpha=0.3)
        fig.suptitle(f"{op} {mode} {dtype}")
        fig.tight_layout()
        path = out_dir / f"{op}_{mode.replace('+', '_')}_{dtype}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def run_bench(
    out_dir: Path,
    suite_dir: Path = DEFAULT_SUITE_DIR,
    select: str | None = None,
    device: str | None = None,
    max_time: float = 1.0,
) -> int:
    """Run the suites (pytest-benchmark), then print and write the report; returns pytest's exit code."""
    if not suite_dir.is_dir():
        raise FileNotFoundError(
            f"benchmark suites not found at {suite_dir}; run from a source checkout or pass --suite-dir"
        )
    out_dir = out_dir.resolve()  # pytest runs inside the suite folder
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / "pytest_benchmark.json"
    env = dict(os.environ)
    if device:
        env["BISSL_BENCH_DEVICE"] = device
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-save-data",
           f"--benchmark-json={raw}", "--benchmark-columns=median,iqr,rounds",
           f"--benchmark-max-time={max_time}", "--benchmark-min-rounds=3"]
    files = sorted(str(p) for p in suite_dir.glob("bench_*.py") if p.name != "bench_utils.py")
    if select:
        files = [f for f in files if select in Path(f).stem]
    code = subprocess.call(cmd + files, cwd=suite_dir, env=env)
    if not raw.exists():
        print("no benchmark results were written", file=sys.stderr)
        return code or 1
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ceilings = measure_ceilings(dev)
    bench_json = json.loads(raw.read_text())
    rows = summarize(bench_json, ceilings)
    table = markdown_table(rows)
    machine = bench_json.get("machine_info", {})
    header = (
        f"# bissl_fast benchmarks\n\ndevice: {_device_label(dev)}; torch {torch.__version__}; "
        f"python {machine.get('python_version', '?')}\n\nceilings measured here: copy "
        f"{ceilings['copy_bytes_per_s'] / 1e9:.1f} GB/s, fp32 matmul {ceilings['matmul_flops_per_s'] / 1e12:.2f} TFLOP/s\n\n"
    )
    (out_dir / "results.md").write_text(header + table + "\n")
    (out_dir / "results.json").write_text(
        json.dumps({"device": _device_label(dev), "torch": torch.__version__, "ceilings": ceilings, "results": rows}, indent=2)
    )
    plots = plot(rows, out_dir)
    print(header + table)
    print(f"\nwrote {out_dir / 'results.json'}, {out_dir / 'results.md'} and {len(plots)} plots")
    return code


def _device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"
