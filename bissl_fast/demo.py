"""End-to-end BiSSL demo: pretext pretraining -> BiSSL -> fine-tuning, on a real dataset.

``bissl-fast demo`` (or ``python -m bissl_fast.demo``) runs, on scikit-learn's digits by default:

1. SimCLR (or ``--pretext byol``) pretraining of a small ResNet on all images, without labels;
2. a linear probe of the downstream head on the frozen pretext backbone (head warm-up), then
   BiSSL stages (:class:`bissl_fast.BiSSLTrainer`) on a small labeled split;
3. fine-tuning with the same budget and seeds from the pretext backbone (baseline) and from the
   BiSSL downstream backbone, reporting test accuracy mean +- std over seeds.

It prints a results table, and writes ``summary.json`` and ``summary.png`` (accuracy bars, loss
curves) to ``--out``. ``--quick`` is a CI-sized run (well under a minute on a 2-core CPU).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .data import BatchAugment, TensorLoader, load_dataset, normalize_stats, stratified_split
from .models import DownstreamModel, PretextModel, SmallResNet
from .trainer import BiSSLConfig, BiSSLTrainer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bissl-fast demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=("digits", "cifar10", "imagefolder"), default="digits")
    p.add_argument("--data-root", default=None, help="folder of the cifar10 / imagefolder data (nothing is downloaded)")
    p.add_argument("--image-size", type=int, default=None, help="resize images to this side (digits: native 8)")
    p.add_argument("--pretext", choices=("simclr", "byol"), default="simclr")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda uses the fused kernels)")
    p.add_argument("--widths", type=int, nargs="+", default=None, help="SmallResNet stage widths (default 16 32)")
    p.add_argument("--pretrain-epochs", type=int, default=None)
    p.add_argument("--bissl-stages", type=int, default=None)
    p.add_argument("--lower-iters", type=int, default=20)
    p.add_argument("--upper-iters", type=int, default=8)
    p.add_argument("--finetune-epochs", type=int, default=None)
    p.add_argument("--seeds", type=int, default=None, help="fine-tuning seeds per variant")
    p.add_argument("--labels-per-class", type=int, default=None, help="size of the labeled downstream split")
    p.add_argument("--test-per-class", type=int, default=None, help="held-out test images per class")
    p.add_argument("--batch-size", type=int, default=None, help="pretext batch (images; 2 views each)")
    p.add_argument("--solver", choices=("reuse", "recompute"), default="reuse")
    p.add_argument(
        "--threads", type=int, default=None,
        help="torch CPU threads (default on CPU: 1; these models are too small to gain from more, and "
        "extra threads slow down badly when the cores are shared)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of pretraining and BiSSL")
    p.add_argument("--quick", action="store_true", help="CI-sized run")
    p.add_argument("--no-progress", action="store_true", help="hide the tqdm bars")
    p.add_argument("--out", default="demo_out", help="output folder for summary.json and summary.png")
    return p


_DEFAULTS = {
    # name: (default, quick)
    "image_size": (8, 8),
    "widths": ([16, 32], [8, 16]),
    "pretrain_epochs": (30, 4),
    "bissl_stages": (12, 2),
    "finetune_epochs": (30, 6),
    "seeds": (3, 2),
    "labels_per_class": (10, 10),
    "test_per_class": (60, 30),
    "batch_size": (128, 64),
}


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    args = copy.copy(args)
    for name, (full, quick) in _DEFAULTS.items():
        # Other datasets keep their native image size unless --image-size is given.
        if getattr(args, name) is None and (name != "image_size" or args.data == "digits"):
            setattr(args, name, quick if args.quick else full)
    if args.quick:
        args.lower_iters = min(args.lower_iters, 10)
        args.upper_iters = min(args.upper_iters, 4)
    return args


def _backbone(in_channels: int, widths: Sequence[int]) -> SmallResNet:
    return SmallResNet(in_channels, widths=tuple(widths), blocks=(1,) * len(widths))


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> float:
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], batch):
        correct += int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
    model.train()
    return correct / x.shape[0]


def _pretrain(model: PretextModel, x: torch.Tensor, args: argparse.Namespace, aug: BatchAugment, progress: bool) -> list[float]:
    """SimCLR / BYOL pretraining on ``x`` (no labels); returns the mean loss of each epoch."""
    from tqdm.auto import tqdm

    nt_xent, byol_loss = _losses()
    target = copy.deepcopy(model) if args.pretext == "byol" else None
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    loader = TensorLoader(x, None, batch_size=min(args.batch_size, x.shape[0]), seed=args.seed)
    steps = args.pretrain_epochs * len(loader)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    curve = []
    bar = tqdm(total=steps, desc="pretrain", disable=not progress)
    for _ in range(args.pretrain_epochs):
        losses = []
        for xb in loader:
            v1, v2 = aug.views(xb, 2)
            h = model.head(model.backbone(torch.cat([v1, v2])))
            if target is None:
                loss = nt_xent(h, temperature=0.5)
            else:
                p1, p2 = model.predictor(h).chunk(2)
                with torch.no_grad():
                    t1, t2 = target.head(target.backbone(torch.cat([v1, v2]))).chunk(2)
                loss = byol_loss(p1, p2, t1, t2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if target is not None:
                with torch.no_grad():
                    for t, o in zip(target.parameters(), model.parameters()):
                        t.mul_(0.99).add_(o, alpha=0.01)
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        curve.append(sum(losses) / len(losses))
    bar.close()
    return curve


def _losses() -> tuple[Any, Any]:
    """The fused losses when they are importable, else the references (identical values)."""
    from . import reference

    try:
        from .ops.nt_xent import nt_xent
    except ImportError:
        nt_xent = reference.nt_xent
    try:
        from .ops.byol import byol_loss
    except ImportError:
        byol_loss = reference.byol_loss
    return nt_xent, byol_loss


def _linear_probe(model: DownstreamModel, x: torch.Tensor, y: torch.Tensor, steps: int = 200) -> None:
    """Fit the downstream head on frozen backbone features (the paper's head warm-up before BiSSL)."""
    with torch.no_grad():
        model.eval()
        feats = model.backbone(x)
        model.train()
    opt = torch.optim.Adam(model.head.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(model.head(feats), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _finetune(
    model: DownstreamModel, x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
    epochs: int, seed: int, aug: BatchAugment,
) -> tuple[float, list[float]]:
    """Full fine-tuning with augmentation; returns (test accuracy, mean train loss per epoch)."""
    torch.manual_seed(seed)
    loader = TensorLoader(x, y, batch_size=min(32, x.shape[0]), seed=1000 + seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(epochs * len(loader), 1))
    curve = []
    for _ in range(epochs):
        losses = []
        for xb, yb in loader:
            loss = F.cross_entropy(model(aug(xb)), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        curve.append(sum(losses) / len(losses))
    return _accuracy(model, x_test, y_test), curve


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _figure(summary: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    names = list(summary["results"])
    means = [100 * summary["results"][n]["test_acc_mean"] for n in names]
    stds = [100 * summary["results"][n]["test_acc_std"] for n in names]
    axes[0].bar(names, means, yerr=stds, capsize=6, color=["tab:gray", "tab:blue"])
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].set_ylim(max(0.0, min(means) - 10), min(100.0, max(means) + 5))
    axes[0].set_title(f"fine-tuning, {summary['config']['seeds']} seeds")
    axes[1].plot(summary["curves"]["pretrain_loss"], marker="o")
    axes[1].set_xlabel("pretraining epoch")
    axes[1].set_ylabel(f"{summary['config']['pretext']} loss")
    axes[1].set_title("pretraining (bottom axis), BiSSL stages (top axis)", pad=30, fontsize=10)
    ax2 = axes[1].twiny()
    ax2.plot(summary["curves"]["bissl_lower_loss"], color="tab:orange", marker="s", label="BiSSL lower (pretext)")
    ax2.plot(summary["curves"]["bissl_upper_loss"], color="tab:green", marker="^", label="BiSSL upper (downstream)")
    ax2.set_xlabel("BiSSL stage")
    ax2.legend(loc="upper right", fontsize=8)
    for name in names:
        axes[2].plot(summary["curves"]["finetune_loss"][name], label=name)
    axes[2].set_xlabel("fine-tuning epoch")
    axes[2].set_ylabel("train cross-entropy (mean over seeds)")
    axes[2].set_title("fine-tuning")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Run the pipeline described in the module docstring; returns the summary dict it writes.

    ``args`` is the namespace of :func:`build_parser`. torch's CPU thread count is set for the
    run (``--threads``) and restored afterwards.
    """
    args = _resolve(args)
    device = torch.device(args.device)
    previous_threads = torch.get_num_threads()
    if args.threads is not None or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    try:
        return _run(args, device)
    finally:
        torch.set_num_threads(previous_threads)


def _run(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but torch sees no CUDA device")
    progress = not args.no_progress
    times: dict[str, float] = {}
    t_start = time.perf_counter()

    torch.manual_seed(args.seed)
    data = load_dataset(args.data, args.data_root, args.image_size)
    mean, std = normalize_stats(data.x)
    x_all = ((data.x - mean) / std).to(device)
    y_all = data.y.to(device)
    test_idx, rest = stratified_split(data.y, args.test_per_class, seed=args.seed)
    train_pos, _ = stratified_split(data.y[rest], args.labels_per_class, seed=args.seed + 1)
    train_idx = rest[train_pos]
    x_test, y_test = x_all[test_idx.to(device)], y_all[test_idx.to(device)]
    x_lab, y_lab = x_all[train_idx.to(device)], y_all[train_idx.to(device)]
    channels = data.x.shape[1]
    aug = BatchAugment(flip=0.0 if args.data == "digits" else 0.5)
    # Downstream training uses milder augmentation than the pretext views.
    light_aug = BatchAugment(scale=(0.8, 1.0), rotation=10.0, jitter=0.1, noise=0.02, flip=0.0 if args.data == "digits" else 0.5)

    # 1) pretext pretraining on all images, no labels.
    t0 = time.perf_counter()
    backbone = _backbone(channels, args.widths).to(device)
    pretext = PretextModel(backbone, backbone.out_dim, proj_dim=64, hidden_dim=128, predictor=args.pretext == "byol").to(device)
    pretrain_curve = _pretrain(pretext, x_all, args, aug, progress)
    times["pretrain_s"] = time.perf_counter() - t0

    # 2) head warm-up + BiSSL on the labeled split.
    t0 = time.perf_counter()
    warm = DownstreamModel(copy.deepcopy(pretext.backbone), backbone.out_dim, data.num_classes).to(device)
    _linear_probe(warm, x_lab, y_lab)
    baseline_init = copy.deepcopy(warm)
    lower = copy.deepcopy(pretext)
    upper = copy.deepcopy(warm)
    cfg = BiSSLConfig(
        pretext=args.pretext, lower_iters=args.lower_iters, upper_iters=args.upper_iters,
        solver=args.solver, progress=progress,
    )
    trainer = BiSSLTrainer(
        lower, upper,
        TensorLoader(x_all, None, batch_size=min(args.batch_size, x_all.shape[0]), seed=args.seed + 7),
        TensorLoader(x_lab, y_lab, batch_size=min(64, x_lab.shape[0]), seed=args.seed + 11),
        torch.optim.AdamW(lower.parameters(), lr=5e-4, weight_decay=1e-4),
        torch.optim.AdamW(upper.parameters(), lr=5e-4, weight_decay=1e-4),
        cfg,
        lower_transform=lambda xb: aug.views(xb, 2),
        upper_transform=light_aug,
    )
    bissl_log = trainer.fit(args.bissl_stages)
    times["bissl_s"] = time.perf_counter() - t0

    # 3) fine-tuning from both initializations, same budget and seeds.
    t0 = time.perf_counter()
    inits = {"pretext": baseline_init, "bissl": upper}
    accs: dict[str, list[float]] = {name: [] for name in inits}
    curves: dict[str, list[list[float]]] = {name: [] for name in inits}
    for seed in range(args.seeds):
        for name, init in inits.items():
            acc, curve = _finetune(copy.deepcopy(init), x_lab, y_lab, x_test, y_test, args.finetune_epochs, seed, light_aug)
            accs[name].append(acc)
            curves[name].append(curve)
    times["finetune_s"] = time.perf_counter() - t0
    times["total_s"] = time.perf_counter() - t_start

    results = {}
    for name in inits:
        m, s = _mean_std(accs[name])
        results[name] = {"test_acc_mean": m, "test_acc_std": s, "test_acc": accs[name]}
    summary = {
        "config": {k: v for k, v in vars(args).items()},
        "dataset": {"name": data.name, "images": int(data.x.shape[0]), "shape": list(data.x.shape[1:]),
                    "classes": data.num_classes, "labeled_train": int(x_lab.shape[0]), "test": int(x_test.shape[0])},
        "results": results,
        "times": times,
        "bissl_log": [{k: v for k, v in e.items()} for e in bissl_log],
        "curves": {
            "pretrain_loss": pretrain_curve,
            "bissl_lower_loss": [e["lower_loss"] for e in bissl_log],
            "bissl_upper_loss": [e["upper_loss"] for e in bissl_log],
            "finetune_loss": {n: [statistics.fmean(c) for c in zip(*curves[n])] for n in inits},
        },
        "environment": {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
                        "platform": platform.platform()},
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    _figure(summary, os.path.join(args.out, "summary.png"))
    print(format_table(summary))
    return summary


def format_table(summary: dict[str, Any]) -> str:
    """The printed results table: accuracy per initialization and wall time per stage."""
    ds = summary["dataset"]
    lines = [
        f"BiSSL demo: {ds['name']} {ds['shape']}, {ds['labeled_train']} labeled / {ds['test']} test images, "
        f"pretext={summary['config']['pretext']}, {summary['config']['seeds']} seeds",
        f"{'init':<10} {'test acc (%)':>18}",
    ]
    for name, r in summary["results"].items():
        lines.append(f"{name:<10} {100 * r['test_acc_mean']:>9.2f} +- {100 * r['test_acc_std']:<5.2f}")
    t = summary["times"]
    lines.append(
        f"wall time: pretrain {t['pretrain_s']:.1f}s, BiSSL {t['bissl_s']:.1f}s, "
        f"fine-tune {t['finetune_s']:.1f}s, total {t['total_s']:.1f}s"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (``bissl-fast demo ...`` / ``python -m bissl_fast.demo ...``)."""
    run_demo(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
