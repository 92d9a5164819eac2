"""``bissl-fast bench``: run the benchmark suites for this device and write a table, JSON, Markdown and plots.

The suites are the pytest-benchmark files ``bench_*.py`` shipped in ``bissl_fast/bench/suites``
(in a checkout, ``benchmarks/``). Each suite runs in its own pytest process (:mod:`.suite_runs`:
``--select``, ``--quick``, what Ctrl-C keeps), with the intra-op thread count fixed. A run stopped
by Ctrl-C still writes the report of the suites that finished, marked as interrupted at its top.
A fixed calibration kernel runs before and after the whole run (here) and
around each suite (in its conftest); if either says the machine was busy, the report says so at
the top instead of publishing the numbers silently (docs/design.md §5).

Per row: pytest-benchmark's median and p20/p80, peak memory, the speedup over the reference
measured interleaved in one process (``bissl_fast.bench.timing.interleaved_ratio``) with its p20-p80
band, and "% of floor" against a floor measured in the same run at the op's own size.

``render_readme_block`` turns a committed ``results.json`` into the README's CPU table, which
lives between ``<!-- bench-cpu:start ... -->`` and ``<!-- bench-cpu:end -->``; ``update_readme``
rewrites that block (``bissl-fast bench --update-readme README.md`` does it after a run).
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch

from .._machine import calibrate, machine_load, percentile
from .._provenance import BENCHMARK_SUITE_PATTERNS, older_code_note, provenance, short_form
from .suite_runs import (
    QUICK_MAX_TIME_S,
    QUICK_PYTEST_OPTIONS,
    BenchError,
    check_requirements,
    run_suites,
    select_suites,
)
from .timing import best_time

DEFAULT_SUITE_DIR = Path(__file__).resolve().parent / "suites"
README_START = "<!-- bench-cpu:start"
README_END = "<!-- bench-cpu:end -->"
_INTERRUPTED = 130  # exit code of a run stopped by Ctrl-C (128 + SIGINT)


def measure_ceilings(device: torch.device) -> dict[str, float]:
    """Copy bandwidth (bytes/s, read + write) and fp32 matmul rate (FLOP/s) of large buffers on ``device``.

    Only for rows that give ``flops``/``bytes_moved`` but no floor spec: a cache-resident op can
    beat these, so such rows are marked when they exceed 100%.
    """
    big = 1 << (26 if device.type == "cuda" else 24)
    src = torch.empty(big, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    copy_s = best_time(lambda: dst.copy_(src), device, rounds=5)
    mm_s = best_time(lambda: torch.mm(a, b), device, rounds=5)
    return {"copy_bytes_per_s": 2 * big * 4 / copy_s, "matmul_flops_per_s": 2 * n ** 3 / mm_s}


def summarize(bench_json: dict[str, Any], ceilings: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """One row per benchmark of a pytest-benchmark JSON (with ``benchmark_op``'s ``extra_info``)."""
    rows = []
    for bench in bench_json.get("benchmarks", []):
        info = bench.get("extra_info", {})
        data = sorted(bench["stats"].get("data") or [bench["stats"]["median"]])
        median = bench["stats"]["median"]
        floor, method = info.get("floor_s"), info.get("floor_method")
        if floor is None and ceilings is not None:
            if info.get("flops"):
                floor, method = info["flops"] / ceilings["matmul_flops_per_s"], "large-matmul rate"
            elif info.get("bytes_moved"):
                floor, method = info["bytes_moved"] / ceilings["copy_bytes_per_s"], "large-copy rate"
        rows.append(
            {
                "name": bench["name"],
                "op": info.get("op", bench["group"] or bench["name"]),
                "provider": info.get("provider", "?"),
                "mode": info.get("mode", "?"),
                "size": info.get("size", {}),
                "dtype": info.get("dtype", "?"),
                "threads": info.get("threads"),
                "median_s": median,
                "p20_s": percentile(data, 0.2),
                "p80_s": percentile(data, 0.8),
                "rounds": len(data),
                "peak_memory_bytes": info.get("peak_memory_bytes"),
                "speedup_vs_reference": info.get("speedup_vs_reference"),
                "ratio": info.get("ratio"),
                "floor_s": floor,
                "floor_method": method,
                "pct_of_floor": (100.0 * floor / median) if floor else None,
            }
        )
    return rows


def _fmt_size(size: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in size.items())


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _fmt_speedup(row: dict[str, Any]) -> str:
    text = _fmt(row["speedup_vs_reference"], ".2f", "x")
    ratio = row.get("ratio")
    if ratio and not ratio["stable"]:
        text += " unstable"
    return text


def _fmt_band(row: dict[str, Any]) -> str:
    ratio = row.get("ratio")
    if not ratio:
        return "-"
    return f"{ratio['p20']:.2f}-{ratio['p80']:.2f} ({ratio['rounds']})"


def _fmt_floor(row: dict[str, Any]) -> str:
    pct = row["pct_of_floor"]
    if pct is None:
        return "-"
    return f"{pct:.1f}%" + (" (a)" if pct > 100 else "")


FLOOR_NOTE = (
    "(a) above 100%: this op beat the floor kernel timed at its size (the floor is a lower-bound "
    "estimate: the best of many runs of a streaming read or of the op's GEMMs; a row marked so ran "
    "in cache where that kernel is not at its best)."
)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The full results table (Markdown)."""
    lines = [
        "| op | mode | size | dtype | provider | median ms | p20 ms | p80 ms | peak MB | vs reference "
        "| ratio p20-p80 (rounds) | threads | % of floor | floor |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        peak = None if r["peak_memory_bytes"] is None else r["peak_memory_bytes"] / 1e6
        lines.append(
            f"| {r['op']} | {r['mode']} | {_fmt_size(r['size'])} | {r['dtype']} | {r['provider']} | "
            f"{r['median_s'] * 1e3:.3f} | {r['p20_s'] * 1e3:.3f} | {r['p80_s'] * 1e3:.3f} | {_fmt(peak, '.1f')} | "
            f"{_fmt_speedup(r)} | {_fmt_band(r)} | {r.get('threads') or '-'} | {_fmt_floor(r)} | "
            f"{r.get('floor_method') or '-'} |"
        )
    if any((r["pct_of_floor"] or 0) > 100 for r in rows):
        lines += ["", FLOOR_NOTE]
    return "\n".join(lines)


def load_banner(load: dict[str, Any], max_reasons: int | None = None) -> str:
    """A prominent Markdown warning when the machine was loaded, else one line saying it was quiet.

    ``max_reasons`` lists only that many of the observations (the rest are counted).
    """
    if load["loaded"]:
        shown = load["reasons"] if max_reasons is None else load["reasons"][:max_reasons]
        reasons = "; ".join(shown)
        if len(shown) < len(load["reasons"]):
            reasons += f"; {len(load['reasons']) - len(shown)} more in results.md"
        return (
            "> **WARNING: the machine was loaded while these benchmarks ran** (" + reasons + "). "
            "Absolute times are inflated and noisy; the interleaved speedups are steadier but rows "
            "marked unstable are not reliable. Re-run on an idle machine before quoting numbers."
        )
    return "Machine quiet during the run (calibration kernel within 25% of its best before and after)."


def _header(meta: dict[str, Any]) -> str:
    ceil = meta.get("ceilings")
    ceilings = (
        f"; large-buffer ceilings (reference only): copy {ceil['copy_bytes_per_s'] / 1e9:.1f} GB/s, "
        f"fp32 matmul {ceil['matmul_flops_per_s'] / 1e12:.2f} TFLOP/s"
        if ceil else ""
    )
    suites = meta.get("suites") or {}
    stopped = ""
    if suites.get("interrupted") or suites.get("not_run"):
        missing = ([suites["interrupted"]] if suites.get("interrupted") else []) + suites.get("not_run", [])
        stopped = (f"> **INTERRUPTED: only {', '.join(suites['finished'])} finished**; "
                   f"not in this report: {', '.join(missing)}.\n\n")
    quick = "; --quick: one size per op, fewer rounds" if meta.get("quick") else ""
    return (
        f"# bissl_fast benchmarks\n\n{stopped}{load_banner(meta['machine_load'])}\n\n"
        f"device: {meta['device']}; torch {meta['torch']}; python {meta.get('python', '?')}; "
        f"intra-op threads {meta['threads']} (rows say when a suite uses fewer); timer {meta.get('timer', '?')}"
        f"{quick}{ceilings}; {short_form(meta.get('provenance'))}\n\n"
        "vs reference: median over rounds of (reference time / fast time), the two timed alternately in "
        "one process; ratio p20-p80: the band of those per-round ratios (rows whose band is wider than "
        "10% of the median after the round/time cap are marked unstable). % of floor: floor / median, the "
        "floor measured in this run at the op's size (floor column: what it times).\n\n"
    )


def _display_name(row: dict[str, Any]) -> str:
    names = {"nt_xent": "NT-Xent", "byol": "BYOL", "cg_vector_work": "CG vector work",
             "upper_stage_simclr": "upper stage, SimCLR", "upper_stage_byol": "upper stage, BYOL",
             "batch_norm": "BatchNorm", "batch_norm_resnet": "HVP through SmallResNet, BatchNorm"}
    return names.get(row["op"], row["op"])


def render_readme_block(results: dict[str, Any], source: str) -> str:
    """The README's CPU table from a ``results.json`` (every fast provider vs its reference).

    ``source`` is the results file's path as written in the start marker, so a test can re-render
    the block from the committed file and compare.
    """
    rows = results["results"]
    refs = {(r["op"], r["mode"], _fmt_size(r["size"]), r["dtype"]): r for r in rows if r["provider"] == "reference"}
    meta = results
    lines = [
        f"{README_START} source={source} -->",
        f"<!-- generated by bissl_fast.bench.report.update_readme from {source}; do not edit by hand -->",
        "",
        load_banner(meta["machine_load"], max_reasons=3),
        "",
        *([note, ""] if (note := older_code_note(meta.get("provenance"))) else []),
        f"Produced by: {short_form(meta.get('provenance'))}.",
        "",
        f"{meta['device']}, torch {meta['torch']}, intra-op threads {meta['threads']} unless the row says "
        "otherwise. Reference and fast path are timed alternately in one process: their median times, and the "
        "median of the per-round (reference / fast) ratios with its p20-p80 band; peak = extra memory allocated "
        "during the call.",
        "",
        "| op | size | mode | threads | reference | fast path | speedup (p20-p80) | peak memory ref → fast |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["provider"] == "reference":
            continue
        ref = refs.get((r["op"], r["mode"], _fmt_size(r["size"]), r["dtype"]))
        if ref is None or r.get("ratio") is None:
            continue
        ratio = r["ratio"]
        speedup = f"{ratio['median']:.2f}x ({ratio['p20']:.2f}-{ratio['p80']:.2f})"
        if not ratio["stable"]:
            speedup += " unstable"
        mem = "-"
        if ref["peak_memory_bytes"] is not None and r["peak_memory_bytes"] is not None:
            mem = f"{ref['peak_memory_bytes'] / 1e6:.1f} → {r['peak_memory_bytes'] / 1e6:.1f} MB"
        lines.append(
            f"| {_display_name(r)}, `{r['provider']}` | {_fmt_size(r['size'])} | {r['mode']} | {r.get('threads') or '-'} | "
            f"{_fmt_ms(ratio['reference_median_s'])} | {_fmt_ms(ratio['fast_median_s'])} | {speedup} | {mem} |"
        )
    lines.append(README_END)
    return "\n".join(lines)


def _fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    if ms >= 1000:
        return f"{ms / 1e3:.2f} s"
    return f"{ms:.3g} ms" if ms < 100 else f"{ms:.0f} ms"


_BLOCK = re.compile(re.escape(README_START) + r" source=(\S+) -->.*?" + re.escape(README_END), re.S)


def readme_block_source(readme_text: str) -> tuple[str, str]:
    """``(block, source)`` of the generated CPU table in a README's text."""
    match = _BLOCK.search(readme_text)
    if match is None:
        raise BenchError(f"no '{README_START} source=... -->' ... '{README_END}' block in the README")
    return match.group(0), match.group(1)


def update_readme(readme: Path, results_path: Path) -> None:
    """Rewrites the README's generated CPU table from ``results_path`` (stored relative to the README)."""
    readme = Path(readme)
    text = readme.read_text()
    block, _ = readme_block_source(text)
    try:
        source = Path(results_path).resolve().relative_to(readme.resolve().parent).as_posix()
    except ValueError:
        raise BenchError(f"{results_path} is not inside the README's folder {readme.parent}") from None
    new_block = render_readme_block(json.loads(Path(results_path).read_text()), source)
    readme.write_text(text.replace(block, new_block))


def _size_sort_key(size: dict[str, Any]) -> tuple:
    """Numbers in numeric order (k=1, k=8, k=32, not k=1, k=32, k=8), names after them in text order."""
    return tuple((0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v))
                 for v in size.values())


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
        order = {_fmt_size(r["size"]): _size_sort_key(r["size"]) for r in group}
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
    max_time: float | None = None,
    threads: int = 1,
    update_readme_path: Path | None = None,
    quick: bool = False,
) -> int:
    """Run the suites (pytest-benchmark), then print and write the report; returns the worst pytest exit code.

    ``select``: comma-separated names, the suites whose name contains one. ``quick``: one size per op,
    fewer rounds, no per-layer profile. ``max_time``: seconds of timing per row (default 1, quick 0.25).
    Ctrl-C writes the report of the suites that finished and returns 130. Raises :class:`BenchError`
    (before running anything) when a requirement is missing.
    """
    suites = select_suites(check_requirements(Path(suite_dir), device), select)
    if threads < 1:
        raise BenchError(f"--threads must be >= 1, got {threads}")
    if update_readme_path is not None:
        if not Path(update_readme_path).is_file():
            raise BenchError(f"--update-readme: {update_readme_path} does not exist")
        readme_block_source(Path(update_readme_path).read_text())  # fail now, not after the run
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.set_num_threads(threads)
    out_dir = Path(out_dir).resolve()  # pytest runs inside the suite folder
    env = dict(os.environ, BISSL_BENCH_THREADS=str(threads), BISSL_BENCH_DEVICE=dev.type)
    max_time = max_time if max_time is not None else (QUICK_MAX_TIME_S if quick else 1.0)
    options = [f"--benchmark-max-time={max_time}"]
    if quick:
        env["BISSL_BENCH_SIZES"] = "quick"
        options += QUICK_PYTEST_OPTIONS

    produced_by = provenance(BENCHMARK_SUITE_PATTERNS)  # the code as the run starts
    before = calibrate(dev)
    runs = run_suites(suites, env, options)
    stopped = runs.interrupted is not None or bool(runs.not_run)
    if stopped and not runs.finished:
        print("interrupted before any suite finished: nothing written", file=sys.stderr)
        return _INTERRUPTED
    profiles = None
    if "bench_solver" in runs.finished and not quick and not stopped:
        print("profiling one HVP and one upper stage per CPU model (1 thread)", flush=True)
        from .profile_hvp import format_profiles, run_profiles

        profiles = run_profiles(device=dev)
    after = calibrate(dev)

    load = machine_load(before, after)
    for name, suite_load in runs.machine_loads.items():
        if suite_load and suite_load["loaded"]:
            load["loaded"] = True
            load["reasons"] += [f"{name}: {reason}" for reason in suite_load["reasons"]]
    ceilings = measure_ceilings(dev)
    rows = summarize(runs.merged, ceilings)
    if not rows:
        print("no benchmark results were written", file=sys.stderr)
        return _INTERRUPTED if stopped else (max(runs.exit_codes) or 1)
    meta = {
        "provenance": produced_by,
        "device": _device_label(dev), "torch": torch.__version__, "python": runs.merged.get("machine_info", {}).get("python_version", "?"),
        "threads": threads, "timer": _timer_name(runs.merged), "quick": quick,
        "suites": {"finished": runs.finished, "interrupted": runs.interrupted, "not_run": runs.not_run},
        "machine_load": load, "suite_machine_load": runs.machine_loads, "ceilings": ceilings,
    }
    text = _header(meta) + markdown_table(rows) + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)  # only now: an interrupted run with nothing to show leaves none
    if profiles is not None:
        text += "\n## Upper stage by phase and layer type\n\n" + format_profiles(profiles) + "\n"
        (out_dir / "upper_stage_profile.json").write_text(json.dumps(profiles, indent=2) + "\n")
    (out_dir / "results.md").write_text(text)
    (out_dir / "results.json").write_text(json.dumps({**meta, "results": rows}, indent=2) + "\n")
    (out_dir / "pytest_benchmark.json").write_text(json.dumps(runs.merged, indent=2) + "\n")
    plots = plot(rows, out_dir)
    print(text)
    print(f"wrote {out_dir / 'results.json'}, {out_dir / 'results.md'}, pytest_benchmark.json and {len(plots)} plots")
    if stopped:
        print(f"interrupted: the report holds the suites that finished ({', '.join(runs.finished)})",
              file=sys.stderr)
        if update_readme_path is not None:
            print(f"{update_readme_path} not updated (an interrupted run is not a complete result)", file=sys.stderr)
        return _INTERRUPTED
    if update_readme_path is not None:
        update_readme(update_readme_path, out_dir / "results.json")
        print(f"updated the benchmark table in {update_readme_path}")
    return max(runs.exit_codes)


def _timer_name(merged: dict[str, Any]) -> str:
    """The clock pytest-benchmark timed the rows with (the suites' conftest picks it)."""
    timers = {b.get("options", {}).get("timer") for b in merged["benchmarks"]}
    return ", ".join(sorted(t for t in timers if t)) or "?"


def _device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"
