"""The main job: does BiSSL beat a compute-matched control? A replicated, paired experiment.

``bissl-fast demo`` (or ``python -m bissl_fast.experiments.demo``) runs ``--replicates`` independent replicates
(scikit-learn's digits by default). Replicate ``k`` has the seed ``--seed + k``, and every random
choice in it (split, initialization, augmentations, pretraining, BiSSL, fine-tuning) derives from
that one seed, so ``--seed S --replicates 1`` re-runs replicate ``S`` alone. Per replicate
(:mod:`bissl_fast.experiments.demo_experiment`): a held-out test split no stage sees, a validation split,
SimCLR/BYOL pretraining, then four arms sharing it -- (A) the pretext backbone, (C) pretext
training continued for exactly BiSSL's lower-level steps on the same batches, (B) BiSSL's lower
backbone, (D) BiSSL's upper backbone -- each fine-tuned with a fresh head and the same seed.

It prints accuracy per arm, the paired differences B-C (primary), B-A and C-A with a 95% t-interval,
an exact sign-flip p-value and wins/ties/losses, and one sentence stating the conclusion; writes
``summary.json`` and ``summary.png`` to ``--out``; and with ``--readme README.md`` regenerates the
README's demo block from that JSON. ``--quick`` is a CI-sized smoke run.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import copy
import json
import multiprocessing
import os
import platform
import sys
import time
from typing import Any, NoReturn, Sequence

import torch

from .._provenance import provenance
from ..data.tensors import ImageDataset, load_dataset
from .demo_experiment import run_replicate
from .demo_report import (
    format_text,
    readme_block,
    summarize,
    update_readme,
    write_figure,
)
from .demo_setup import (
    ExperimentSettings,
    fingerprint_mismatches,
    prepare_replicate,
    replicate_fingerprint,
)


class _OneLineErrorParser(argparse.ArgumentParser):
    """Bad input ends the program with one line on stderr (exit status 2), not the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineErrorParser(prog="bissl-fast demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=("digits", "cifar10", "imagefolder"), default="digits")
    p.add_argument("--data-root", default=None, help="folder of the cifar10 / imagefolder data (nothing is downloaded)")
    p.add_argument("--image-size", type=int, default=None, help="resize images to this side (digits: native 8)")
    p.add_argument("--pretext", choices=("simclr", "byol"), default="simclr")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda uses the fused kernels)")
    p.add_argument("--replicates", type=int, default=None, help="independent replicates (full run 8, --quick 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first replicate; replicate k uses seed + k")
    p.add_argument("--widths", type=int, nargs="+", default=None, help="SmallResNet stage widths (default 16 32)")
    p.add_argument("--pretrain-epochs", type=int, default=None)
    p.add_argument("--pretrain-lr", type=float, default=2e-3, help="AdamW learning rate of pretraining")
    p.add_argument("--batch-size", type=int, default=None, help="pretext batch (images; 2 views each)")
    p.add_argument("--bissl-stages", type=int, default=None)
    p.add_argument("--lower-iters", type=int, default=None, help="lower steps per BiSSL stage (default 20)")
    p.add_argument("--upper-iters", type=int, default=None, help="upper steps per BiSSL stage (default 8)")
    p.add_argument("--bissl-lr", type=float, default=5e-4, help="AdamW learning rate of both BiSSL levels and of control C")
    p.add_argument(
        "--lam", type=float, default=None,
        help="BiSSL's proximal weight lam (default: BiSSLConfig's, the paper's 1e-3); choose it on the validation split",
    )
    p.add_argument("--solver", choices=("reuse", "recompute"), default="reuse")
    p.add_argument("--finetune-epochs", type=int, default=None)
    p.add_argument("--finetune-lr", type=float, default=1e-3, help="AdamW learning rate of fine-tuning")
    p.add_argument("--labels-per-class", type=int, default=None, help="labeled images per class (BiSSL upper level, fine-tuning)")
    p.add_argument("--val-per-class", type=int, default=None, help="validation images per class (held out like the test split)")
    p.add_argument("--test-per-class", type=int, default=None, help="held-out test images per class")
    p.add_argument(
        "--workers", type=int, default=None,
        help="replicates run in parallel processes (default on CPU: min(2, CPUs); cuda: 1)",
    )
    p.add_argument(
        "--threads", type=int, default=None,
        help="torch CPU threads per process (default on CPU: 1; these models are too small to gain from more, and "
        "extra threads slow down badly when the cores are shared)",
    )
    p.add_argument("--quick", action="store_true", help="CI-sized smoke run")
    p.add_argument("--no-progress", action="store_true", help="hide the tqdm bars")
    p.add_argument("--out", default="demo_out", help="output folder for summary.json and summary.png")
    p.add_argument("--readme", default=None, help="also regenerate this README's demo block from the new summary")
    return p


_DEFAULTS: dict[str, tuple[Any, Any]] = {
    # name: (full run, --quick)
    "replicates": (8, 2),
    "image_size": (8, 8),
    "widths": ([16, 32], [8, 16]),
    "pretrain_epochs": (30, 2),
    "batch_size": (128, 64),
    "bissl_stages": (10, 1),
    "lower_iters": (20, 5),
    "upper_iters": (8, 2),
    "finetune_epochs": (300, 60),
    "labels_per_class": (2, 3),
    "val_per_class": (10, 5),
    "test_per_class": (80, 20),
}
# Keys of the resolved arguments that describe where output goes, not the experiment.
_NOT_CONFIG = ("out", "readme", "no_progress")


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill every unset option with its full-run or ``--quick`` default."""
    args = copy.copy(args)
    for name, (full, quick) in _DEFAULTS.items():
        # Other datasets keep their native image size unless --image-size is given.
        if getattr(args, name) is None and (name != "image_size" or args.data == "digits"):
            setattr(args, name, quick if args.quick else full)
    if args.workers is None:
        args.workers = 1 if args.quick or args.device != "cpu" else min(2, os.cpu_count() or 1, args.replicates)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Raise ``ValueError`` (one line) for any bad option of resolved ``args``; nothing has run yet."""
    at_least = {
        "--replicates": (args.replicates, 1),
        "--pretrain-epochs": (args.pretrain_epochs, 0),
        "--bissl-stages": (args.bissl_stages, 0),
        "--lower-iters": (args.lower_iters, 0),
        "--upper-iters": (args.upper_iters, 0),
        "--finetune-epochs": (args.finetune_epochs, 0),
        "--labels-per-class": (args.labels_per_class, 1),
        "--val-per-class": (args.val_per_class, 0),
        "--test-per-class": (args.test_per_class, 1),
        "--workers": (args.workers, 1),
    }
    if args.threads is not None:
        at_least["--threads"] = (args.threads, 1)
    if args.image_size is not None:
        at_least["--image-size"] = (args.image_size, 4)
    for flag, (value, minimum) in at_least.items():
        if value < minimum:
            raise ValueError(f"{flag} must be >= {minimum}, got {value}")
    if args.batch_size < 2:
        reason = "NT-Xent needs negatives" if args.pretext == "simclr" else "BatchNorm needs two samples"
        raise ValueError(f"--batch-size must be >= 2 with --pretext {args.pretext} ({reason}), got {args.batch_size}")
    if args.lam is not None and not 0 <= args.lam < float("inf"):
        raise ValueError(f"--lam must be a finite number >= 0, got {args.lam}")
    if any(w < 1 for w in args.widths):
        raise ValueError(f"--widths must all be >= 1, got {args.widths}")
    for flag, value in (("--pretrain-lr", args.pretrain_lr), ("--bissl-lr", args.bissl_lr), ("--finetune-lr", args.finetune_lr)):
        if not value > 0 or value == float("inf"):
            raise ValueError(f"{flag} must be a positive finite number, got {value}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but torch sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {args.device!r}")
    if args.readme is not None:
        if not os.path.isfile(args.readme):
            raise FileNotFoundError(f"--readme {args.readme!r} is not a file")
        with open(args.readme) as f:
            readme_block(f.read())


def check_budget(args: argparse.Namespace, data: ImageDataset) -> None:
    """Raise ``ValueError`` when the per-class label/validation/test budgets do not fit ``data``."""
    need = args.labels_per_class + args.val_per_class + args.test_per_class
    counts = torch.bincount(data.y, minlength=data.num_classes)
    smallest = int(counts.min())
    if smallest < need:
        raise ValueError(
            f"--labels-per-class {args.labels_per_class} + --val-per-class {args.val_per_class} + --test-per-class "
            f"{args.test_per_class} = {need} images per class, but the smallest class of {data.name} has {smallest}"
        )
    unlabeled = data.y.numel() - data.num_classes * (args.val_per_class + args.test_per_class)
    if unlabeled < 2:
        raise ValueError(f"only {unlabeled} unlabeled images remain after the test and validation splits; need >= 2")


def settings_from_args(args: argparse.Namespace) -> ExperimentSettings:
    """The replicate settings of resolved ``args`` (flips only for data whose mirror images keep their class)."""
    return ExperimentSettings(
        pretext=args.pretext, widths=tuple(args.widths), pretrain_epochs=args.pretrain_epochs,
        pretrain_lr=args.pretrain_lr, batch_size=args.batch_size, bissl_stages=args.bissl_stages,
        lower_iters=args.lower_iters, upper_iters=args.upper_iters, bissl_lr=args.bissl_lr, lam=args.lam,
        solver=args.solver, finetune_epochs=args.finetune_epochs, finetune_lr=args.finetune_lr,
        labels_per_class=args.labels_per_class, val_per_class=args.val_per_class, test_per_class=args.test_per_class,
        flip=args.data != "digits",
    )


def _load(args: argparse.Namespace) -> ImageDataset:
    return load_dataset(args.data, args.data_root, args.image_size)


_WORKER_DATA: dict[tuple[Any, ...], ImageDataset] = {}


def _replicate_job(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """One replicate in a worker process (the dataset is loaded once per process)."""
    torch.set_num_threads(args.threads or 1)
    key = (args.data, args.data_root, args.image_size)
    if key not in _WORKER_DATA:
        _WORKER_DATA[key] = _load(args)
    return run_replicate_from_args(args, _WORKER_DATA[key], seed, progress=False)


def run_replicate_from_args(args: argparse.Namespace, data: ImageDataset, seed: int, progress: bool) -> dict[str, Any]:
    """Replicate ``seed`` of the experiment described by resolved ``args``."""
    return run_replicate(settings_from_args(args), data, seed, torch.device(args.device), progress)


def _progress_line(record: dict[str, Any], done: int, total: int) -> str:
    acc = "  ".join(f"{arm} {100 * a:.1f}" for arm, a in record["test_acc"].items())
    t = record["times"]
    return f"replicate {done}/{total} (seed {record['seed']}): test acc (%) {acc}  [{t['total_s']:.0f} s wall, {t['total_cpu_s']:.0f} s CPU]"


def _run_replicates(args: argparse.Namespace, data: ImageDataset, seeds: Sequence[int]) -> list[dict[str, Any]]:
    progress = not args.no_progress
    if args.workers == 1:
        records = []
        for k, seed in enumerate(seeds):
            records.append(run_replicate_from_args(args, data, seed, progress))
            print(_progress_line(records[-1], k + 1, len(seeds)), flush=True)
        return records
    # Spawned workers: a forked child would inherit torch's thread pools and this process' state.
    context = multiprocessing.get_context("spawn")
    by_seed: dict[int, dict[str, Any]] = {}
    with concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=context) as pool:
        futures = [pool.submit(_replicate_job, args, seed) for seed in seeds]
        for future in concurrent.futures.as_completed(futures):
            record = future.result()
            by_seed[record["seed"]] = record
            print(_progress_line(record, len(by_seed), len(seeds)), flush=True)
    return [by_seed[s] for s in seeds]


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def run_demo(args: argparse.Namespace, data: ImageDataset | None = None) -> dict[str, Any]:
    """Run the experiment for ``args`` (a :func:`build_parser` namespace); returns the summary it writes.

    ``data`` is the dataset of the options when the caller has already loaded it; worker processes
    (``--workers`` > 1) load it again from the options. Raises ``ValueError`` / ``FileNotFoundError``
    on bad options or data before anything trains.
    torch's CPU thread count is set for the run (``--threads``, default 1) and restored afterwards.
    """
    args = resolve(args)
    check_args(args)
    data = _load(args) if data is None else data
    check_budget(args, data)
    previous_threads = torch.get_num_threads()
    if args.threads is not None or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    try:
        return _run(args, data)
    finally:
        torch.set_num_threads(previous_threads)


def _run(args: argparse.Namespace, data: ImageDataset) -> dict[str, Any]:
    seeds = [args.seed + k for k in range(args.replicates)]
    print(
        f"{args.replicates} replicates, seeds {seeds} (re-run one alone with --seed S --replicates 1), "
        f"{args.workers} worker process(es)", flush=True,
    )
    load_start = _load_average()
    produced_by = provenance()  # the code as the run starts: files may change while it runs
    wall0 = time.perf_counter()
    records = _run_replicates(args, data, seeds)
    wall = time.perf_counter() - wall0
    first = records[0]["sizes"]
    summary: dict[str, Any] = {
        "provenance": produced_by,
        "config": {k: v for k, v in vars(args).items() if k not in _NOT_CONFIG},
        "dataset": {
            "name": data.name, "images": int(data.x.shape[0]), "shape": list(data.x.shape),
            "classes": data.num_classes, "per_replicate": first,
        },
        "replicate_seeds": seeds,
        "validation_use": (
            "none: every setting was fixed before the run (no learning rate, lam or epoch count was chosen on it); "
            "its accuracy is recorded per replicate and arm in summary.json."
        ),
        **summarize(records),
        "replicates": records,
        "times": {
            "wall_s": wall,
            "cpu_s": sum(r["times"]["total_cpu_s"] for r in records),
            **{
                f"{phase}_cpu_s": sum(r["times"][f"{phase}_cpu_s"] for r in records)
                for phase in ("pretrain", "bissl", "control", "finetune")
            },
            "workers": args.workers,
            "threads": args.threads or 1,
            "load_average_start": load_start,
            "load_average_end": _load_average(),
        },
        "environment": {
            "torch": torch.__version__, "device": args.device, "platform": platform.platform(),
            "python": sys.version.split()[0], "cpu_count": os.cpu_count(),
        },
    }
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "summary.json")
    with open(json_path, "w") as f:
        json.dump(summary, f, indent=1)
    written = [json_path]
    try:
        figure_path = os.path.join(args.out, "summary.png")
        write_figure(summary, figure_path)
        written.append(figure_path)
    except ImportError:
        print("matplotlib is not installed: no figure (pip install matplotlib)", flush=True)
    if args.readme is not None:
        update_readme(args.readme, summary)
        written.append(f"{args.readme} (demo block)")
    print(format_text(summary))
    print("wrote " + ", ".join(written))
    return summary


def stale_replicates(summary: dict[str, Any], data: ImageDataset | None = None) -> dict[int, list[str]]:
    """Replicates of a demo ``summary`` whose recorded fingerprint today's code does not reproduce: seed -> fields.

    Recomputes each replicate's set-up up to its first pretraining step (seconds, no training) and compares it
    with the ``fingerprint`` recorded in the summary (:func:`bissl_fast.experiments.demo_setup.replicate_fingerprint`);
    a replicate without one is reported as ``["fingerprint"]``.
    """
    args = argparse.Namespace(**{**{name: None for name in _NOT_CONFIG}, **summary["config"]})
    settings = settings_from_args(args)
    data = _load(args) if data is None else data
    stale = {}
    for record in summary["replicates"]:
        recorded = record.get("fingerprint")
        if recorded is None:
            stale[record["seed"]] = ["fingerprint"]
            continue
        today = replicate_fingerprint(prepare_replicate(settings, data, record["seed"], torch.device(args.device)))
        wrong = fingerprint_mismatches(recorded, today)
        if wrong:
            stale[record["seed"]] = wrong
    return stale


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (``bissl-fast demo ...`` / ``python -m bissl_fast.experiments.demo ...``)."""
    parser = build_parser()
    args = resolve(parser.parse_args(argv))
    try:
        check_args(args)
        data = _load(args)
        check_budget(args, data)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        parser.error(str(exc))
    run_demo(args, data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
