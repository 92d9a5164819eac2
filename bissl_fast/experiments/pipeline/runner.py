"""The resumable run: :func:`run_pipeline` chains the stages, checkpoints after each, writes the summary."""
from __future__ import annotations

import copy
import json
import math
import os
import statistics
import time
from dataclasses import asdict
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist

from ..._machine import calibrate, load_average, shared_cores
from ..._provenance import provenance
from ...train.backbones import build_backbone
from ...train.checkpoints import HEAD_PREFIXES, load_file, load_weights, remove_stale_temporaries, save_atomic
from ...train.heads import Classifier, ProjectionModel
from ...train.resume import rng_state, set_rng_state
from .config import PipelineConfig, fingerprint
from .inputs import Augment, data_change, load_splits, make_loader
from .runtime import (
    RunLog,
    autocast,
    check_tensorboard,
    process_group,
    rank_and_world,
    resolve_device,
)
from .stages import finetune, make_trainer, pretrain, search_space, train_head

#: The initializations fine-tuned at the end, in order: BiSSL's lower backbone and the pretext baseline.
INITS = ("bissl", "pretext")


def _load_checkpoint(path: str, cfg: PipelineConfig, data: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint a run resumes from (``None`` without one), refused in one line when its settings or data differ."""
    if not (cfg.resume and os.path.exists(path)):
        return None
    state = load_file(path)
    saved = state["config"]
    changed = sorted(k for k, v in fingerprint(cfg).items() if saved.get(k) != v)
    if changed:
        raise ValueError(f"{path} was written with other settings ({', '.join(changed)}); use another --out or --no-resume")
    if "data" not in state:
        raise ValueError(f"{path} records no fingerprint of its data (an older bissl_fast wrote it), so a resume on "
                         "this data cannot be checked; use another --out or --no-resume")
    for name, current in data.items():
        change = data_change(state["data"][name], current)
        if change is not None:
            root = getattr(cfg, f"{name}_root")
            where = f"{name} {getattr(cfg, name)}" + ("" if root is None else f" in {root}")
            raise ValueError(f"{path} was written on other data ({where}: {change}); use another --out or --no-resume")
    return state


def _resume_point(state: dict[str, Any], cfg: PipelineConfig) -> str | None:
    """Where the uninterrupted run would continue from ``state``, in words (``None``: the run is finished)."""
    if "warmup" not in state["done"]:
        return "the head warm-up"
    stage = state["trainer"]["counters"]["stage"] if "trainer" in state else 0
    if stage < cfg.stages:
        return f"BiSSL stage {stage + 1} of {cfg.stages}"
    for name in INITS:
        result = state["finetune"].get(name, {"search": [], "runs": {}})
        if len(result["search"]) < cfg.lr_search_trials:
            return f"lr search trial {len(result['search']) + 1} of {cfg.lr_search_trials} ({name} initialization)"
        if len(result["runs"]) < cfg.seeds:
            return f"fine-tuning seed {len(result['runs']) + 1} of {cfg.seeds} ({name} initialization)"
    return None


def _busy_cores_warning(load_at_start: float) -> str | None:
    """A warning when the intra-op threads of this machine's processes would share cores with other work.

    ``load_at_start``: the load average before this process did any work (other processes' load).
    """
    threads = torch.get_num_threads()
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    reasons = shared_cores(calibrate(torch.device("cpu"), rounds=15), threads * processes, load_at_start)
    if not reasons:
        return None
    free = max(1, math.floor(((os.cpu_count() or 1) - max(load_at_start, 0.0)) / processes))
    remedy = f"pass --threads {free} or " if free < threads else ""
    ours = f"{threads} threads" + (f" x {processes} processes" if processes > 1 else "")
    return (f"warning: the machine is busy ({'; '.join(reasons)}): {ours} sharing cores with other work make every "
            f"step wait and can run several times slower; {remedy}use an idle machine")


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
    # Before any work of ours, so that it is other processes' load.
    load_at_start = load_average()
    try:
        with process_group(device):
            return _run(cfg, device, pretext_loader, on_checkpoint or (lambda label: None), load_at_start)
    finally:
        torch.set_num_threads(previous_threads)


def _run(
    cfg: PipelineConfig, device: torch.device, pretext_loader: Any, on_checkpoint: Callable[[str], None], load_at_start: float
) -> dict[str, Any]:
    t_start = time.perf_counter()
    # The code as this process starts; a process that trains records it in the checkpoint, so a resumed run
    # records the code of the process that finished it and a rerun of a finished run keeps that record.
    produced_by = provenance()
    rank, world = rank_and_world()
    for name in ("pretext_batch_size", "downstream_batch_size", "finetune_batch_size"):
        if getattr(cfg, name) % world:
            raise ValueError(f"{name}={getattr(cfg, name)} is not divisible by the {world} processes")
    splits = load_splits(cfg, device)
    channels = splits.x_train.shape[1]
    torch.manual_seed(cfg.seed)
    backbone, feature_dim = build_backbone(cfg.arch, channels, image_size=splits.x_train.shape[-1])
    pretext = ProjectionModel(backbone, feature_dim, byol=cfg.pretext == "byol", batchnorm=cfg.projector_batchnorm).to(device)
    load_reports = {}
    if cfg.pretext_checkpoint is not None:
        load_reports["backbone"] = load_weights(pretext.backbone, cfg.pretext_checkpoint,
                                                ignore=HEAD_PREFIXES + cfg.checkpoint_ignore_prefixes()).summary()
    if cfg.pretext_head_checkpoint is not None:
        load_reports["head"] = load_weights(pretext.head, cfg.pretext_head_checkpoint, prefix="projector.",
                                            ignore=("predictor.",)).summary()
        if pretext.predictor is not None:
            load_reports["predictor"] = load_weights(pretext.predictor, cfg.pretext_head_checkpoint, prefix="predictor.",
                                                     ignore=("projector.",)).summary()

    os.makedirs(cfg.out, exist_ok=True)
    ckpt_path = os.path.join(cfg.out, "checkpoint.pt")
    backbones_path = os.path.join(cfg.out, "bissl_backbones.pt")
    stale = [] if rank else remove_stale_temporaries(ckpt_path) + remove_stale_temporaries(backbones_path)
    state = _load_checkpoint(ckpt_path, cfg, splits.fingerprint)
    resumed = state is not None
    if state is None:
        state = {"config": asdict(cfg), "done": [], "log_lines": 0, "finetune": {}, "wall_time_s_by_process": []}
    state["data"] = splits.fingerprint  # the same images; their files as they are now
    log = RunLog(cfg.out, int(state["log_lines"]), cfg.tensorboard, rank, cfg.progress)
    if stale:
        log.say(f"removed {len(stale)} temporary file(s) of checkpoint writes that were killed "
                f"({sum(size for _, size in stale) / 1e6:.1f} MB)")
    for part, report in load_reports.items():
        log.say(f"pretext {part} from {cfg.pretext_checkpoint if part == 'backbone' else cfg.pretext_head_checkpoint}: {report}")
    point = _resume_point(state, cfg) if resumed else "the start"
    if resumed:
        log.say(f"resuming {ckpt_path} at {point}" if point is not None else
                f"{ckpt_path} holds a finished run: nothing is trained again (--no-resume or another --out starts over)")
    if point is not None and device.type == "cpu" and rank == 0:
        warning = _busy_cores_warning(load_at_start)
        if warning is not None:
            log.say(warning)
    aug = Augment(cfg.augment, splits, cfg.pretext, device)
    process_slot: list[int] = []  # this process's entry in state["wall_time_s_by_process"], from its first checkpoint

    def checkpoint(label: str) -> None:
        times = state["wall_time_s_by_process"]
        if not process_slot:
            process_slot.append(len(times))
            times.append(0.0)
            state["provenance"] = produced_by
        times[process_slot[0]] = time.perf_counter() - t_start
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
    bar = log.bar(cfg.stages, "BiSSL stages", "stage", initial=trainer.stage)
    while trainer.stage < cfg.stages:
        # The learning rates of the stage's first steps (the schedulers move them every step).
        lrs = {"lower_lr": trainer.lower_optimizer.param_groups[0]["lr"], "upper_lr": trainer.upper_optimizer.param_groups[0]["lr"]}
        with autocast(cfg):
            entry = trainer.train_stage()
        record = {"phase": "bissl", **entry.as_dict(), **lrs}
        log.write(record)
        state["trainer"] = trainer.state_dict()
        checkpoint(f"bissl:{entry.stage + 1}")
        losses = {"lower_loss": entry.lower_loss, "upper_loss": entry.upper_loss}
        bar.update(**{k: v for k, v in losses.items() if v is not None})
    bar.close()
    if "bissl" not in state["done"]:
        state["done"].append("bissl")
        checkpoint("bissl")

    # 4) fine-tuning: BiSSL's lower backbone and the pretext baseline, same budget and seeds
    inits = dict(zip(INITS, (trainer.lower_model.backbone, pretext.backbone)))
    results = state["finetune"]
    epochs = cfg.finetune_epochs
    for name, init in inits.items():
        chosen = results.setdefault(name, {"search": [], "runs": {}})
        trials = search_space(cfg.lr_search_trials, cfg.seed)
        with log.bar(len(trials) * epochs, f"lr search ({name})", "epoch", initial=len(chosen["search"]) * epochs) as bar:
            for trial, (lr, wd) in enumerate(trials):
                if trial < len(chosen["search"]):
                    continue
                acc = finetune(cfg, init, feature_dim, splits, aug, lr=lr, weight_decay=wd, seed=cfg.seed,
                               x_eval=splits.x_val, y_eval=splits.y_val, bar=bar)
                chosen["search"].append({"lr": lr, "weight_decay": wd, **acc})
                log.write({"phase": "lr_search", "init": name, "trial": trial, "lr": lr, "weight_decay": wd, **acc})
                checkpoint(f"search:{name}:{trial}")
        if chosen["search"]:
            best = max(chosen["search"], key=lambda r: (r["top1_percent"], r.get("top5_percent", 0.0)))
            lr, wd = best["lr"], best["weight_decay"]
        else:
            lr, wd = cfg.finetune_lr, cfg.finetune_weight_decay
        with log.bar(cfg.seeds * epochs, f"fine-tuning ({name})", "epoch", initial=len(chosen["runs"]) * epochs) as bar:
            for seed in range(cfg.seeds):
                if str(seed) in chosen["runs"]:
                    continue
                acc = finetune(cfg, init, feature_dim, splits, aug, lr=lr, weight_decay=wd, seed=seed,
                               x_eval=splits.x_test, y_eval=splits.y_test, bar=bar, log=log, name=name)
                chosen["runs"][str(seed)] = {"lr": lr, "weight_decay": wd, **acc}
                log.write({"phase": "test", "init": name, "seed": seed, "lr": lr, "weight_decay": wd, **acc})
                checkpoint(f"finetune:{name}:{seed}")
    if "finetune" not in state["done"]:
        state["done"].append("finetune")
        checkpoint("finetune")

    summary = {
        "provenance": state.get("provenance", produced_by),
        "config": asdict(cfg),
        "world_size": world,
        "checkpoint_loads": load_reports,
        "results": {name: _result(res) for name, res in results.items()},
        "bissl": [{k: e[k] for k in ("stage", "lower_loss", "upper_loss", "cg_relative_residuals")} for e in trainer.log],
        # Per process that trained the run, up to its last checkpoint (work lost at a kill is redone and
        # counted by the next process); rerunning a finished run trains nothing and changes neither.
        "wall_time_s_total": sum(state["wall_time_s_by_process"]),
        "wall_time_s_by_process": state["wall_time_s_by_process"],
    }
    if rank == 0:
        with open(os.path.join(cfg.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        save_atomic({"bissl_lower_backbone": trainer.lower_model.backbone.state_dict(),
                     "bissl_upper": trainer.upper_model.state_dict()}, backbones_path)
    log.close()
    return summary


def _result(res: dict[str, Any]) -> dict[str, Any]:
    """Mean (and standard deviation over seeds) of the test accuracies of one initialization, in percent."""
    runs = list(res["runs"].values())
    top1 = [r["top1_percent"] for r in runs]
    result = {"top1_percent_mean": statistics.fmean(top1),
              "top1_percent_std": statistics.stdev(top1) if len(top1) > 1 else 0.0}
    if "top5_percent" in runs[0]:
        result["top5_percent_mean"] = statistics.fmean(r["top5_percent"] for r in runs)
    return {**result, "runs": res["runs"], "search": res["search"]}


def format_summary(summary: dict[str, Any]) -> str:
    """A short table: test accuracy in percent per initialization (top-5 only with more than 5 classes)."""
    top5 = all("top5_percent_mean" in r for r in summary["results"].values())
    lines = [f"{'init':<8} {'top-1 (%)':>16}" + (f" {'top-5 (%)':>10}" if top5 else "") + "  seeds"]
    for name, r in summary["results"].items():
        lines.append(f"{name:<8} {r['top1_percent_mean']:>8.2f} +- {r['top1_percent_std']:<5.2f}"
                     + (f" {r['top5_percent_mean']:>10.2f}" if top5 else "") + f"  {len(r['runs'])}")
    return "\n".join(lines)


__all__ = ["format_summary", "run_pipeline"]
