"""Statistics, text table, Markdown block and figure of the demo's replicated experiment.

:func:`summarize` turns the per-replicate records of :func:`bissl_fast.experiments.demo_experiment.run_replicate`
into the summary the demo writes as ``summary.json``; everything else here renders a summary:
:func:`format_text` (the printed table), :func:`render_markdown` (the README block between
``<!-- demo:start -->`` and ``<!-- demo:end -->``, or for the experiment with the MINRES arm between
``<!-- demo-minres:start -->`` and ``<!-- demo-minres:end -->``, so the README always shows what the
committed JSON says), :func:`write_figure` (``summary.png``, needs matplotlib).

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
from .demo_experiment import ARMS, MINRES_ARM
from .stats import (
    PairedComparison,
    compare_paired,
    conclusion_sentence,
    min_attainable_pvalue,
)

README_START = "<!-- demo:start -->"
README_END = "<!-- demo:end -->"
README_MINRES_START = "<!-- demo-minres:start -->"
README_MINRES_END = "<!-- demo-minres:end -->"
# (label, treatment arm, control arm); the first is the primary comparison.
COMPARISONS: tuple[tuple[str, str, str], ...] = (("B-C", "B", "C"), ("B-A", "B", "A"), ("C-A", "C", "A"))
SUBJECT = "BiSSL's lower backbone (B)"
REFERENCE = "compute-matched continued pretext training (C)"
# With the MINRES arm the question (fixed before the run) is whether the accurate solve changes
# the fine-tuned accuracy of BiSSL's lower backbone.
MINRES_COMPARISONS: tuple[tuple[str, str, str], ...] = (("M-B", "M", "B"), ("B-C", "B", "C"), ("M-C", "M", "C"))
MINRES_SUBJECT = "BiSSL with the MINRES solve (M)"
MINRES_REFERENCE = "BiSSL with the paper's layerwise CG solve (B)"
ALPHA = 0.05
SHORT_NAMES = {"A": "pretext", "C": "continued pretext", "B": "BiSSL lower", "D": "BiSSL upper", "M": "BiSSL lower, MINRES"}


def has_minres_arm(summary_or_record: dict[str, Any]) -> bool:
    """Whether a summary (or replicate record) comes from the experiment with the MINRES arm."""
    key = "accuracy" if "accuracy" in summary_or_record else "test_acc"
    return "M" in summary_or_record[key]


def _markers(minres: bool) -> tuple[str, str]:
    return (README_MINRES_START, README_MINRES_END) if minres else (README_START, README_END)


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy per arm (``mean``/``sd``/``min``/``max``/``values``), the paired comparisons and the conclusion.

    With the MINRES arm also the per-stage solve quality of arms B and M, averaged over replicates.
    """
    if not records:
        raise ValueError("summarize needs at least one replicate record")
    minres = has_minres_arm(records[0])
    arms = {**ARMS, **(MINRES_ARM if minres else {})}
    comparisons_spec = MINRES_COMPARISONS if minres else COMPARISONS
    accuracy = {}
    for arm in arms:
        values = [r["test_acc"][arm] for r in records]
        accuracy[arm] = {
            "mean": statistics.fmean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values),
            "max": max(values),
            "values": values,
        }
    comparisons = {
        label: compare_paired(accuracy[a]["values"], accuracy[b]["values"]).to_dict() for label, a, b in comparisons_spec
    }
    label = comparisons_spec[0][0]
    primary = PairedComparison.from_dict(comparisons[label])
    subject, reference = (MINRES_SUBJECT, MINRES_REFERENCE) if minres else (SUBJECT, REFERENCE)
    summary = {
        "accuracy": accuracy,
        "comparisons": comparisons,
        "primary": label,
        "alpha": ALPHA,
        "conclusion": conclusion_sentence(primary, subject, reference, label, ALPHA),
    }
    if minres:
        summary["solve_quality"] = _solve_quality(records)
    return summary


def _stage_means(rows: Sequence[Sequence[float | None]]) -> list[float | None]:
    """Per stage, the mean over replicates of the entries that are not ``None``."""
    out = []
    for column in zip(*rows):
        kept = [v for v in column if v is not None]
        out.append(statistics.fmean(kept) if kept else None)
    return out


def _solve_quality(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per arm (B, M) and stage: mean solve and no-solve residuals over replicates, solves worse than no solve
    (out of all), systems found indefinite (out of all replicates), Hessian products per stage."""
    out = {}
    for arm in ("B", "M"):
        per = [r["solve_quality"][arm] for r in records]
        out[arm] = {
            "method": per[0]["method"],
            "residual": _stage_means([p["residual"] for p in per]),
            "no_solve": _stage_means([p["no_solve"] for p in per]),
            "worse": [sum(col) for col in zip(*[p["worse"] for p in per])],
            "solves": [sum(col) for col in zip(*[p["solves"] for p in per])],
            "indefinite": [sum(bool(v) for v in col) for col in zip(*[p["indefinite"] for p in per])],
            "hessian_products": per[0]["hessian_products"],
        }
    return out


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
    bissl = summary["replicates"][0]["bissl_config"]
    minres = (
        f"; arm M repeats B's BiSSL run with the implicit gradient solved by MINRES, {bissl['cg_iters']} Hessian "
        f"products per solve like B's layerwise CG (B spends one more per solve measuring its residual, which does "
        f"not change its gradient)"
        if has_minres_arm(summary) else ""
    )
    return (
        f"{ds['name']} {'x'.join(str(d) for d in ds['shape'][1:])} ({ds['classes']} classes), pretext={cfg['pretext']}, "
        f"{len(summary['replicates'])} replicates (seeds {_seed_range(summary['replicate_seeds'])}); per replicate "
        f"{sizes['labeled']} labeled / {sizes['val']} validation / {sizes['test']} test images and "
        f"{sizes['unlabeled']} unlabeled (test and validation excluded); pretraining {cfg['pretrain_epochs']} epochs, "
        f"BiSSL {cfg['bissl_stages']} stages x ({cfg['lower_iters']} lower + {cfg['upper_iters']} upper steps, "
        f"lam {bissl['lam']:g}), "
        f"control {summary['replicates'][0]['lower_steps']['C']} continued pretext steps, fine-tuning "
        f"{cfg['finetune_epochs']} epochs{minres}"
    )


def _time_line(summary: dict[str, Any]) -> str:
    t = summary["times"]
    load = t["load_average_start"]
    load_text = f", 1-min load average {load:.1f} at start" if load is not None else ""
    return (
        f"wall {t['wall_s']:.0f} s with {t['workers']} worker process{'es' if t['workers'] != 1 else ''} of "
        f"{t['threads']} thread{'s' if t['threads'] != 1 else ''} on {summary['environment']['cpu_count']} CPUs"
        f"{load_text} (a shared machine: wall time measured under load); CPU time {t['cpu_s']:.0f} s: pretraining "
        f"{t['pretrain_cpu_s']:.0f} s, BiSSL {t['bissl_cpu_s']:.0f} s, "
        + (f"BiSSL with MINRES {t['minres_cpu_s']:.0f} s, " if "minres_cpu_s" in t else "")
        + f"control C {t['control_cpu_s']:.0f} s, fine-tuning {t['finetune_cpu_s']:.0f} s"
    )


def format_text(summary: dict[str, Any]) -> str:
    """The printed report: set-up, accuracy per arm, paired differences, conclusion, times."""
    lines = [f"BiSSL demo: {_setup_line(summary)}", "", f"{'arm':<4}{'fine-tuned backbone':<40}{'test acc (%) mean +- sd':>24}{'min - max':>14}"]
    for arm, name in _arms(summary).items():
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
    if has_minres_arm(summary):
        lines += ["", "Implicit-gradient solve quality per BiSSL stage (mean over replicates and upper steps):"]
        lines += _solve_table(summary)
    return "\n".join(lines)


def _arms(summary: dict[str, Any]) -> dict[str, str]:
    return {**ARMS, **(MINRES_ARM if has_minres_arm(summary) else {})}


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _solve_table(summary: dict[str, Any]) -> list[str]:
    """The per-stage solve-quality table (Markdown) of an experiment with the MINRES arm."""
    b, m = summary["solve_quality"]["B"], summary["solve_quality"]["M"]
    reps = len(summary["replicates"])
    lines = [
        f"| stage | B ({b['method']}): residual | B: x = v | B: solves worse than x = v | M ({m['method']}): residual "
        f"| M: x = v | indefinite systems B / M (of {reps}) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k in range(len(b["residual"])):
        lines.append(
            f"| {k + 1} | {_num(b['residual'][k])} | {_num(b['no_solve'][k])} | {b['worse'][k]}/{b['solves'][k]} | "
            f"{_num(m['residual'][k])} | {_num(m['no_solve'][k])} | {b['indefinite'][k]} / {m['indefinite'][k]} |"
        )
    return lines


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
    for arm, name in _arms(summary).items():
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
    if has_minres_arm(summary):
        lines += [
            "",
            "Implicit-gradient solve quality per BiSSL stage: relative residual `||v - A x|| / ||v||` of the system "
            "`A x = v`, `A = I + H / (lam + damping)`, mean over the replicates and the upper steps of the stage, "
            "against that of no solve (`x = v`); how many solves ended worse than no solve; in how many replicates a "
            "solve of the stage met negative curvature (CG) or a negative Ritz value (MINRES), i.e. found the "
            "system indefinite.",
            "",
            *_solve_table(summary),
        ]
    return "\n".join(lines)


def readme_block(readme_text: str, minres: bool = False) -> str:
    """The text between the demo markers (the MINRES experiment's with ``minres``) of ``readme_text``, without them."""
    start_marker, end_marker = _markers(minres)
    start, end = readme_text.find(start_marker), readme_text.find(end_marker)
    if start < 0 or end < start:
        raise ValueError(f"the README has no {start_marker} ... {end_marker} block")
    return readme_text[start + len(start_marker) : end].strip("\n")


def update_readme(path: str | Path, summary: dict[str, Any]) -> None:
    """Replace the README's block of ``summary``'s experiment at ``path`` with :func:`render_markdown` of ``summary``."""
    path = Path(path)
    text = path.read_text()
    minres = has_minres_arm(summary)
    readme_block(text, minres)  # raises when the markers are missing
    start_marker, end_marker = _markers(minres)
    start, end = text.find(start_marker), text.find(end_marker)
    path.write_text(text[: start + len(start_marker)] + "\n" + render_markdown(summary) + "\n" + text[end:])


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
    arms = list(_arms(summary))
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
