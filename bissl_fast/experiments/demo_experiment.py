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
import hashlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data.tensors import BatchAugment, ImageDataset, TensorLoader, normalize_stats
from ..ops.byol import byol_loss
from ..ops.nt_xent import nt_xent
from ..train.config import BiSSLConfig
from ..train.ema import EMATarget
from ..train.heads import Classifier
from ..train.models import PretextModel, SmallResNet
from ..train.trainer import BiSSLTrainer

ARMS: dict[str, str] = {
    "A": "pretext backbone",
    "C": "pretext + continued pretext training",
    "B": "BiSSL lower backbone",
    "D": "BiSSL upper backbone (diagnostic)",
}


@dataclass(frozen=True)
class ExperimentSettings:
    """Everything a replicate depends on besides its seed and the data (see ``bissl-fast demo --help``)."""

    pretext: str
    widths: tuple[int, ...]
    pretrain_epochs: int
    pretrain_lr: float
    batch_size: int
    bissl_stages: int
    lower_iters: int
    upper_iters: int
    bissl_lr: float
    lam: float | None
    solver: str
    finetune_epochs: int
    finetune_lr: float
    labels_per_class: int
    val_per_class: int
    test_per_class: int
    flip: bool


def derive_seed(replicate_seed: int, purpose: str) -> int:
    """A 31-bit seed for ``purpose`` (``"split"``, ``"init"``, ...) that depends only on ``replicate_seed``."""
    digest = hashlib.sha256(f"bissl-demo/{replicate_seed}/{purpose}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@dataclass
class Splits:
    """Index tensors into the dataset; ``unlabeled`` is every image outside ``test`` and ``val``."""

    test: torch.Tensor
    val: torch.Tensor
    labeled: torch.Tensor
    unlabeled: torch.Tensor


def split_indices(y: torch.Tensor, test_per_class: int, val_per_class: int, labels_per_class: int, seed: int) -> Splits:
    """Per class, a random ``test_per_class`` test, ``val_per_class`` validation and ``labels_per_class`` labeled images.

    ``y`` is ``[N]`` int64. The labeled images stay in the unlabeled pool (they are training
    images); test and validation images are in no other split.
    """
    gen = torch.Generator().manual_seed(seed)
    parts: dict[str, list[torch.Tensor]] = {"test": [], "val": [], "labeled": []}
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        need = test_per_class + val_per_class + labels_per_class
        if idx.numel() < need:
            raise ValueError(f"class {c} has {idx.numel()} images, fewer than test + val + labeled = {need} per class")
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        parts["test"].append(idx[:test_per_class])
        parts["val"].append(idx[test_per_class : test_per_class + val_per_class])
        parts["labeled"].append(idx[test_per_class + val_per_class : need])
    test, val, labeled = (torch.cat(parts[k]).sort().values for k in ("test", "val", "labeled"))
    held_out = torch.zeros(y.numel(), dtype=torch.bool)
    held_out[test] = True
    held_out[val] = True
    return Splits(test, val, labeled, torch.nonzero(~held_out).flatten())


def _checksum(views: Sequence[torch.Tensor]) -> list[float]:
    return [float(s) for v in views for s in (v.double().sum(), v.double().square().sum())]


class ViewStream:
    """Batches of augmented views of ``x`` ``[N, C, H, W]``: an iterable whose every pass is one epoch.

    Batch order comes from a :class:`TensorLoader` seeded with ``seed`` and the augmentations from
    a generator seeded with ``seed``, so two streams built alike produce identical views. Draw ``i``
    (counted over all epochs) is skipped when ``skip(i)`` is true: the views are still drawn, so
    later draws stay identical to the unskipped stream. ``log`` holds ``(draw, checksum)`` of every
    yielded batch for comparing two streams.
    """

    def __init__(
        self, x: torch.Tensor, batch_size: int, augment: BatchAugment, seed: int, views: int = 2,
        skip: Callable[[int], bool] | None = None,
    ) -> None:
        self.loader = TensorLoader(x, None, batch_size=batch_size, seed=seed)
        self.augment, self.views, self.skip = augment, views, skip
        self.generator = torch.Generator(device=x.device).manual_seed(seed)
        self.drawn = 0
        self.log: list[tuple[int, list[float]]] = []

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        for xb in self.loader:
            views = self.augment.views(xb, self.views, generator=self.generator)
            draw = self.drawn
            self.drawn += 1
            if self.skip is not None and self.skip(draw):
                continue
            self.log.append((draw, _checksum(views)))
            yield tuple(views)


#: EMA decay of the BYOL target during the demo's short pretraining (a few hundred steps): the
#: paper's 0.9995 would leave the target at its initialization over so few steps.
PRETRAIN_BYOL_MOMENTUM = 0.99


def pretrain(model: PretextModel, stream: ViewStream, epochs: int, lr: float, pretext: str) -> list[float]:
    """SimCLR / BYOL pretraining (AdamW, cosine schedule); returns the mean loss of each epoch.

    Each view runs through the backbone in its own forward pass (BatchNorm statistics per view), as
    in the paper and in :class:`bissl_fast.BiSSLTrainer`.
    """
    target = EMATarget([model.backbone, model.head], momentum=PRETRAIN_BYOL_MOMENTUM) if pretext == "byol" else None
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(epochs * len(stream.loader), 1))
    curve = []
    for _ in range(epochs):
        losses = []
        for v1, v2 in stream:
            h1, h2 = (model.head(model.backbone(v)) for v in (v1, v2))
            if target is None:
                loss = nt_xent(h1, h2, 0.5)
            else:
                t_backbone, t_head = target.modules
                with torch.no_grad():
                    t1, t2 = (t_head(t_backbone(v)) for v in (v1, v2))
                loss = byol_loss(model.predictor(h1), model.predictor(h2), t1, t2)
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
    splits = split_indices(data.y, s.test_per_class, s.val_per_class, s.labels_per_class, derive_seed(replicate_seed, "split"))
    # Normalization statistics from the unlabeled pool only: test and validation images stay unseen.
    mean, std = normalize_stats(data.x[splits.unlabeled])
    x_all = ((data.x - mean) / std).to(device)
    y_all = data.y.to(device)

    def take(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = idx.to(device)
        return x_all[idx], y_all[idx]

    (x_unl, _), (x_lab, y_lab) = take(splits.unlabeled), take(splits.labeled)
    (x_val, y_val), (x_test, y_test) = take(splits.val), take(splits.test)
    flip = 0.5 if s.flip else 0.0
    view_aug = BatchAugment(flip=flip)
    # Downstream training uses milder augmentation than the pretext views.
    light_aug = BatchAugment(scale=(0.8, 1.0), rotation=10.0, jitter=0.1, noise=0.02, flip=flip)
    batch_size = min(s.batch_size, x_unl.shape[0])

    # Pretraining: the run all four arms share.
    torch.manual_seed(derive_seed(replicate_seed, "init"))
    backbone = SmallResNet(data.x.shape[1], widths=s.widths, blocks=(1,) * len(s.widths)).to(device)
    feature_dim = backbone.out_dim
    pretext = PretextModel(backbone, feature_dim, proj_dim=64, hidden_dim=128, predictor=s.pretext == "byol").to(device)
    pretrain_stream = ViewStream(x_unl, batch_size, view_aug, derive_seed(replicate_seed, "pretrain"))
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
        "solve_relative_residual_max": max((r for e in bissl_log for r in e["solve_residuals"]), default=None),
        "times": times,
    }
