"""The README block of a committed pipeline run, generated from its ``summary.json``.

``python -m bissl_fast.experiments.pipeline.report SUMMARY_JSON --readme README.md`` rewrites the text between
``<!-- pipeline:start -->`` and ``<!-- pipeline:end -->`` so the README quotes the run's accuracies and runtime
from the file (a test renders the committed file and compares), and says when the file predates today's code.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

from ..._provenance import older_code_note, short_form

README_START = "<!-- pipeline:start -->"
README_END = "<!-- pipeline:end -->"
INIT_NAMES = {"bissl": "BiSSL lower backbone", "pretext": "pretext backbone (baseline)"}


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def render_markdown(summary: dict[str, Any], source: str) -> str:
    """The block (without the markers) for the run ``summary`` read from ``source``."""
    cfg = summary["config"]
    note = older_code_note(summary.get("provenance"))
    lines = [
        *([note, ""] if note else []),
        f"`{source}`: {cfg['data']} with `{cfg['arch']}`, {cfg['pretext']} pretraining {cfg['pretext_epochs']} epochs, "
        f"head warm-up {cfg['warmup_epochs']} epochs, {cfg['stages']} BiSSL stages x ({cfg['lower_iters']} lower + "
        f"{cfg['upper_iters']} upper steps), fine-tuning {cfg['finetune_epochs']} epochs with "
        f"{cfg['lr_search_trials']} lr/weight-decay trials on validation, then {cfg['seeds']} seeds; "
        f"{cfg['test_per_class']} held-out test images per class.",
        "",
        "| fine-tuned from | top-1 test accuracy (%), mean ± sd over seeds | seeds |",
        "|---|---:|---:|",
    ]
    for name, result in summary["results"].items():
        lines.append(f"| {INIT_NAMES.get(name, name)} | {result['top1_percent_mean']:.2f} ± {result['top1_percent_std']:.2f} | "
                     f"{len(result['runs'])} |")
    lines += [
        "",
        f"Runtime: {_duration(summary['wall_time_s_total'])} wall ({len(summary['wall_time_s_by_process'])} "
        f"process(es) in turn, {summary.get('world_size', 1)} rank(s), {cfg['threads']} thread(s)) on {cfg['device']}. Produced by: {short_form(summary.get('provenance'))}. A single run, not a controlled "
        "comparison (the demo above is one).",
    ]
    return "\n".join(lines)


def readme_block(readme_text: str) -> str:
    """The text between the pipeline markers of ``readme_text`` (without the marker lines)."""
    start, end = readme_text.find(README_START), readme_text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"the README has no {README_START} ... {README_END} block")
    return readme_text[start + len(README_START) : end].strip("\n")


def update_readme(readme: str | Path, summary_path: str | Path) -> None:
    """Replace the pipeline block of ``readme`` with the rendering of ``summary_path`` (named relative to the README)."""
    readme, summary_path = Path(readme), Path(summary_path)
    text = readme.read_text()
    readme_block(text)  # raises when the markers are missing
    source = Path(summary_path).resolve().relative_to(readme.resolve().parent).as_posix()
    block = render_markdown(json.loads(summary_path.read_text()), source)
    start, end = text.find(README_START), text.find(README_END)
    readme.write_text(text[: start + len(README_START)] + "\n" + block + "\n" + text[end:])


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bissl_fast.experiments.pipeline.report SUMMARY_JSON --readme README.md``."""
    parser = argparse.ArgumentParser(prog="python -m bissl_fast.experiments.pipeline.report", description=main.__doc__)
    parser.add_argument("summary", type=Path, help="summary.json of a `bissl-fast run`")
    parser.add_argument("--readme", type=Path, required=True, help="README whose pipeline block is rewritten")
    args = parser.parse_args(argv)
    update_readme(args.readme, args.summary)
    print(f"updated the pipeline block of {args.readme} from {args.summary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["README_END", "README_START", "main", "readme_block", "render_markdown", "update_readme"]
