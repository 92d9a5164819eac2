"""One replicate of the demo's experiment: split, pretraining, BiSSL, the compute-matched control, fine-tuning.

A replicate is a function of one integer seed (:func:`derive_seed` turns it into a seed per
purpose) and the settings. Its arms share one pretraining run:

- **A** the pretext backbone;
- **C** A with pretext training continued for exactly the lower steps BiSSL takes, through the
  same trainer code with the proximal term off (``lam=0``) and no upper stage: same optimizer
  type, learning rate, clipping, BYOL target handling, and the identical sequence of unlabeled
  batches and augmented views (the Hessian batch each BiSSL stage draws is drawn and skipped);
- **B** BiSSL's lower (pretext) backbone, the one the paper fine-tunes;
- **D** BiSSL's upper (downstream) backbone, a diagnostic.

Each arm is fine-tuned identically with a fresh linear head and the replicate's fine-tuning seed
(same head initialization, batch order and augmentations) and evaluated on a test split that no
stage sees, not even unlabeled. ``docs/design.md §2.4`` defines the BiSSL stage, ``§2.5`` the
paper's pipeline this small CPU version follows in structure.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.tensors import BatchAugment, ImageDataset, TensorLoader
from ..train.config import BiSSLConfig
from ..train.heads import Classifier
from ..train.models import PretextModel
from ..train.trainer import BiSSLTrainer
from .demo_setup import (
    ExperimentSettings,
    ViewStream,
    derive_seed,
    prepare_replicate,
    pretrain_loss,
    pretrain_target,
    replicate_fingerprint,
)

ARMS: dict[str, str] = {
    "A": "pretext backbone",
    "C": "pretext + continued pretext training",
    "B": "BiSSL lower backbone",
    "D": "BiSSL upper backbone (diagnostic)",
}


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


class _PhaseClock:
    """Wall and CPU (this process) seconds of consecutive phases, into ``times[<phase>_s]`` / ``[<phase>_cpu_s]``."""

    def __init__(self, times: dict[str, float]) -> None:
        self.times = times
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def lap(self, phase: str) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        self.times[f"{phase}_s"] = wall - self.wall
        self.times[f"{phase}_cpu_s"] = cpu - self.cpu
        self.wall, self.cpu = wall, cpu


def run_replicate(
    settings: ExperimentSettings, data: ImageDataset, replicate_seed: int, device: torch.device, progress: bool = False,
) -> dict[str, Any]:
    """Run every arm of one replicate; returns its JSON-ready record (accuracies in ``[0, 1]``)."""
    s = settings
    times: dict[str, float] = {}
    clock = _PhaseClock(times)
    setup = prepare_replicate(settings, data, replicate_seed, device)
    fingerprint = replicate_fingerprint(setup)
    splits, pretext, feature_dim = setup.splits, setup.pretext, setup.feature_dim
    x_lab, y_lab, x_val, y_val, x_test, y_test = setup.x_lab, setup.y_lab, setup.x_val, setup.y_val, setup.x_test, setup.y_test
    x_unl, view_aug, light_aug, batch_size = setup.x_unl, setup.view_aug, setup.light_aug, setup.batch_size
    pretrain_stream = setup.pretrain_stream
    pretrain_curve = pretrain(pretext, pretrain_stream, s.pretrain_epochs, s.pretrain_lr, s.pretext)
    clock.lap("pretrain")

    # BiSSL (arms B and D): head warm-up, then the bilevel stages.
    torch.manual_seed(derive_seed(replicate_seed, "bissl-head"))
    upper = Classifier(copy.deepcopy(pretext.backbone), feature_dim, data.num_classes).to(device)
    linear_probe(upper, x_lab, y_lab)
    lower = copy.deepcopy(pretext)
    config = BiSSLConfig(
        pretext=s.pretext, lower_iters=s.lower_iters, upper_iters=s.upper_iters, solver=s.solver, progress=progress,
        **({} if s.lam is None else {"lam": s.lam}),
    )
    bissl_stream = ViewStream(x_unl, batch_size, view_aug, derive_seed(replicate_seed, "bissl-views"))
    torch.manual_seed(derive_seed(replicate_seed, "bissl"))
    trainer = BiSSLTrainer(
        lower, upper, bissl_stream,
        TensorLoader(x_lab, y_lab, batch_size=min(64, x_lab.shape[0]), seed=derive_seed(replicate_seed, "bissl-labeled")),
        torch.optim.AdamW(lower.parameters(), lr=s.bissl_lr, weight_decay=1e-4),
        torch.optim.AdamW(upper.parameters(), lr=s.bissl_lr, weight_decay=1e-4),
        config,
        upper_transform=light_aug,
    )
    bissl_log = trainer.fit(s.bissl_stages)
    # Each stage draws lower_iters batches for its lower steps, then the upper stage's fixed Hessian batch.
    draws_per_stage = s.lower_iters + (1 if s.upper_iters > 0 else 0)
    if bissl_stream.drawn != s.bissl_stages * draws_per_stage:
        raise RuntimeError(
            f"BiSSL drew {bissl_stream.drawn} lower batches in {s.bissl_stages} stages, expected {draws_per_stage} "
            "per stage; the control arm could not replay the lower level's batches"
        )
    clock.lap("bissl")

    # Control C: the same lower-level steps without the proximal coupling or the upper stage.
    control = copy.deepcopy(pretext)
    control_upper = copy.deepcopy(upper)  # the trainer needs an upper model; with no upper stage it never changes

    def hessian_batch(draw: int) -> bool:
        return s.upper_iters > 0 and draw % draws_per_stage == s.lower_iters

    control_stream = ViewStream(x_unl, batch_size, view_aug, derive_seed(replicate_seed, "bissl-views"), skip=hessian_batch)
    torch.manual_seed(derive_seed(replicate_seed, "bissl"))
    control_trainer = BiSSLTrainer(
        control, control_upper, control_stream,
        TensorLoader(x_lab, y_lab, batch_size=min(64, x_lab.shape[0])),  # unused: no upper stage
        torch.optim.AdamW(control.parameters(), lr=s.bissl_lr, weight_decay=1e-4),
        torch.optim.SGD(control_upper.parameters(), lr=0.0),  # unused: no upper stage
        dataclasses.replace(config, lam=0.0, upper_iters=0),
    )
    control_log = control_trainer.fit(s.bissl_stages)
    bissl_lower_draws = [entry for entry in bissl_stream.log if not hessian_batch(entry[0])]
    views_identical = bissl_lower_draws == control_stream.log
    if not views_identical:
        raise RuntimeError("the control arm's batches/views differ from the ones BiSSL's lower level trained on")
    clock.lap("control")

    # Fine-tuning: every arm alike, fresh head, the replicate's fine-tuning seed.
    backbones = {"A": pretext.backbone, "C": control.backbone, "B": lower.backbone, "D": upper.backbone}
    finetune_seed = derive_seed(replicate_seed, "finetune")
    test_acc, val_acc, finetune_curves = {}, {}, {}
    for arm, arm_backbone in backbones.items():
        model, curve = finetune(
            arm_backbone, feature_dim, data.num_classes, x_lab, y_lab, s.finetune_epochs, s.finetune_lr,
            finetune_seed, light_aug,
        )
        test_acc[arm] = accuracy(model, x_test, y_test)
        val_acc[arm] = accuracy(model, x_val, y_val) if x_val.shape[0] else None
        finetune_curves[arm] = curve
    clock.lap("finetune")
    times["total_s"] = sum(times[f"{phase}_s"] for phase in ("pretrain", "bissl", "control", "finetune"))
    times["total_cpu_s"] = sum(times[f"{phase}_cpu_s"] for phase in ("pretrain", "bissl", "control", "finetune"))

    return {
        "seed": replicate_seed,
        "fingerprint": fingerprint,
        "sizes": {
            "unlabeled": int(splits.unlabeled.numel()), "labeled": int(splits.labeled.numel()),
            "val": int(splits.val.numel()), "test": int(splits.test.numel()),
        },
        "bissl_config": {
            k: v for k, v in dataclasses.asdict(config).items() if isinstance(v, (bool, int, float, str, type(None)))
        },
        "test_acc": test_acc,
        "val_acc": val_acc,
        "lower_steps": {"B": trainer.lower_step, "C": control_trainer.lower_step},
        "control_views_identical": views_identical,
        "curves": {
            "pretrain_loss": pretrain_curve,
            "bissl_lower_loss": [e["lower_loss"] for e in bissl_log],
            "bissl_upper_loss": [e["upper_loss"] for e in bissl_log],
            "control_loss": [e["lower_loss"] for e in control_log],
            "finetune_loss": finetune_curves,
        },
        "first_lower_loss": {
            "B": bissl_log[0]["lower_losses"][0] if bissl_log and bissl_log[0]["lower_losses"] else None,
            "C": control_log[0]["lower_losses"][0] if control_log and control_log[0]["lower_losses"] else None,
        },
        "cg_final_relative_residual_max": max((r for e in bissl_log for r in e["cg_relative_residuals"]), default=None),
        "times": times,
    }
