"""One replicate of the demo's experiment: split, pretraining, BiSSL, the compute-matched control, fine-tuning.

A replicate is a function of one integer seed (:func:`derive_seed` turns it into a seed per
purpose) and the settings. Its arms share one pretraining run:

- **A** the pretext backbone;
- **C** A with pretext training continued for exactly the lower steps BiSSL takes, through the
  same trainer code with the proximal term off (``lam=0``) and no upper stage: same optimizer
  type, learning rate, clipping, BYOL target handling, and the identical sequence of unlabeled
  batches and augmented views (the Hessian batch each BiSSL stage draws is drawn and skipped);
- **B** BiSSL's lower (pretext) backbone, the one the paper fine-tunes;
- **D** BiSSL's upper (downstream) backbone, a diagnostic;
- **M** (only with ``minres_arm``) B's run again with the implicit gradient solved by MINRES at the
  same number of Hessian products, from the same warmed-up models, batches and seeds.

Each arm is fine-tuned identically with a fresh linear head and the replicate's fine-tuning seed
(same head initialization, batch order and augmentations) and evaluated on a test split that no
stage sees, not even unlabeled. ``docs/design.md §2.4`` defines the BiSSL stage, ``§2.5`` the
paper's pipeline this small CPU version follows in structure.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any, Callable, Sequence

import torch

from ..data.tensors import BatchAugment, ImageDataset, TensorLoader
from ..train.config import BiSSLConfig
from ..train.heads import Classifier
from ..train.models import PretextModel
from ..train.trainer import BiSSLTrainer
from .demo_setup import ExperimentSettings, ViewStream, derive_seed, prepare_replicate, replicate_fingerprint
from .demo_training import accuracy, finetune, linear_probe, pretrain

ARMS: dict[str, str] = {
    "A": "pretext backbone",
    "C": "pretext + continued pretext training",
    "B": "BiSSL lower backbone",
    "D": "BiSSL upper backbone (diagnostic)",
}
#: The arm ``minres_arm`` adds.
MINRES_ARM: dict[str, str] = {"M": "BiSSL lower backbone, MINRES solve"}


class ViewStreamFactory:
    """Makes identical :class:`ViewStream` s (same data, batch size, augmentation and seed), one per run that replays them."""

    def __init__(self, x: torch.Tensor, batch_size: int, augment: BatchAugment, seed: int) -> None:
        self.x, self.batch_size, self.augment, self.seed = x, batch_size, augment, seed

    def __call__(self, skip: Callable[[int], bool] | None = None) -> ViewStream:
        return ViewStream(self.x, self.batch_size, self.augment, self.seed, skip=skip)


def run_bissl(
    s: ExperimentSettings, pretext: PretextModel, upper: Classifier, views: ViewStreamFactory,
    labeled: tuple[torch.Tensor, torch.Tensor, BatchAugment, int], seed: int, solve_method: str, progress: bool,
) -> tuple[BiSSLTrainer, ViewStream, list[Any]]:
    """BiSSL from ``pretext`` (copied) and the warmed-up ``upper`` (trained in place) for ``s.bissl_stages`` stages.

    ``labeled`` is ``(x, y, augmentation, loader seed)`` of the upper level; ``seed`` seeds torch's
    global generator before the trainer is built, so two calls that differ only in
    ``solve_method`` see the same batches, views and augmentations. Returns the trainer, its lower
    view stream and its stage log.
    """
    x_lab, y_lab, augment, loader_seed = labeled
    lower = copy.deepcopy(pretext)
    config = BiSSLConfig(
        pretext=s.pretext, lower_iters=s.lower_iters, upper_iters=s.upper_iters, solver=s.solver, progress=progress,
        solve_method=solve_method, **({} if s.lam is None else {"lam": s.lam}),
    )
    stream = views()
    torch.manual_seed(seed)
    trainer = BiSSLTrainer(
        lower, upper, stream,
        TensorLoader(x_lab, y_lab, batch_size=min(64, x_lab.shape[0]), seed=loader_seed),
        torch.optim.AdamW(lower.parameters(), lr=s.bissl_lr, weight_decay=1e-4),
        torch.optim.AdamW(upper.parameters(), lr=s.bissl_lr, weight_decay=1e-4),
        config,
        upper_transform=augment,
    )
    log = trainer.fit(s.bissl_stages)
    # Each stage draws lower_iters batches for its lower steps, then the upper stage's fixed Hessian batch.
    draws_per_stage = s.lower_iters + (1 if s.upper_iters > 0 else 0)
    if stream.drawn != s.bissl_stages * draws_per_stage:
        raise RuntimeError(
            f"BiSSL drew {stream.drawn} lower batches in {s.bissl_stages} stages, expected {draws_per_stage} "
            "per stage; the control arm could not replay the lower level's batches"
        )
    return trainer, stream, log


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def solve_quality_per_stage(log: Sequence[Any]) -> dict[str, Any]:
    """Per BiSSL stage: the mean implicit-gradient residual ``||v - A x|| / ||v||`` over its upper steps, that of
    no solve (``x = v``), how many solves ended worse than no solve, whether the system was found indefinite,
    and the Hessian products spent."""
    return {
        "method": log[0]["solve_method"] if log else None,
        "residual": [_mean(e["solve_residuals"]) for e in log],
        "no_solve": [_mean(e["no_solve_residuals"]) for e in log],
        "worse": [e["solves_worse"] for e in log],
        "solves": [len(e["solve_residuals"]) for e in log],
        "indefinite": [e["indefinite"] for e in log],
        "hessian_products": [e["hessian_products"] for e in log],
    }


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

    # BiSSL (arms B and D; M with minres_arm): head warm-up, then the bilevel stages.
    torch.manual_seed(derive_seed(replicate_seed, "bissl-head"))
    warm = Classifier(copy.deepcopy(pretext.backbone), feature_dim, data.num_classes).to(device)
    linear_probe(warm, x_lab, y_lab)
    bissl_views = ViewStreamFactory(x_unl, batch_size, view_aug, derive_seed(replicate_seed, "bissl-views"))
    labeled = (x_lab, y_lab, light_aug, derive_seed(replicate_seed, "bissl-labeled"))
    trainer, bissl_stream, bissl_log = run_bissl(
        s, pretext, copy.deepcopy(warm), bissl_views, labeled, derive_seed(replicate_seed, "bissl"), s.solve_method,
        progress,
    )
    upper, config = trainer.upper_model, trainer.config
    clock.lap("bissl")
    if s.minres_arm:
        minres_trainer, minres_stream, minres_log = run_bissl(
            s, pretext, copy.deepcopy(warm), bissl_views, labeled, derive_seed(replicate_seed, "bissl"), "minres",
            progress,
        )
        if minres_stream.log != bissl_stream.log:
            raise RuntimeError("the MINRES arm's lower batches/views differ from the ones arm B trained on")
        clock.lap("minres")
    draws_per_stage = s.lower_iters + (1 if s.upper_iters > 0 else 0)

    # Control C: the same lower-level steps without the proximal coupling or the upper stage.
    control = copy.deepcopy(pretext)
    control_upper = copy.deepcopy(upper)  # the trainer needs an upper model; with no upper stage it never changes

    def hessian_batch(draw: int) -> bool:
        return s.upper_iters > 0 and draw % draws_per_stage == s.lower_iters

    control_stream = bissl_views(skip=hessian_batch)
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
    backbones = {"A": pretext.backbone, "C": control.backbone, "B": trainer.lower_model.backbone, "D": upper.backbone}
    if s.minres_arm:
        backbones["M"] = minres_trainer.lower_model.backbone
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
    phases = [key[: -len("_cpu_s")] for key in times if key.endswith("_cpu_s")]
    times["total_s"] = sum(times[f"{phase}_s"] for phase in phases)
    times["total_cpu_s"] = sum(times[f"{phase}_cpu_s"] for phase in phases)
    solve_logs = {"B": bissl_log, **({"M": minres_log} if s.minres_arm else {})}

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
        "lower_steps": {
            "B": trainer.lower_step, "C": control_trainer.lower_step,
            **({"M": minres_trainer.lower_step} if s.minres_arm else {}),
        },
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
        "solve_quality": {arm: solve_quality_per_stage(log) for arm, log in solve_logs.items()},
        "times": times,
    }
