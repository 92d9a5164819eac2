"""The regression checks' arithmetic: speedup regressions against a saved run, and false-alarm rates.

``speedup_regressions`` is what ``--speedup-compare-fail=PCT%`` (the suites' conftest) tests: a fast
path's interleaved speedup over its reference, against the same row of the run that
``--benchmark-compare`` loads.

The rest measures how often a check fails on unchanged code. Save several runs of the same code
with pytest-benchmark (``--benchmark-autosave``, see README "Benchmarks"), then::

    python -m bissl_fast.bench.regression benchmarks/.benchmarks/Linux-CPython-3.11-64bit

Every ordered pair of saved runs is one (baseline, compare) pair. For each statistic a check can
use -- pytest-benchmark's ``min`` and ``median`` (what ``--benchmark-compare-fail=min:T%`` /
``median:T%`` test) and the interleaved ``speedup`` over the reference (what
``--speedup-compare-fail=T%`` tests) -- a pair's score is the largest change of any row in the
slow direction, and the pair is a false alarm at threshold T when that score exceeds T. The rows
compared are those present in both runs; the reference rows have no speedup.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATISTICS = ("min", "median", "speedup")
DEFAULT_THRESHOLDS = (10.0, 15.0, 20.0, 25.0, 30.0, 40.0, 50.0)


@dataclass(frozen=True)
class SpeedupCheck:
    """The outcome of ``--speedup-compare-fail``: how many rows were compared, and the regressed ones."""

    compared: int
    regressions: list[str]


def speedup_regressions(
    current: dict[str, dict[str, Any]], compared: list[dict[str, Any]], threshold_pct: float
) -> SpeedupCheck:
    """Compares each row's speedup with the same row of the compared runs; a row whose speedup fell by more
    than ``threshold_pct`` percent is a regression (one line naming it).

    ``current``: full row name -> ``{"provider": str, "speedup": float | None}``; ``compared``:
    pytest-benchmark saved runs, whose rows' ``extra_info`` holds ``speedup_vs_reference``. The
    reference rows (1.0 by definition) and rows missing on either side are not compared.
    """
    if not 0 < threshold_pct < 100:
        raise ValueError(f"the speedup threshold must be between 0% and 100%, got {threshold_pct:g}%")
    lines = []
    count = 0
    for run in compared:
        before = {b["fullname"]: b.get("extra_info", {}).get("speedup_vs_reference") for b in run["benchmarks"]}
        for name, row in current.items():
            old, new = before.get(name), row["speedup"]
            if row["provider"] == "reference" or not old or new is None:
                continue
            count += 1
            drop = slow_change_pct("speedup", old, new)
            if drop > threshold_pct:
                lines.append(f"{name} - speedup over the reference {old:.2f}x -> {new:.2f}x "
                             f"({-drop:+.0f}%, more than {threshold_pct:g}% down)")
    return SpeedupCheck(count, lines)


def load_runs(folder: Path) -> list[dict[str, Any]]:
    """The pytest-benchmark runs saved in ``folder`` (``NNNN_*.json``), oldest first."""
    paths = sorted(Path(folder).glob("*.json"))
    if len(paths) < 2:
        raise ValueError(f"need at least 2 saved runs in {folder}, found {len(paths)}")
    return [json.loads(p.read_text()) for p in paths]


def row_values(run: dict[str, Any], statistic: str) -> dict[str, float]:
    """``statistic`` of every row of a saved run, by the row's full name."""
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {', '.join(STATISTICS)}, got {statistic!r}")
    values = {}
    for bench in run["benchmarks"]:
        if statistic == "speedup":
            info = bench.get("extra_info", {})
            if info.get("provider") != "reference" and info.get("speedup_vs_reference"):
                values[bench["fullname"]] = info["speedup_vs_reference"]
        else:
            values[bench["fullname"]] = bench["stats"][statistic]
    return values


def slow_change_pct(statistic: str, baseline: float, current: float) -> float:
    """How much slower ``current`` is than ``baseline``, in percent (negative: faster).

    A time that doubles is +100%; a speedup that halves is +50% (the fast path lost half its lead).
    """
    if statistic == "speedup":
        return 100.0 * (1.0 - current / baseline)
    return 100.0 * (current / baseline - 1.0)


@dataclass(frozen=True)
class PairScore:
    """The worst row of one (baseline, compare) pair of runs."""

    baseline: int
    compare: int
    change_pct: float
    row: str


def pair_scores(runs: list[dict[str, Any]], statistic: str) -> list[PairScore]:
    """For every ordered pair of distinct runs, the row that got slowest by ``statistic``."""
    values = [row_values(run, statistic) for run in runs]
    scores = []
    for i, base in enumerate(values):
        for j, current in enumerate(values):
            shared = sorted(set(base) & set(current))
            if i == j or not shared:
                continue
            change, row = max((slow_change_pct(statistic, base[r], current[r]), r) for r in shared)
            scores.append(PairScore(i, j, change, row))
    return scores


def false_alarm_rate(scores: list[PairScore], threshold_pct: float) -> float:
    """Fraction of pairs whose worst row changed by more than ``threshold_pct``."""
    return sum(s.change_pct > threshold_pct for s in scores) / len(scores)


def report(runs: list[dict[str, Any]], thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS) -> str:
    """Markdown: per statistic, the worst change over all pairs and the false-alarm rate per threshold."""
    rows = len(runs[0]["benchmarks"])
    lines = [
        f"{len(runs)} runs ({len(runs) * (len(runs) - 1)} baseline/compare pairs, {rows} rows in the first run)",
        "",
        "| statistic | worst row change, median pair | worst row change, worst pair | "
        + " | ".join(f"false alarms at {t:g}%" for t in thresholds) + " |",
        "|---|---:|---:|" + "---:|" * len(thresholds),
    ]
    worst_rows = []
    for statistic in STATISTICS:
        scores = pair_scores(runs, statistic)
        if not scores:
            continue
        ordered = sorted(scores, key=lambda s: s.change_pct)
        median, worst = ordered[len(ordered) // 2], ordered[-1]
        rates = " | ".join(
            f"{false_alarm_rate(scores, t):.0%} ({sum(s.change_pct > t for s in scores)}/{len(scores)})" for t in thresholds
        )
        lines.append(f"| {statistic} | {median.change_pct:+.1f}% | {worst.change_pct:+.1f}% | {rates} |")
        worst_rows.append(f"- {statistic}: worst pair (run {worst.baseline} -> run {worst.compare}): {worst.row}")
    return "\n".join(lines + ["", "Worst rows:", *worst_rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bissl_fast.bench.regression", description="False-alarm rates of the regression checks, from repeated saved runs of unchanged code.")
    parser.add_argument("folder", type=Path, help="a pytest-benchmark storage folder holding the saved runs")
    parser.add_argument("--thresholds", default=",".join(f"{t:g}" for t in DEFAULT_THRESHOLDS),
                        help="comma-separated percentages (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        thresholds = tuple(float(t) for t in args.thresholds.split(","))
        print(report(load_runs(args.folder), thresholds))
    except ValueError as exc:
        print(f"python -m bissl_fast.bench.regression: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
