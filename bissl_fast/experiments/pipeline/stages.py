"""The pipeline's stages besides BiSSL itself: SimCLR/BYOL pretraining, the head warm-up, the BiSSL
trainer's construction, fine-tuning with its learning-rate search, and top-1 / top-5 evaluation (in percent)."""
from __future__ import annotations

import copy
import random
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...train.ema import EMATarget
from ...train.heads import Classifier, ProjectionModel
from ...train.losses import byol_pair_loss, simclr_loss
from ...train.optim import LARS, warmup_cosine
from ...train.trainer import BiSSLTrainer
from .config import PipelineConfig
from .inputs import Augment, Splits, make_loader
from .runtime import Bar, RunLog, autocast, average_gradients


def pretrain(cfg: PipelineConfig, model: ProjectionModel, loader: Any, aug: Augment, log: RunLog) -> None:
    """SimCLR / BYOL pretraining: LARS with linear warm-up and cosine to 0.001 x lr, per-view forwards."""
    opt = LARS(model.parameters(), lr=cfg.pretext_lr, weight_decay=cfg.pretext_weight_decay, momentum=0.9, eta=1e-3)
    sched = warmup_cosine(opt, cfg.pretext_warmup_epochs * len(loader), max(cfg.pretext_epochs * len(loader), 1))
    ema = EMATarget([model.backbone, model.head], momentum=cfg.byol_momentum) if cfg.pretext == "byol" else None
    params = list(model.parameters())
    with log.bar(cfg.pretext_epochs * len(loader), f"{cfg.pretext} pretraining", "step") as bar:
        for epoch in range(cfg.pretext_epochs):
            t0, losses = time.perf_counter(), []
            for xb in loader:
                views = aug.views(xb)
                with autocast(cfg):
                    if ema is None:
                        loss = simclr_loss(torch.cat([model(v) for v in views]), cfg.temperature, 2, "auto")
                    else:
                        p1, p2 = (model.predictor(model(v)) for v in views)
                        with torch.no_grad():
                            t1, t2 = (ema.modules[1](ema.modules[0](v)) for v in views)
                        loss = byol_pair_loss(p1, p2, t1, t2, "auto")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                average_gradients(params)
                lr = opt.param_groups[0]["lr"]
                opt.step()
                sched.step()
                if ema is not None:
                    ema.update()
                losses.append(float(loss.detach()))
                bar.update(loss=losses[-1])
            log.write({"phase": "pretext", "epoch": epoch, "loss": statistics.fmean(losses), "lr": lr,
                       "steps_per_s": len(losses) / (time.perf_counter() - t0)})


def train_head(cfg: PipelineConfig, model: Classifier, splits: Splits, aug: Augment, log: RunLog) -> None:
    """The paper's head warm-up: only the linear head learns; the backbone runs in train mode without gradients."""
    loader = make_loader(splits.x_train, splits.y_train, cfg.downstream_batch_size, cfg.seed + 2)
    lr = cfg.upper_lr if cfg.warmup_lr is None else cfg.warmup_lr
    weight_decay = cfg.upper_weight_decay if cfg.warmup_weight_decay is None else cfg.warmup_weight_decay
    opt = torch.optim.SGD(model.head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    model.train()
    head_params = list(model.head.parameters())
    with log.bar(cfg.warmup_epochs * len(loader), "head warm-up", "step") as bar:
        for epoch in range(cfg.warmup_epochs):
            losses = []
            for xb, yb in loader:
                with autocast(cfg):
                    with torch.no_grad():
                        feats = model.backbone(aug.downstream(xb))
                    loss = F.cross_entropy(model.head(feats), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                average_gradients(head_params)
                opt.step()
                losses.append(float(loss.detach()))
                bar.update(loss=losses[-1])
            log.write({"phase": "warmup", "epoch": epoch, "loss": statistics.fmean(losses), "lr": lr})


def make_trainer(
    cfg: PipelineConfig, lower: ProjectionModel, upper: Classifier, splits: Splits, aug: Augment, pretext_loader: Any
) -> BiSSLTrainer:
    lower_opt = LARS(lower.parameters(), lr=cfg.lower_lr, weight_decay=cfg.lower_weight_decay, momentum=cfg.lower_momentum, eta=cfg.lower_eta)
    upper_opt = torch.optim.SGD(upper.parameters(), lr=cfg.upper_lr, momentum=cfg.upper_momentum, weight_decay=cfg.upper_weight_decay)
    lower_steps = max(cfg.stages * cfg.lower_iters, 1)
    upper_steps = max(cfg.stages * cfg.upper_iters, 1)
    return BiSSLTrainer(
        lower, upper,
        pretext_loader if pretext_loader is not None else make_loader(splits.x_pretext, None, cfg.pretext_batch_size, cfg.seed + 3),
        make_loader(splits.x_train, splits.y_train, cfg.downstream_batch_size, cfg.seed + 4),
        lower_opt, upper_opt, cfg.bissl_config(),
        lower_scheduler=warmup_cosine(lower_opt, min(cfg.lower_warmup_steps, lower_steps), lower_steps),
        upper_scheduler=warmup_cosine(upper_opt, 0, upper_steps),
        lower_transform=aug.views,
        upper_transform=aug.downstream,
    )


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> dict[str, float]:
    """Accuracy of ``model`` on images ``x`` ``[N, C, H, W]`` with labels ``y`` ``[N]``, in eval mode, in percent.

    Returns ``{"top1_percent": ...}``, and ``"top5_percent"`` when the model has more than 5
    classes (with 5 or fewer every label is in the top 5).
    """
    was_training = model.training
    model.eval()
    top1 = top5 = 0
    classes = 0
    for i in range(0, x.shape[0], batch):
        logits = model(x[i : i + batch]).float()
        classes = logits.shape[1]
        best = logits.topk(min(5, classes), dim=1).indices
        target = y[i : i + batch, None]
        top1 += int((best[:, :1] == target).sum())
        top5 += int((best == target).any(dim=1).sum())
    model.train(was_training)
    n = max(x.shape[0], 1)
    accuracy = {"top1_percent": 100 * top1 / n}
    if classes > 5:
        accuracy["top5_percent"] = 100 * top5 / n
    return accuracy


def finetune(
    cfg: PipelineConfig, backbone: nn.Module, feature_dim: int, splits: Splits, aug: Augment, *, lr: float,
    weight_decay: float, seed: int, x_eval: torch.Tensor, y_eval: torch.Tensor, bar: Bar, log: RunLog | None = None,
    name: str = "",
) -> dict[str, float]:
    """Fine-tune a copy of ``backbone`` with a fresh linear head (SGD momentum 0.9, cosine); :func:`evaluate` on
    ``(x_eval, y_eval)``. ``bar`` advances once per epoch; with ``log``, every epoch is logged as a run of ``name``."""
    torch.manual_seed(seed)
    model = Classifier(copy.deepcopy(backbone), feature_dim, splits.num_classes).to(splits.x_train.device)
    loader = make_loader(splits.x_train, splits.y_train, cfg.finetune_batch_size, 1000 + seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    sched = warmup_cosine(opt, 0, max(cfg.finetune_epochs * len(loader), 1))
    params = list(model.parameters())
    model.train()
    for epoch in range(cfg.finetune_epochs):
        losses = []
        for xb, yb in loader:
            with autocast(cfg):
                loss = F.cross_entropy(model(aug.downstream(xb)), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            average_gradients(params)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        bar.update(loss=statistics.fmean(losses))
        if log is not None:
            log.write({"phase": "finetune", "init": name, "seed": seed, "epoch": epoch, "loss": statistics.fmean(losses),
                       "lr": opt.param_groups[0]["lr"]})
    return evaluate(model, x_eval, y_eval)


def search_space(trials: int, seed: int) -> list[tuple[float, float]]:
    """The paper's random search: lr in [1e-4, 1], weight decay in [1e-5, 1e-2], both log-uniform."""
    gen = random.Random(seed)
    return [(10 ** gen.uniform(-4, 0), 10 ** gen.uniform(-5, -2)) for _ in range(trials)]


__all__ = ["evaluate", "finetune", "make_trainer", "pretrain", "search_space", "train_head"]
