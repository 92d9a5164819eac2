"""The paper's whole BiSSL pipeline (docs/design.md §2.5) as one resumable run.

Stages, each checkpointed atomically into ``<out>/checkpoint.pt`` when it ends (BiSSL after every
BiSSL stage, fine-tuning after every run), so a killed run resumes where it stopped and ends with
the result of an uninterrupted one:

1. **pretext** -- load a pretext checkpoint into the backbone (any of the formats
   :func:`bissl_fast.checkpoints.load_weights` reads), or, without one, pretrain SimCLR/BYOL for
   ``pretext_epochs`` (LARS, linear warm-up + cosine);
2. **warmup** -- train only a fresh downstream linear head for ``warmup_epochs`` on the labeled
   split, the backbone frozen but in train mode (SGD, momentum 0.9);
3. **bissl** -- ``stages`` BiSSL stages (:class:`bissl_fast.BiSSLTrainer`): lower model = the
   pretext backbone + projector (BYOL target re-initialized to the online network), upper model =
   a copy of the backbone + the warmed-up head; LARS + warm-up/cosine below, SGD + cosine above;
4. **finetune** -- fine-tune from the LOWER BiSSL backbone with a fresh linear head (SGD momentum
   0.9, cosine), and the pretext backbone the same way as the baseline; an optional random search
   of lr / weight decay on a validation split, then ``seeds`` seeds at the chosen values; top-1
   and top-5 on a held-out test split.

Every stage appends JSON lines to ``<out>/log.jsonl`` (losses, CG residuals, throughput, lr),
and to TensorBoard with ``tensorboard=True`` when it is installed. Under ``torchrun`` every
process runs this function; batches are split over ranks (the global batch sizes stay those of the
config), gradients are averaged over ranks, and rank 0 writes checkpoints and logs.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import augment
from ._dist import bucketed_mean
from ._progress import progress_bar
from ._resume import rng_state, set_rng_state
from ._validation import check_int_at_least, check_nonnegative, check_positive
from .backbones import build_backbone
from .checkpoints import HEAD_PREFIXES, load_weights, save_atomic
from .data import (
    BatchAugment,
    TensorLoader,
    load_dataset,
    normalize_stats,
    stratified_split,
)
from .ema import EMATarget
from .heads import Classifier, ProjectionModel
from .optim import LARS, warmup_cosine
from .trainer import BiSSLConfig, BiSSLTrainer, _byol_loss, _nt_xent

_DATASETS = ("digits", "cifar10", "imagefolder")
_AUGMENTS = ("random", "paper", "flip")


@dataclass
class PipelineConfig:
    """Every setting of :func:`run_pipeline` (described in :data:`FIELD_HELP`); the CLI flags and TOML keys have these names.

    Batch sizes are global (split over ``torchrun`` ranks). The defaults are the paper's
    ImageNet/ResNet-50 recipe where it has one (``configs/paper_resnet50.toml`` spells them out);
    ``configs/cpu_digits.toml`` is a run that fits a CPU.
    """

    # data
    data: str = "digits"
    data_root: str | None = None
    pretext_data: str | None = None
    pretext_data_root: str | None = None
    image_size: int | None = None
    test_per_class: int = 30
    val_per_class: int = 10
    augment: str = "random"
    # model
    arch: str = "resnet50"
    pretext: str = "simclr"
    pretext_checkpoint: str | None = None
    pretext_head_checkpoint: str | None = None
    projector_batchnorm: bool = True
    # pretext pretraining (only without pretext_checkpoint)
    pretext_epochs: int = 0
    pretext_batch_size: int = 1024
    pretext_lr: float = 4.8
    pretext_weight_decay: float = 1e-6
    pretext_warmup_epochs: int = 10
    # head warm-up (lr / weight decay default to the upper level's, as in the paper)
    warmup_epochs: int = 20
    warmup_lr: float | None = None
    warmup_weight_decay: float | None = None
    # BiSSL
    stages: int = 500
    lower_iters: int = 20
    upper_iters: int = 8
    lam: float = 0.001
    damping: float = 10.0
    cg_iters: int = 5
    temperature: float = 0.5
    byol_momentum: float = 0.9995
    concat_views: bool = False
    solver: str = "reuse"
    lower_lr: float = 1.0
    lower_weight_decay: float = 1e-6
    lower_momentum: float = 0.9
    lower_eta: float = 1e-3
    lower_warmup_steps: int = 200
    upper_lr: float = 0.03
    upper_weight_decay: float = 1e-3
    upper_momentum: float = 0.9
    downstream_batch_size: int = 256
    # fine-tuning
    finetune_epochs: int = 400
    finetune_batch_size: int = 256
    finetune_lr: float = 0.03
    finetune_weight_decay: float = 1e-4
    lr_search_trials: int = 0
    seeds: int = 10
    # runtime
    device: str = "auto"
    bf16: bool = False
    threads: int | None = None
    seed: int = 0
    out: str = "bissl_run"
    resume: bool = True
    tensorboard: bool = False
    progress: bool | None = None

    def __post_init__(self) -> None:
        for name, choices in (("data", _DATASETS), ("augment", _AUGMENTS), ("pretext", ("simclr", "byol")),
                              ("solver", ("reuse", "recompute"))):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        if self.pretext_data is not None and self.pretext_data not in _DATASETS:
            raise ValueError(f"pretext_data must be one of {_DATASETS}, got {self.pretext_data!r}")
        for name in ("pretext_epochs", "warmup_epochs", "stages", "lower_iters", "upper_iters", "finetune_epochs",
                     "lr_search_trials", "pretext_warmup_epochs", "lower_warmup_steps", "val_per_class", "seed"):
            check_int_at_least(name, getattr(self, name), 0)
        check_int_at_least("seeds", self.seeds, 1)
        check_int_at_least("test_per_class", self.test_per_class, 1)
        if self.lr_search_trials and not self.val_per_class:
            raise ValueError("lr_search_trials needs a validation split: set val_per_class > 0")
        check_int_at_least("cg_iters", self.cg_iters, 1)
        minimum = 2 if self.pretext == "simclr" else 1
        check_int_at_least("pretext_batch_size", self.pretext_batch_size, minimum)
        check_int_at_least("downstream_batch_size", self.downstream_batch_size, 1)
        check_int_at_least("finetune_batch_size", self.finetune_batch_size, 1)
        for name in ("pretext_lr", "warmup_lr", "lower_lr", "upper_lr", "finetune_lr", "temperature", "lower_eta"):
            if getattr(self, name) is not None:
                check_positive(name, getattr(self, name))
        for name in ("pretext_weight_decay", "warmup_weight_decay", "lower_weight_decay", "upper_weight_decay",
                     "finetune_weight_decay", "lam", "damping", "lower_momentum", "upper_momentum"):
            if getattr(self, name) is not None:
                check_nonnegative(name, getattr(self, name))
        if self.threads is not None:
            check_int_at_least("threads", self.threads, 1)
        if self.image_size is not None:
            check_int_at_least("image_size", self.image_size, 4)
        # BiSSLConfig checks the rest of the BiSSL settings (lam + damping > 0, byol_momentum range).
        self.bissl_config()

    def bissl_config(self) -> BiSSLConfig:
        return BiSSLConfig(
            pretext=self.pretext, lower_iters=self.lower_iters, upper_iters=self.upper_iters, lam=self.lam,
            damping=self.damping, cg_iters=self.cg_iters, temperature=self.temperature,
            byol_momentum=self.byol_momentum, concat_views=self.concat_views, solver=self.solver,
            progress=False,
        )


#: One line per setting: the ``bissl-fast run --help`` text.
FIELD_HELP = {
    "data": "downstream dataset: digits (scikit-learn, nothing downloaded), cifar10, imagefolder",
    "data_root": "folder of the cifar10 / imagefolder data",
    "pretext_data": "unlabeled data of pretraining and BiSSL's lower level (default: the labeled training images)",
    "pretext_data_root": "folder of pretext_data",
    "image_size": "resize images to this side (default: native size)",
    "test_per_class": "held-out test images per class (top-1 / top-5 are measured on them)",
    "val_per_class": "validation images per class (for the lr search)",
    "augment": "random (light batched augmentations, any channels), paper (the SimCLR/BYOL views and the "
               "fine-tuning crop+flip of bissl_fast.augment; RGB) or flip (deterministic views, for tests)",
    "arch": "backbone: tiny_cnn, tiny_resnet, small_resnet, resnet18_cifar, resnet18..resnet152 (timm/torchvision)",
    "pretext": "simclr or byol",
    "pretext_checkpoint": "pretext backbone weights (plain, the paper's, lightly, solo-learn, torchvision, DDP)",
    "pretext_head_checkpoint": "the paper's pretext head file (projector.* / predictor.* keys)",
    "projector_batchnorm": "BatchNorm in the projector / predictor hidden layers (the paper's)",
    "pretext_epochs": "SimCLR/BYOL pretraining epochs when no pretext_checkpoint is given",
    "pretext_batch_size": "global pretext batch (images; 2 views each), also BiSSL's lower batch",
    "pretext_lr": "pretraining LARS learning rate",
    "pretext_weight_decay": "pretraining LARS weight decay",
    "pretext_warmup_epochs": "pretraining linear warm-up epochs (then cosine to 0.001 x lr)",
    "warmup_epochs": "head warm-up epochs (only the linear head trains)",
    "warmup_lr": "head warm-up SGD learning rate (default: upper_lr)",
    "warmup_weight_decay": "head warm-up weight decay (default: upper_weight_decay)",
    "stages": "BiSSL stages (each lower_iters lower + upper_iters upper steps)",
    "lower_iters": "lower (pretext) steps per stage",
    "upper_iters": "upper (downstream) steps per stage",
    "lam": "proximal weight between the lower and upper backbones",
    "damping": "added to lam in the implicit-gradient system",
    "cg_iters": "CG iterations per implicit gradient",
    "temperature": "NT-Xent temperature",
    "byol_momentum": "BYOL target EMA rate",
    "concat_views": "one forward on the concatenated views (the paper runs one per view)",
    "solver": "reuse (Hessian graph built once per upper stage) or recompute (the paper's)",
    "lower_lr": "lower-level LARS learning rate (warm-up then cosine over all lower steps)",
    "lower_weight_decay": "lower-level LARS weight decay",
    "lower_momentum": "lower-level LARS momentum",
    "lower_eta": "lower-level LARS trust coefficient",
    "lower_warmup_steps": "lower-level linear warm-up steps",
    "upper_lr": "upper-level SGD learning rate (cosine over all upper steps)",
    "upper_weight_decay": "upper-level SGD weight decay",
    "upper_momentum": "upper-level SGD momentum",
    "downstream_batch_size": "global downstream batch of the warm-up and the upper level",
    "finetune_epochs": "fine-tuning epochs per run",
    "finetune_batch_size": "global fine-tuning batch",
    "finetune_lr": "fine-tuning SGD learning rate (replaced by the search's choice when searching)",
    "finetune_weight_decay": "fine-tuning weight decay (replaced by the search's choice when searching)",
    "lr_search_trials": "random-search trials of (lr, weight decay) on the validation split, per initialization",
    "seeds": "fine-tuning seeds per initialization",
    "device": "auto, cpu, cuda or cuda:N (torchrun: LOCAL_RANK picks the GPU)",
    "bf16": "bf16 autocast in every stage (CUDA only)",
    "threads": "torch CPU threads",
    "seed": "seed of model initialization, splits and loaders",
    "out": "output folder (checkpoint.pt, log.jsonl, summary.json, bissl_backbones.pt)",
    "resume": "continue from <out>/checkpoint.pt when it exists",
    "tensorboard": "also write TensorBoard scalars (needs tensorboard)",
    "progress": "progress over BiSSL stages: a tqdm bar, or plain lines without tqdm",
}

#: Fields that may differ between a run and its resume (they do not change the result).
_RUNTIME_FIELDS = ("out", "resume", "tensorboard", "progress", "threads")


def config_from_toml(path: str | os.PathLike, **overrides: Any) -> PipelineConfig:
    """A :class:`PipelineConfig` from a TOML file of field names (flat, or in any tables), then ``overrides``."""
    import tomllib

    with open(path, "rb") as f:
        raw = tomllib.load(f)
    flat: dict[str, Any] = {}

    def collect(table: dict[str, Any]) -> None:
        for key, value in table.items():
            if isinstance(value, dict):
                collect(value)
            else:
                flat[key.replace("-", "_")] = value

    collect(raw)
    known = {f.name for f in fields(PipelineConfig)}
    unknown = sorted(set(flat) - known)
    if unknown:
        raise ValueError(f"{os.fspath(path)}: unknown keys {unknown}")
    flat.update({k: v for k, v in overrides.items() if v is not None})
    return PipelineConfig(**flat)


# --------------------------------------------------------------------------------------------
# Distributed runtime
# --------------------------------------------------------------------------------------------


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def _process_group(device: torch.device) -> Iterator[None]:
    """Join the ``torchrun`` group (gloo on CPU, NCCL on CUDA) when launched with ``WORLD_SIZE > 1``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        yield
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device cuda was requested but torch sees no CUDA device")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


def _average_gradients(params: Sequence[torch.Tensor]) -> None:
    """What DDP does to gradients: one bucketed rank-mean (nothing on a single process)."""
    with_grad = [p for p in params if p.grad is not None]
    for p, g in zip(with_grad, bucketed_mean([p.grad for p in with_grad])):
        p.grad = g


# --------------------------------------------------------------------------------------------
# Logging and checkpoints
# --------------------------------------------------------------------------------------------


class _RunLog:
    """JSON lines (and optional TensorBoard scalars) on rank 0; other ranks write nothing."""

    def __init__(self, out: str, lines: int, tensorboard: bool, rank: int) -> None:
        self.path = os.path.join(out, "log.jsonl")
        self.rank = rank
        self.lines = lines
        self.writer = None
        if rank != 0:
            return
        # Drop lines written after the checkpoint a resumed run starts from.
        if os.path.exists(self.path):
            with open(self.path) as f:
                kept = f.readlines()[:lines]
            with open(self.path, "w") as f:
                f.writelines(kept)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(out, "tensorboard"))

    def write(self, record: dict[str, Any], step: int | None = None) -> None:
        self.lines += 1
        if self.rank != 0:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None and step is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "stage", "epoch"):
                    self.writer.add_scalar(f"{record['phase']}/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _check_tensorboard() -> None:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise ImportError("tensorboard=True needs the tensorboard package: pip install tensorboard") from None


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclass
class _Splits:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_pretext: torch.Tensor
    num_classes: int
    stats: tuple[torch.Tensor, torch.Tensor]  # per-channel mean, std [1, C, 1, 1] of the downstream images
    pretext_stats: tuple[torch.Tensor, torch.Tensor]  # the same for the pretext images


def _load_data(cfg: PipelineConfig, device: torch.device) -> _Splits:
    for name, root in (("data_root", cfg.data_root), ("pretext_data_root", cfg.pretext_data_root)):
        if root is not None and not os.path.isdir(root):
            raise FileNotFoundError(f"{name} {root!r} does not exist or is not a directory")
    data = load_dataset(cfg.data, cfg.data_root, cfg.image_size)
    test_idx, rest = stratified_split(data.y, cfg.test_per_class, seed=cfg.seed)
    if cfg.val_per_class:
        val_pos, train_pos = stratified_split(data.y[rest], cfg.val_per_class, seed=cfg.seed + 1)
        val_idx, train_idx = rest[val_pos], rest[train_pos]
    else:
        val_idx, train_idx = torch.zeros(0, dtype=torch.long), rest
    mean, std = normalize_stats(data.x[train_idx])
    x = ((data.x - mean) / std).to(device)
    y = data.y.to(device)
    if cfg.pretext_data is not None:
        pre = load_dataset(cfg.pretext_data, cfg.pretext_data_root, cfg.image_size)
        pmean, pstd = normalize_stats(pre.x)
        x_pretext = ((pre.x - pmean) / pstd).to(device)
    else:
        x_pretext, pmean, pstd = x[train_idx], mean, std
    return _Splits(x[train_idx], y[train_idx], x[val_idx], y[val_idx], x[test_idx], y[test_idx], x_pretext,
                   data.num_classes, (mean, std), (pmean, pstd))


def _loader(x: torch.Tensor, y: torch.Tensor | None, batch: int, seed: int) -> TensorLoader:
    """This rank's share of global batches of ``batch`` samples (fewer when the split is smaller)."""
    rank, world = _world()
    batch = min(batch, x.shape[0])
    batch -= batch % world
    if batch < world:
        raise ValueError(f"a split of {x.shape[0]} samples cannot feed {world} processes")
    return TensorLoader(x, y, batch_size=batch // world, seed=seed, rank=rank, world_size=world)


class _Augment:
    """Pretext views and downstream inputs: ``random`` (``data.BatchAugment``), ``paper`` (the
    SimCLR/BYOL views and the fine-tuning crop+flip of :mod:`bissl_fast.augment`) or deterministic
    flips.

    The split tensors are normalized per channel; ``paper`` maps them back to ``[0, 1]``, augments
    there (colour jitter, grayscale and solarize are defined on ``[0, 1]``) and normalizes with the
    same statistics. ``views`` accepts an image batch or an ``(images, labels, ...)`` batch of an
    external loader (labels ignored; with ``paper``, uint8 batches such as those of
    :func:`bissl_fast.datasets.make_loader` are taken as raw images) and moves it to ``device``.
    """

    def __init__(self, mode: str, splits: _Splits, pretext: str, device: torch.device) -> None:
        self.mode, self.device = mode, device
        channels, size = splits.x_train.shape[1], splits.x_train.shape[-1]
        if mode == "paper":
            if channels != 3:
                raise ValueError(f"augment='paper' needs RGB images (colour jitter, grayscale); these have {channels} "
                                 "channel(s): use augment='random'")
            self.stats = tuple(t.to(device) for t in splits.stats)
            self.pretext_stats = tuple(t.to(device) for t in splits.pretext_stats)
            views_norm = augment.Normalize(*(t.flatten().tolist() for t in splits.pretext_stats))
            self.views_aug = (augment.byol_augment(size, normalize=views_norm) if pretext == "byol"
                              else augment.simclr_augment(size, normalize=views_norm))
            self.light = augment.downstream_augment(size, normalize=augment.Normalize(*(t.flatten().tolist() for t in splits.stats)))
        else:
            flip = 0.0 if channels == 1 else 0.5
            self.views_aug = BatchAugment(flip=flip)
            self.light = BatchAugment(scale=(0.8, 1.0), rotation=10.0, jitter=0.1, noise=0.02, flip=flip)

    @staticmethod
    def _unit_range(x: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        mean, std = stats
        return (x * std + mean).clamp(0.0, 1.0)

    def views(self, batch: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
        x = batch if isinstance(batch, torch.Tensor) else batch[0]
        x = x.to(self.device, non_blocking=True)
        if self.mode == "flip":
            return [x, x.flip(-1)]
        if self.mode == "paper" and x.is_floating_point():  # uint8 batches (bissl_fast.datasets) are raw images
            x = self._unit_range(x, self.pretext_stats)
        return self.views_aug.views(x, 2)

    def downstream(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "flip":
            return x
        if self.mode == "paper":
            x = self._unit_range(x, self.stats)
        return self.light(x)


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------


def _autocast(cfg: PipelineConfig) -> contextlib.AbstractContextManager:
    return torch.autocast("cuda", dtype=torch.bfloat16) if cfg.bf16 else contextlib.nullcontext()


def _pretrain(cfg: PipelineConfig, model: ProjectionModel, loader: Any, aug: _Augment, log: _RunLog) -> None:
    """SimCLR / BYOL pretraining: LARS with linear warm-up and cosine to 0.001 x lr, per-view forwards."""
    opt = LARS(model.parameters(), lr=cfg.pretext_lr, weight_decay=cfg.pretext_weight_decay, momentum=0.9, eta=1e-3)
    sched = warmup_cosine(opt, cfg.pretext_warmup_epochs * len(loader), max(cfg.pretext_epochs * len(loader), 1))
    ema = EMATarget([model.backbone, model.head], momentum=cfg.byol_momentum) if cfg.pretext == "byol" else None
    params = list(model.parameters())
    for epoch in range(cfg.pretext_epochs):
        t0, losses = time.perf_counter(), []
        for xb in loader:
            views = aug.views(xb)
            with _autocast(cfg):
                if ema is None:
                    loss = _nt_xent(torch.cat([model(v) for v in views]), cfg.temperature, 2, "auto")
                else:
                    p1, p2 = (model.predictor(model(v)) for v in views)
                    with torch.no_grad():
                        t1, t2 = (ema.modules[1](ema.modules[0](v)) for v in views)
                    loss = _byol_loss(p1, p2, t1, t2, "auto")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            _average_gradients(params)
            lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            if ema is not None:
                ema.update()
            losses.append(float(loss.detach()))
        log.write({"phase": "pretext", "epoch": epoch, "loss": statistics.fmean(losses), "lr": lr,
                   "steps_per_s": len(losses) / (time.perf_counter() - t0)}, step=epoch)


def _train_head(cfg: PipelineConfig, model: Classifier, splits: _Splits, aug: _Augment, log: _RunLog) -> None:
    """The paper's head warm-up: only the linear head learns; the backbone runs in train mode without gradients."""
    loader = _loader(splits.x_train, splits.y_train, cfg.downstream_batch_size, cfg.seed + 2)
    lr = cfg.upper_lr if cfg.warmup_lr is None else cfg.warmup_lr
    weight_decay = cfg.upper_weight_decay if cfg.warmup_weight_decay is None else cfg.warmup_weight_decay
    opt = torch.optim.SGD(model.head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    model.train()
    head_params = list(model.head.parameters())
    for epoch in range(cfg.warmup_epochs):
        losses = []
        for xb, yb in loader:
            with _autocast(cfg):
                with torch.no_grad():
                    feats = model.backbone(aug.downstream(xb))
                loss = F.cross_entropy(model.head(feats), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            _average_gradients(head_params)
            opt.step()
            losses.append(float(loss.detach()))
        log.write({"phase": "warmup", "epoch": epoch, "loss": statistics.fmean(losses), "lr": lr}, step=epoch)


def _make_trainer(
    cfg: PipelineConfig, lower: ProjectionModel, upper: Classifier, splits: _Splits, aug: _Augment, pretext_loader: Any
) -> BiSSLTrainer:
    lower_opt = LARS(lower.parameters(), lr=cfg.lower_lr, weight_decay=cfg.lower_weight_decay, momentum=cfg.lower_momentum, eta=cfg.lower_eta)
    upper_opt = torch.optim.SGD(upper.parameters(), lr=cfg.upper_lr, momentum=cfg.upper_momentum, weight_decay=cfg.upper_weight_decay)
    lower_steps = max(cfg.stages * cfg.lower_iters, 1)
    upper_steps = max(cfg.stages * cfg.upper_iters, 1)
    return BiSSLTrainer(
        lower, upper,
        pretext_loader if pretext_loader is not None else _loader(splits.x_pretext, None, cfg.pretext_batch_size, cfg.seed + 3),
        _loader(splits.x_train, splits.y_train, cfg.downstream_batch_size, cfg.seed + 4),
        lower_opt, upper_opt, cfg.bissl_config(),
        lower_scheduler=warmup_cosine(lower_opt, min(cfg.lower_warmup_steps, lower_steps), lower_steps),
        upper_scheduler=warmup_cosine(upper_opt, 0, upper_steps),
        lower_transform=aug.views,
        upper_transform=aug.downstream,
    )


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> dict[str, float]:
    """Top-1 and top-5 accuracy (fractions) of ``model`` on ``(x, y)`` in eval mode."""
    was_training = model.training
    model.eval()
    top1 = top5 = 0
    for i in range(0, x.shape[0], batch):
        logits = model(x[i : i + batch]).float()
        k = min(5, logits.shape[1])
        best = logits.topk(k, dim=1).indices
        target = y[i : i + batch, None]
        top1 += int((best[:, :1] == target).sum())
        top5 += int((best == target).any(dim=1).sum())
    model.train(was_training)
    n = max(x.shape[0], 1)
    return {"top1": top1 / n, "top5": top5 / n}


def _finetune(
    cfg: PipelineConfig, backbone: nn.Module, feature_dim: int, splits: _Splits, aug: _Augment, *, lr: float,
    weight_decay: float, seed: int, x_eval: torch.Tensor, y_eval: torch.Tensor, log: _RunLog | None = None, name: str = "",
) -> dict[str, float]:
    """Fine-tune a copy of ``backbone`` with a fresh linear head (SGD momentum 0.9, cosine); accuracy on ``(x_eval, y_eval)``."""
    torch.manual_seed(seed)
    model = Classifier(copy.deepcopy(backbone), feature_dim, splits.num_classes).to(splits.x_train.device)
    loader = _loader(splits.x_train, splits.y_train, cfg.finetune_batch_size, 1000 + seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    sched = warmup_cosine(opt, 0, max(cfg.finetune_epochs * len(loader), 1))
    params = list(model.parameters())
    model.train()
    for epoch in range(cfg.finetune_epochs):
        losses = []
        for xb, yb in loader:
            with _autocast(cfg):
                loss = F.cross_entropy(model(aug.downstream(xb)), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            _average_gradients(params)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        if log is not None:
            log.write({"phase": "finetune", "init": name, "seed": seed, "epoch": epoch, "loss": statistics.fmean(losses),
                       "lr": opt.param_groups[0]["lr"]})
    return evaluate(model, x_eval, y_eval)


def _search_space(trials: int, seed: int) -> list[tuple[float, float]]:
    """The paper's random search: lr in [1e-4, 1], weight decay in [1e-5, 1e-2], both log-uniform."""
    gen = random.Random(seed)
    return [(10 ** gen.uniform(-4, 0), 10 ** gen.uniform(-5, -2)) for _ in range(trials)]


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def _fingerprint(cfg: PipelineConfig) -> dict[str, Any]:
    return {k: v for k, v in asdict(cfg).items() if k not in _RUNTIME_FIELDS}


def _load_checkpoint(path: str, cfg: PipelineConfig) -> dict[str, Any] | None:
    if not (cfg.resume and os.path.exists(path)):
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = state["config"]
    changed = sorted(k for k, v in _fingerprint(cfg).items() if saved.get(k) != v)
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
    device = _device(cfg.device)
    if cfg.bf16 and device.type != "cuda":
        raise ValueError("bf16 autocast is a CUDA option; use device cuda or drop --bf16")
    if cfg.tensorboard:
        _check_tensorboard()
    previous_threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        with _process_group(device):
            return _run(cfg, device, pretext_loader, on_checkpoint or (lambda label: None))
    finally:
        torch.set_num_threads(previous_threads)


def _run(cfg: PipelineConfig, device: torch.device, pretext_loader: Any, on_checkpoint: Callable[[str], None]) -> dict[str, Any]:
    rank, world = _world()
    for name in ("pretext_batch_size", "downstream_batch_size", "finetune_batch_size"):
        if getattr(cfg, name) % world:
            raise ValueError(f"{name}={getattr(cfg, name)} is not divisible by the {world} processes")
    splits = _load_data(cfg, device)
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
    log = _RunLog(cfg.out, int(state["log_lines"]), cfg.tensorboard, rank)
    aug = _Augment(cfg.augment, splits, cfg.pretext, device)

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
            loader = pretext_loader if pretext_loader is not None else _loader(splits.x_pretext, None, cfg.pretext_batch_size, cfg.seed + 1)
            _pretrain(cfg, pretext, loader, aug, log)
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
        _train_head(cfg, warm, splits, aug, log)
        state["warm_model"] = warm.state_dict()
        state["done"].append("warmup")
        checkpoint("warmup")

    # 3) BiSSL stages
    lower = copy.deepcopy(pretext)
    upper = copy.deepcopy(warm)
    trainer = _make_trainer(cfg, lower, upper, splits, aug, pretext_loader)
    if "trainer" in state:
        trainer.load_state_dict(state["trainer"])
    else:
        restore_rng()
    bar = progress_bar(cfg.stages - trainer.stage, "BiSSL stages", cfg.progress) if rank == 0 else None
    while trainer.stage < cfg.stages:
        # The learning rates of the stage's first steps (the schedulers move them every step).
        lrs = {"lower_lr": trainer.lower_optimizer.param_groups[0]["lr"], "upper_lr": trainer.upper_optimizer.param_groups[0]["lr"]}
        with _autocast(cfg):
            entry = trainer.train_stage()
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
        for trial, (lr, wd) in enumerate(_search_space(cfg.lr_search_trials, cfg.seed)):
            if trial < len(chosen["search"]):
                continue
            acc = _finetune(cfg, init, feature_dim, splits, aug, lr=lr, weight_decay=wd, seed=cfg.seed,
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
            acc = _finetune(cfg, init, feature_dim, splits, aug, lr=lr, weight_decay=wd, seed=seed,
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
        "bissl": [{k: e[k] for k in ("stage", "lower_loss", "upper_loss", "cg_relative_residuals")} for e in trainer.log],
        "wall_time_s_this_process": time.perf_counter() - t_start,
    }
    if rank == 0:
        with open(os.path.join(cfg.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        torch.save({"bissl_lower_backbone": trainer.lower_model.backbone.state_dict(),
                    "bissl_upper": trainer.upper_model.state_dict()}, os.path.join(cfg.out, "bissl_backbones.pt"))
    log.close()
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """A short table: top-1 / top-5 test accuracy per initialization."""
    lines = [f"{'init':<8} {'top-1 (%)':>16} {'top-5 (%)':>10}  seeds"]
    for name, r in summary["results"].items():
        lines.append(f"{name:<8} {100 * r['top1_mean']:>8.2f} +- {100 * r['top1_std']:<5.2f} {100 * r['top5_mean']:>10.2f}  {len(r['runs'])}")
    return "\n".join(lines)


__all__ = ["FIELD_HELP", "PipelineConfig", "build_parser", "config_from_toml", "evaluate", "format_summary", "main", "run_pipeline"]


# --------------------------------------------------------------------------------------------
# Command line: bissl-fast run
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """``bissl-fast run``: ``--config FILE.toml`` plus one flag per :class:`PipelineConfig` field (flags win)."""

    class OneLineErrors(argparse.ArgumentParser):
        def error(self, message: str) -> None:  # type: ignore[override]
            self.exit(2, f"{self.prog}: error: {message}\n")

    parser = OneLineErrors(
        prog="bissl-fast run",
        description="The BiSSL pipeline: pretext checkpoint -> head warm-up -> BiSSL -> fine-tuning. "
        "Same command for 1 process or N under `torchrun --nproc_per_node=N -m bissl_fast.cli run ...`.",
    )
    parser.add_argument("--config", default=None, help="TOML file of settings (the flag names below, '_' for '-')")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    for f in fields(PipelineConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        if "bool" in kind:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=FIELD_HELP[f.name])
        else:
            parse = int if kind.startswith("int") else float if kind.startswith("float") else str
            parser.add_argument(flag, dest=f.name, type=parse, default=None, metavar=parse.__name__.upper(),
                                help=FIELD_HELP[f.name] + ("" if f.default is None else f" (default {f.default})"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point of ``bissl-fast run``; bad input exits with status 2 and one line on stderr."""
    args = vars(build_parser().parse_args(argv))
    config_path, debug = args.pop("config"), args.pop("debug")
    try:
        if config_path is not None:
            if not os.path.isfile(config_path):
                raise FileNotFoundError(f"config file {config_path!r} does not exist")
            cfg = config_from_toml(config_path, **args)
        else:
            cfg = PipelineConfig(**{k: v for k, v in args.items() if v is not None})
        summary = run_pipeline(cfg)
    except (ValueError, TypeError, OSError, ImportError) as exc:
        if debug:
            raise
        print(f"bissl-fast run: error: {exc}".splitlines()[0], file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_summary(summary))
        print(f"outputs in {cfg.out}: summary.json, log.jsonl, checkpoint.pt, bissl_backbones.pt")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
