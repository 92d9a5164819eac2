"""The training steps of a demo replicate's arms: SimCLR/BYOL pretraining, the head warm-up (linear probe),
fine-tuning with a fresh head, and test accuracy (:mod:`bissl_fast.experiments.demo_experiment` runs them)."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..data.tensors import BatchAugment, TensorLoader
from ..train.heads import Classifier
from ..train.models import PretextModel
from .demo_setup import ViewStream, pretrain_loss, pretrain_target


def pretrain(model: PretextModel, stream: ViewStream, epochs: int, lr: float, pretext: str) -> list[float]:
    """SimCLR / BYOL pretraining (AdamW, cosine schedule); returns the mean loss of each epoch.

    Each view runs through the backbone in its own forward pass (BatchNorm statistics per view), as
    in the paper and in :class:`bissl_fast.BiSSLTrainer`.
    """
    target = pretrain_target(model, pretext)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(epochs * len(stream.loader), 1))
    curve = []
    for _ in range(epochs):
        losses = []
        for v1, v2 in stream:
            loss = pretrain_loss(model, target, v1, v2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if target is not None:
                target.update()
            losses.append(float(loss.detach()))
        curve.append(sum(losses) / len(losses))
    return curve


def linear_probe(model: Classifier, x: torch.Tensor, y: torch.Tensor, steps: int = 200) -> None:
    """Fit the head of ``model`` on frozen backbone features of ``x`` ``[n, C, H, W]`` (BiSSL's head warm-up)."""
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


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on ``x`` ``[n, C, H, W]``, ``y`` ``[n]``; ``nan`` when ``n == 0``."""
    if x.shape[0] == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], batch):
        correct += int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
    model.train(was_training)
    return correct / x.shape[0]


def finetune(
    backbone: nn.Module, feature_dim: int, num_classes: int, x: torch.Tensor, y: torch.Tensor,
    epochs: int, lr: float, seed: int, augment: BatchAugment,
) -> tuple[Classifier, list[float]]:
    """Fine-tune a copy of ``backbone`` with a fresh linear head (AdamW, cosine) on ``x`` ``[n, C, H, W]``, ``y`` ``[n]``.

    ``seed`` fixes the head initialization, batch order and augmentations, so arms fine-tuned with
    one seed differ only in their backbone. Returns the model and the mean train loss per epoch.
    """
    torch.manual_seed(seed)
    model = Classifier(copy.deepcopy(backbone), feature_dim, num_classes).to(x.device)
    loader = TensorLoader(x, y, batch_size=min(32, x.shape[0]), seed=seed)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(epochs * len(loader), 1))
    model.train()
    curve = []
    for _ in range(epochs):
        losses = []
        for xb, yb in loader:
            loss = F.cross_entropy(model(augment(xb, gen)), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        curve.append(sum(losses) / len(losses))
    return model, curve


__all__ = ["accuracy", "finetune", "linear_probe", "pretrain"]
