"""Statistics, text table, Markdown block and figure of the demo's replicated experiment.

:func:`summarize` turns the per-replicate records of :func:`bissl_fast.experiments.demo_experiment.run_replicate`
into the summary the demo writes as ``summary.json``; everything else here renders a summary:
:func:`format_text` (the printed table), :func:`render_markdown` (the README block between
``<!-- demo:start -->`` and ``<!-- demo:end -->``, so the README always shows what the committed
JSON says), :func:`write_figure` (``summary.png``, needs matplotlib).

``python -m bissl_fast.experiments.demo_report SUMMARY_JSON --readme README.md [--figure PNG]`` regenerates the
README block (and the figure) from a summary without re-running anything.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any, Sequence

from .._provenance import older_code_note, short_form
from .demo_experiment import ARMS
from .stats import (
    PairedComparison,
    compare_paired,
    conclusion_sentence,
    min_attainable_pvalue,
)

README_START = "<!-- demo:start -->"
README_END = "<!-- demo:end -->"
# (label, treatment arm, control arm); the first is the primary comparison.
COMPARISONS: tuple[tuple[str, str, str], ...] = (("B-C", "B", "C"), ("B-A", "B", "A"), ("C-A", "C", "A"))
SUBJECT = "BiSSL's lower backbone (B)"
REFERENCE = "compute-matched continued pretext training (C)"
ALPHA = 0.05
SHORT_NAMES = {"A": "pretext", "C": "continued pretext", "B": "BiSSL lower", "D": "BiSSL upper"}


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy per arm (``mean``/``sd``/``min``/``max``/``values``), the paired comparisons and the conclusion."""
    if not records:
        raise ValueError("summarize needs at least one replicate record")
    accuracy = {}
    for arm in ARMS:
        values = [r["test_acc"][arm] for r in records]
        accuracy[arm] = {
            "mean": statistics.fmean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values),
            "max": max(values),
            "values": values,
        }
    comparisons = {
        label: compare_paired(accuracy[a]["values"], accuracy[b]["values"]).to_dict() for label, a, b in COMPARISONS
    }
    primary = PairedComparison.from_dict(comparisons[COMPARISONS[0][0]])
    return {
        "accuracy": accuracy,
        "comparisons": comparisons,
        "primary": COMPARISONS[0][0],
        "alpha": ALPHA,
        "conclusion": conclusion_sentence(primary, SUBJECT, REFERENCE, COMPARISONS[0][0], ALPHA),
    }


def _pct(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{100 * value:.{digits}f}"


def _pp(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.1f}"


def _interval(c: dict[str, Any]) -> str:
    return "n/a" if c["ci_low"] is None else f"[{_pp(c['ci_low'])}, {_pp(c['ci_high'])}]"


def _seed_range(seeds: Sequence[int]) -> str:
    if list(seeds) == list(range(seeds[0], seeds[0] + len(seeds))) and len(seeds) > 1:
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(str(s) for s in seeds)


def _setup_line(summary: dict[str, Any]) -> str:
    cfg, ds = summary["config"], summary["dataset"]
    sizes = ds["per_replicate"]
    return (
        f"{ds['name']} {'x'.join(str(d) for d in ds['shape'][1:])} ({ds['classes']} classes), pretext={cfg['pretext']}, "
        f"{len(summary['replicates'])} replicates (seeds {_seed_range(summary['replicate_seeds'])}); per replicate "
        f"{sizes['labeled']} labeled / {sizes['val']} validation / {sizes['test']} test images and "
        f"{sizes['unlabeled']} unlabeled (test and validation excluded); pretraining {cfg['pretrain_epochs']} epochs, "
        f"BiSSL {cfg['bissl_stages']} stages x ({cfg['lower_iters']} lower + {cfg['upper_iters']} upper steps, "
        f"lam {summary['replicates'][0]['bissl_config']['lam']:g}), "
        f"control {summary['replicates'][0]['lower_steps']['C']} continued pretext steps, fine-tuning "
        f"{cfg['finetune_epochs']} epochs"
    )


def _time_line(summary: dict[str, Any]) -> str:
    t = summary["times"]
    load = t["load_average_start"]
    load_text = f", 1-min load average {load:.1f} at start" if load is not None else ""
    return (
        f"wall {t['wall_s']:.0f} s with {t['workers']} worker process{'es' if t['workers'] != 1 else ''} of "
        f"{t['threads']} thread{'s' if t['threads'] != 1 else ''} on {summary['environment']['cpu_count']} CPUs"
        f"{load_text} (a shared machine: wall time measured under load); CPU time {t['cpu_s']:.0f} s: pretraining "
        f"{t['pretrain_cpu_s']:.0f} s, BiSSL {t['bissl_cpu_s']:.0f} s, control C {t['control_cpu_s']:.0f} s, "
        f"fine-tuning {t['finetune_cpu_s']:.0f} s"
    )


def format_text(summary: dict[str, Any]) -> str:
    """The printed report: set-up, accuracy per arm, paired differences, conclusion, times."""
    lines = [f"BiSSL demo: {_setup_line(summary)}", "", f"{'arm':<4}{'fine-tuned backbone':<40}{'test acc (%) mean +- sd':>24}{'min - max':>14}"]
    for arm, name in ARMS.items():
        a = summary["accuracy"][arm]
        lines.append(f"{arm:<4}{name:<40}{_pct(a['mean']):>15} +- {_pct(a['sd']):<5}{_pct(a['min']):>8} - {_pct(a['max'])}")
    lines += ["", f"{'paired difference':<20}{'mean (pp)':>10}{'95% t-interval':>18}{'p (sign-flip)':>15}{'W/T/L':>9}"]
    for label, c in summary["comparisons"].items():
        tag = f"{label} (primary)" if label == summary["primary"] else label
        lines.append(
            f"{tag:<20}{_pp(c['mean']):>10}{_interval(c):>18}{c['p_value']:>15.2g}{c['wins']:>5}/{c['ties']}/{c['losses']}"
        )
    n = len(summary["replicates"])
    lines += [
        "",
        f"p: two-sided sign-flip permutation test ({summary['comparisons'][summary['primary']]['p_method']}; smallest "
        f"attainable with {n} replicates: {min_attainable_pvalue(n):.2g}); interval: Student t on the paired differences.",
        f"Validation split: {summary['validation_use']}",
        f"Conclusion: {summary['conclusion']}",
        _time_line(summary),
        f"Produced by: {short_form(summary.get('provenance'))}",
    ]
    return "\n".join(lines)


def render_markdown(summary: dict[str, Any]) -> str:
    """The README block (without the markers) for ``summary``: a function of the summary and of whether today's
    code is the code that produced it (:func:`bissl_fast._provenance.older_code_note`)."""
    n = len(summary["replicates"])
    note = older_code_note(summary.get("provenance"))
    lines = [*([note, ""] if note else []),
        f"Set-up: {_setup_line(summary)}. Every arm is fine-tuned with a fresh linear head and the replicate's "
        f"fine-tuning seed; the test images are seen by no stage.",
        "",
        "| arm | fine-tuned backbone | test accuracy (%), mean ± sd | min – max |",
        "|---|---|---:|---:|",
    ]
    for arm, name in ARMS.items():
        a = summary["accuracy"][arm]
        lines.append(f"| {arm} | {name} | {_pct(a['mean'])} ± {_pct(a['sd'])} | {_pct(a['min'])} – {_pct(a['max'])} |")
    lines += [
        "",
        "| paired difference | mean (pp) | 95% t-interval (pp) | sign-flip p (two-sided) | wins/ties/losses |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, c in summary["comparisons"].items():
        tag = f"**{label}** (primary)" if label == summary["primary"] else label
        lines.append(f"| {tag} | {_pp(c['mean'])} | {_interval(c)} | {c['p_value']:.2g} | {c['wins']}/{c['ties']}/{c['losses']} |")
    lines += [
        "",
        f"p-values: {summary['comparisons'][summary['primary']]['p_method']} sign-flip permutation test over the {n} "
        f"paired differences (smallest attainable exactly: {min_attainable_pvalue(n):.2g}). Validation split: {summary['validation_use']} Time: {_time_line(summary)}.",
        "",
        f"**Conclusion:** {summary['conclusion']}",
        "",
        f"Produced by: {short_form(summary.get('provenance'))}.",
    ]
    return "\n".join(lines)


def readme_block(readme_text: str) -> str:
    """The text between the demo markers of ``readme_text`` (without the marker lines)."""
    start, end = readme_text.find(README_START), readme_text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"the README has no {README_START} ... {README_END} block")
    return readme_text[start + len(README_START) : end].strip("\n")


def update_readme(path: str | Path, summary: dict[str, Any]) -> None:
    """Replace the demo block of the README at ``path`` with :func:`render_markdown` of ``summary``."""
    path = Path(path)
    text = path.read_text()
    readme_block(text)  # raises when the markers are missing
    start, end = text.find(README_START), text.find(README_END)
    path.write_text(text[: start + len(README_START)] + "\n" + render_markdown(summary) + "\n" + text[end:])


def _mean_curve(curves: Sequence[Sequence[float | None]]) -> list[float]:
    curves = [c for c in curves if c]
    if not curves:
        return []
    length = min(len(c) for c in curves)
    return [statistics.fmean(float(c[i]) for c in curves) for i in range(length)]


def write_figure(summary: dict[str, Any], path: str | Path) -> None:
    """``summary.png``: paired differences, accuracy per arm, and the training curves (mean over replicates)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reps = summary["replicates"]
    fig, axes = plt.subplots(2, 3, figsize=(17, 9))

    ax = axes[0, 0]
    for i, (label, c) in enumerate(summary["comparisons"].items()):
        diffs = [100 * d for d in c["differences"]]
        offsets = [i + 0.12 * ((k % 5) - 2) / 2 for k in range(len(diffs))]
        ax.scatter(offsets, diffs, color="tab:blue", alpha=0.6, label="one replicate" if i == 0 else None)
        if c["ci_low"] is not None:
            ax.errorbar(
                [i + 0.3], [100 * c["mean"]],
                yerr=[[100 * (c["mean"] - c["ci_low"])], [100 * (c["ci_high"] - c["mean"])]],
                fmt="D", color="black", capsize=6, label="mean, 95% t-interval" if i == 0 else None,
            )
        else:
            ax.plot([i + 0.3], [100 * c["mean"]], "D", color="black", label="mean" if i == 0 else None)
    ax.axhline(0.0, color="gray", lw=1, ls="--")
    ax.set_xticks(range(len(summary["comparisons"])))
    ax.set_xticklabels([f"{k}\np = {c['p_value']:.2g}" for k, c in summary["comparisons"].items()])
    ax.set_xlabel("paired comparison (same replicate)")
    ax.set_ylabel("difference in test accuracy (pp)")
    ax.set_title("paired differences per replicate")
    ax.legend(fontsize=8)

    ax = axes[0, 1]
    arms = list(ARMS)
    values = [[100 * v for v in summary["accuracy"][a]["values"]] for a in arms]
    ax.boxplot(values, positions=range(len(arms)), widths=0.5, showfliers=False)
    for k in range(len(reps)):
        ax.plot(range(len(arms)), [v[k] for v in values], color="tab:blue", alpha=0.35, marker="o", ms=4,
                label="one replicate (lines pair its arms)" if k == 0 else None)
    ax.set_xticks(range(len(arms)))
    ax.set_xticklabels([f"{a}\n{SHORT_NAMES[a]}" for a in arms])
    ax.set_xlabel("arm (backbone fine-tuned)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("accuracy per arm")
    ax.legend(fontsize=8)

    ax = axes[0, 2]
    pre = _mean_curve([r["curves"]["pretrain_loss"] for r in reps])
    ax.plot(range(1, len(pre) + 1), pre, marker="o", ms=3, label="pretraining (shared by all arms)")
    ax.set_xlabel("pretraining epoch")
    ax.set_ylabel(f"{summary['config']['pretext']} loss (mean over replicates)")
    ax.set_title("pretraining")
    ax.legend(fontsize=8)

    ax = axes[1, 0]
    lower = _mean_curve([r["curves"]["bissl_lower_loss"] for r in reps])
    control = _mean_curve([r["curves"]["control_loss"] for r in reps])
    stages = range(1, len(lower) + 1)
    ax.plot(stages, lower, marker="s", label="B: BiSSL lower level (pretext part of its loss)")
    ax.plot(range(1, len(control) + 1), control, marker="^", label="C: continued pretext training")
    ax.set_xlabel(f"stage ({summary['config']['lower_iters']} pretext steps each, same batches)")
    ax.set_ylabel(f"{summary['config']['pretext']} loss (mean over replicates)")
    ax.set_title("pretext loss after pretraining: B vs C")
    ax.legend(fontsize=8)

    ax = axes[1, 1]
    upper = _mean_curve([r["curves"]["bissl_upper_loss"] for r in reps])
    ax.plot(range(1, len(upper) + 1), upper, marker="^", color="tab:green", label="BiSSL upper level (D's backbone)")
    ax.set_xlabel("BiSSL stage")
    ax.set_ylabel("downstream cross-entropy (mean over replicates)")
    ax.set_title("BiSSL upper level")
    ax.legend(fontsize=8)

    ax = axes[1, 2]
    for arm in arms:
        curve = _mean_curve([r["curves"]["finetune_loss"][arm] for r in reps])
        ax.plot(range(1, len(curve) + 1), curve, label=f"{arm}: {SHORT_NAMES[arm]}")
    ax.set_xlabel("fine-tuning epoch")
    ax.set_ylabel("train cross-entropy (mean over replicates)")
    ax.set_title("fine-tuning (fresh head, same seed per replicate)")
    ax.legend(fontsize=8)

    fig.suptitle(summary["conclusion"], fontsize=9, wrap=True)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bissl_fast.experiments.demo_report SUMMARY_JSON [--readme README.md] [--figure PNG]``."""
    p = argparse.ArgumentParser(prog="python -m bissl_fast.experiments.demo_report", description=main.__doc__)
    p.add_argument("summary", type=Path, help="summary.json written by bissl-fast demo")
    p.add_argument("--readme", type=Path, default=None, help="README whose demo block to regenerate")
    p.add_argument("--figure", type=Path, default=None, help="write the figure to this PNG")
    args = p.parse_args(argv)
    summary = json.loads(args.summary.read_text())
    if args.readme is not None:
        update_readme(args.readme, summary)
    if args.figure is not None:
        write_figure(summary, args.figure)
    print(format_text(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
