"""The resumable run: :func:`run_pipeline` chains the stages, checkpoints after each, writes the summary."""
from __future__ import annotations

import copy
import json
import os
import statistics
import sys
import time
from dataclasses import asdict
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist

from ..._progress import progress_bar
from ...train.backbones import build_backbone
from ...train.checkpoints import HEAD_PREFIXES, load_weights, save_atomic
from ...train.heads import Classifier, ProjectionModel
from ...train.resume import rng_state, set_rng_state
from ...train.stage import StageLog
from .config import PipelineConfig, fingerprint
from .inputs import Augment, load_splits, make_loader
from .runtime import (
    RunLog,
    autocast,
    check_tensorboard,
    process_group,
    rank_and_world,
    resolve_device,
)
from .stages import finetune, make_trainer, pretrain, search_space, train_head


def _load_checkpoint(path: str, cfg: PipelineConfig) -> dict[str, Any] | None:
    if not (cfg.resume and os.path.exists(path)):
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = state["config"]
    changed = sorted(k for k, v in fingerprint(cfg).items() if saved.get(k) != v)
    if changed:
        raise ValueError(f"{path} was written with other settings ({', '.join(changed)}); use another --out or --no-resume")
    return state


def run_pipeline(
    config: PipelineConfig, *, pretext_loader: Iterable[Any] | None = None, on_checkpoint: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Run (or resume) the pipeline of the module docstring; returns the summary it writes to ``<out>/summary.json``.

    ``pretext_loader``: the unlabeled data of pretext pretraining and of BiSSL's lower level, as
    any iterable of image batches ``[b, C, H, W]`` or ``(images, ...)`` tuples, e.g. a
    ``DataLoader`` over a disk dataset (its sampler's ``set_epoch`` is called every pass; under
    ``torchrun`` it must yield this rank's share, e.g. through a ``DistributedSampler``). Without
    it, ``pretext_data`` (or the labeled training images) is read into memory. A resumable
    ``pretext_loader`` must be rebuilt identically on resume (same dataset, batch size, generator
    seed), as :class:`bissl_fast.BiSSLTrainer` requires.

    ``on_checkpoint(label)`` is called after each checkpoint is written (labels ``"pretext"``,
    ``"warmup"``, ``"bissl:<stage>"``, ``"search:<init>:<trial>"``, ``"finetune:<init>:<seed>"``).
    """
    cfg = config
    device = resolve_device(cfg.device)
    if cfg.bf16 and device.type != "cuda":
        raise ValueError("bf16 autocast is a CUDA option; use device cuda or drop --bf16")
    if cfg.tensorboard:
        check_tensorboard()
    previous_threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        with process_group(device):
            return _run(cfg, device, pretext_loader, on_checkpoint or (lambda label: None))
    finally:
        torch.set_num_threads(previous_threads)


def _run(cfg: PipelineConfig, device: torch.device, pretext_loader: Any, on_checkpoint: Callable[[str], None]) -> dict[str, Any]:
    rank, world = rank_and_world()
    for name in ("pretext_batch_size", "downstream_batch_size", "finetune_batch_size"):
        if getattr(cfg, name) % world:
            raise ValueError(f"{name}={getattr(cfg, name)} is not divisible by the {world} processes")
    splits = load_splits(cfg, device)
    channels = splits.x_train.shape[1]
    torch.manual_seed(cfg.seed)
    backbone, feature_dim = build_backbone(cfg.arch, channels)
    pretext = ProjectionModel(backbone, feature_dim, byol=cfg.pretext == "byol", batchnorm=cfg.projector_batchnorm).to(device)
    load_reports = {}
    if cfg.pretext_checkpoint is not None:
        load_reports["backbone"] = load_weights(pretext.backbone, cfg.pretext_checkpoint, allow_unexpected=HEAD_PREFIXES).summary()
    if cfg.pretext_head_checkpoint is not None:
        load_reports["head"] = load_weights(pretext.head, cfg.pretext_head_checkpoint, prefix="projector.",
                                            allow_unexpected=("predictor.",)).summary()
        if pretext.predictor is not None:
            load_reports["predictor"] = load_weights(pretext.predictor, cfg.pretext_head_checkpoint, prefix="predictor.",
                                                     allow_unexpected=("projector.",)).summary()

    os.makedirs(cfg.out, exist_ok=True)
    ckpt_path = os.path.join(cfg.out, "checkpoint.pt")
    state = _load_checkpoint(ckpt_path, cfg) or {"config": asdict(cfg), "done": [], "log_lines": 0, "finetune": {}}
    log = RunLog(cfg.out, int(state["log_lines"]), cfg.tensorboard, rank)
    aug = Augment(cfg.augment, splits, cfg.pretext, device)

    def checkpoint(label: str) -> None:
        state["log_lines"] = log.lines
        state["rng"] = rng_state()
        if rank == 0:
            save_atomic(state, ckpt_path)
        if world > 1:
            dist.barrier()
        on_checkpoint(label)

    # A resumed run restores the global RNG where the uninterrupted run wrote the checkpoint: at
    # the start of the first stage still to run (the BiSSL trainer restores its own).
    pending_rng = [state["rng"]] if "rng" in state else []

    def restore_rng() -> None:
        if pending_rng:
            set_rng_state(pending_rng.pop())

    t_start = time.perf_counter()

    # 1) pretext backbone
    if "pretext" in state["done"]:
        pretext.load_state_dict(state["pretext_model"])
    else:
        if cfg.pretext_checkpoint is None and cfg.pretext_epochs > 0:
            loader = pretext_loader if pretext_loader is not None else make_loader(splits.x_pretext, None, cfg.pretext_batch_size, cfg.seed + 1)
            pretrain(cfg, pretext, loader, aug, log)
        state["pretext_model"] = pretext.state_dict()
        state["done"].append("pretext")
        checkpoint("pretext")

    # 2) head warm-up on a copy of the pretext backbone
    if "warmup" not in state["done"]:
        restore_rng()
    warm = Classifier(copy.deepcopy(pretext.backbone), feature_dim, splits.num_classes).to(device)
    if "warmup" in state["done"]:
        warm.load_state_dict(state["warm_model"])
    else:
        train_head(cfg, warm, splits, aug, log)
        state["warm_model"] = warm.state_dict()
        state["done"].append("warmup")
        checkpoint("warmup")

    # 3) BiSSL stages
    lower = copy.deepcopy(pretext)
    upper = copy.deepcopy(warm)
    trainer = make_trainer(cfg, lower, upper, splits, aug, pretext_loader)
    if "trainer" in state:
        trainer.load_state_dict(state["trainer"])
    else:
        restore_rng()
    bar = progress_bar(cfg.stages - trainer.stage, "BiSSL stages", cfg.progress) if rank == 0 else None
    while trainer.stage < cfg.stages:
        # The learning rates of the stage's first steps (the schedulers move them every step).
        lrs = {"lower_lr": trainer.lower_optimizer.param_groups[0]["lr"], "upper_lr": trainer.upper_optimizer.param_groups[0]["lr"]}
        with autocast(cfg):
            entry = trainer.train_stage()
        warning = solve_warning(entry, cfg.stages)
        if warning is not None and rank == 0:
            print(warning, file=sys.stderr, flush=True)
        record = {"phase": "bissl", **entry.as_dict(), **lrs}
        log.write(record, step=entry.stage)
        state["trainer"] = trainer.state_dict()
        checkpoint(f"bissl:{entry.stage + 1}")
        if bar is not None:
            bar.update(1)
            losses = {"lower_loss": entry.lower_loss, "upper_loss": entry.upper_loss}
            bar.set_postfix(**{k: f"{v:.4f}" for k, v in losses.items() if v is not None})
    if bar is not None:
        bar.close()
    if "bissl" not in state["done"]:
        state["done"].append("bissl")
        checkpoint("bissl")

    # 4) fine-tuning: BiSSL's lower backbone and the pretext baseline, same budget and seeds
    inits = {"bissl": trainer.lower_model.backbone, "pretext": pretext.backbone}
    results = state["finetune"]
    for name, init in inits.items():
        chosen = results.setdefault(name, {"search": [], "runs": {}})
        for trial, (lr, wd) in enumerate(search_space(cfg.lr_search_trials, cfg.seed)):
            if trial < len(chosen["search"]):
                continue
            acc = finetune(cfg, init, feature_dim, splits, aug, lr=lr, weight_decay=wd, seed=cfg.seed,
                           x_eval=splits.x_val, y_eval=splits.y_val)
            chosen["search"].append({"lr": lr, "weight_decay": wd, **acc})
            log.write({"phase": "lr_search", "init": name, "trial": trial, "lr": lr, "weight_decay": wd, **acc})
            checkpoint(f"search:{name}:{trial}")
        if chosen["search"]:
            best = max(chosen["search"], key=lambda r: (r["top1"], r["top5"]))
            lr, wd = best["lr"], best["weight_decay"]
        else:
            lr, wd = cfg.finetune_lr, cfg.finetune_weight_decay
        for seed in range(cfg.seeds):
            if str(seed) in chosen["runs"]:
                continue
            acc = finetune(cfg, init, feature_dim, splits, aug, lr=lr, weight_decay=wd, seed=seed,
                           x_eval=splits.x_test, y_eval=splits.y_test, log=log, name=name)
            chosen["runs"][str(seed)] = {"lr": lr, "weight_decay": wd, **acc}
            log.write({"phase": "test", "init": name, "seed": seed, "lr": lr, "weight_decay": wd, **acc})
            checkpoint(f"finetune:{name}:{seed}")
    if "finetune" not in state["done"]:
        state["done"].append("finetune")
        checkpoint("finetune")

    summary = {
        "config": asdict(cfg),
        "world_size": world,
        "checkpoint_loads": load_reports,
        "results": {
            name: {
                "top1_mean": statistics.fmean(r["top1"] for r in res["runs"].values()),
                "top1_std": statistics.stdev(r["top1"] for r in res["runs"].values()) if len(res["runs"]) > 1 else 0.0,
                "top5_mean": statistics.fmean(r["top5"] for r in res["runs"].values()),
                "runs": res["runs"],
                "search": res["search"],
            }
            for name, res in results.items()
        },
        "bissl": [{k: e[k] for k in ("stage", "lower_loss", "upper_loss", "solve_residuals", "no_solve_residuals")}
                  for e in trainer.log],
        "wall_time_s_this_process": time.perf_counter() - t_start,
    }
    if rank == 0:
        with open(os.path.join(cfg.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        torch.save({"bissl_lower_backbone": trainer.lower_model.backbone.state_dict(),
                    "bissl_upper": trainer.upper_model.state_dict()}, os.path.join(cfg.out, "bissl_backbones.pt"))
    log.close()
    return summary


def solve_warning(entry: StageLog, stages: int) -> str | None:
    """One line when some implicit-gradient solve of the stage ended further from solving its system than no solve."""
    if not entry.solves_worse:
        return None
    worse = [(r, n) for r, n in zip(entry.solve_residuals, entry.no_solve_residuals) if n is not None and r > n]
    worst = max(worse, key=lambda pair: pair[0] / pair[1])
    indefinite = " (the system is indefinite)" if entry.indefinite else ""
    return (
        f"bissl-fast run: warning: BiSSL stage {entry.stage + 1}/{stages}: {entry.solves_worse} of "
        f"{len(entry.solve_residuals)} implicit-gradient solves ({entry.solve_method}) ended with a larger relative "
        f"residual than no solve (x = v), worst {worst[0]:.3g} vs {worst[1]:.3g}{indefinite}; remedy: "
        f"--solve-method minres, or a larger --damping (now {entry.damping:g}) or --auto-damping"
    )


def format_summary(summary: dict[str, Any]) -> str:
    """A short table: top-1 / top-5 test accuracy per initialization."""
    lines = [f"{'init':<8} {'top-1 (%)':>16} {'top-5 (%)':>10}  seeds"]
    for name, r in summary["results"].items():
        lines.append(f"{name:<8} {100 * r['top1_mean']:>8.2f} +- {100 * r['top1_std']:<5.2f} {100 * r['top5_mean']:>10.2f}  {len(r['runs'])}")
    return "\n".join(lines)


__all__ = ["format_summary", "run_pipeline", "solve_warning"]
