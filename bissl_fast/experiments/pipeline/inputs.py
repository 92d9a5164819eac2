"""The pipeline's inputs: the labeled splits (train / validation / held-out test) and the pretext images,
their loaders (this rank's share of each global batch), and the pretext views and downstream augmentation."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ...data import augment
from ...data.tensors import (
    BatchAugment,
    ImageDataset,
    TensorLoader,
    load_dataset,
    normalize_stats,
    stratified_split,
)
from .config import PipelineConfig
from .runtime import rank_and_world


@dataclass
class Splits:
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
    fingerprint: dict[str, Any] = field(default_factory=dict)  # what a resume checks: see data_fingerprint


def _folder_summary(root: str) -> dict[str, list[int]]:
    """``[files, bytes, newest mtime in ns]`` under each top-level entry of ``root`` (the class folders of an image folder)."""
    summary = {}
    for entry in sorted(os.listdir(root)):
        path = os.path.join(root, entry)
        files = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, names in os.walk(path) for f in names]
        stats = [os.stat(f) for f in files]
        summary[entry] = [len(stats), sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)]
    return summary


def data_fingerprint(data: ImageDataset, root: str | None) -> dict[str, Any]:
    """Content hashes of the loaded images and labels (what the result depends on), and the files of ``root``
    per class folder (what :func:`data_change` names when the hashes differ)."""
    def digest(t: torch.Tensor) -> str:
        return hashlib.blake2b(t.contiguous().numpy(), digest_size=16).hexdigest()

    return {"images": digest(data.x), "labels": digest(data.y), "shape": list(data.x.shape),
            "folders": {} if root is None else _folder_summary(root)}


def data_change(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """How the data of ``current`` differs from ``saved`` (two :func:`data_fingerprint`), or ``None`` if it does not."""
    if all(saved[k] == current[k] for k in ("images", "labels", "shape")):
        return None
    before, now = saved["folders"], current["folders"]
    changes = []
    for name in sorted(set(before) | set(now)):
        if name not in now:
            changes.append(f"{name!r} is gone")
        elif name not in before:
            changes.append(f"{name!r} is new")
        elif now[name][0] != before[name][0]:
            changes.append(f"{name!r} has {now[name][0]} files, had {before[name][0]}")
        elif now[name] != before[name]:
            changes.append(f"files in {name!r} changed")
    if not changes:
        return f"other images were loaded ({current['shape'][0]} now, {saved['shape'][0]} before)"
    shown = ", ".join(changes[:3])
    return shown + (f" and {len(changes) - 3} more changes" if len(changes) > 3 else "")


def load_splits(cfg: PipelineConfig, device: torch.device) -> Splits:
    for name, root in (("data_root", cfg.data_root), ("pretext_data_root", cfg.pretext_data_root)):
        if root is not None and not os.path.isdir(root):
            raise FileNotFoundError(f"{name} {root!r} does not exist or is not a directory")
    data = load_dataset(cfg.data, cfg.data_root, cfg.image_size)
    _check_class_sizes(cfg, data)
    test_idx, rest = stratified_split(data.y, cfg.test_per_class, seed=cfg.seed)
    if cfg.val_per_class:
        val_pos, train_pos = stratified_split(data.y[rest], cfg.val_per_class, seed=cfg.seed + 1)
        val_idx, train_idx = rest[val_pos], rest[train_pos]
    else:
        val_idx, train_idx = torch.zeros(0, dtype=torch.long), rest
    mean, std = normalize_stats(data.x[train_idx])
    x = ((data.x - mean) / std).to(device)
    y = data.y.to(device)
    fingerprint = {"data": data_fingerprint(data, cfg.data_root)}
    if cfg.pretext_data is not None:
        pre = load_dataset(cfg.pretext_data, cfg.pretext_data_root, cfg.image_size)
        fingerprint["pretext_data"] = data_fingerprint(pre, cfg.pretext_data_root)
        pmean, pstd = normalize_stats(pre.x)
        x_pretext = ((pre.x - pmean) / pstd).to(device)
    else:
        x_pretext, pmean, pstd = x[train_idx], mean, std
    return Splits(x[train_idx], y[train_idx], x[val_idx], y[val_idx], x[test_idx], y[test_idx], x_pretext,
                  data.num_classes, (mean, std), (pmean, pstd), fingerprint)


def _check_class_sizes(cfg: PipelineConfig, data: ImageDataset) -> None:
    """Every class must keep at least one training image after its test and validation images are taken."""
    taken = cfg.test_per_class + cfg.val_per_class
    for label, count in enumerate(torch.bincount(data.y, minlength=data.num_classes).tolist()):
        if count <= taken:
            kind = "class folder" if cfg.data == "imagefolder" else "class"
            raise ValueError(
                f"{kind} {data.classes[label]!r} has {count} images, and the splits take {cfg.test_per_class} for testing "
                f"and {cfg.val_per_class} for validation, leaving {max(count - taken, 0)} for training; lower "
                "--test-per-class / --val-per-class (test_per_class / val_per_class)")


def make_loader(x: torch.Tensor, y: torch.Tensor | None, batch: int, seed: int) -> TensorLoader:
    """This rank's share of global batches of ``batch`` samples (fewer when the split is smaller)."""
    rank, world = rank_and_world()
    batch = min(batch, x.shape[0])
    batch -= batch % world
    if batch < world:
        raise ValueError(f"a split of {x.shape[0]} samples cannot feed {world} processes")
    return TensorLoader(x, y, batch_size=batch // world, seed=seed, rank=rank, world_size=world)


class Augment:
    """Pretext views and downstream inputs: ``random`` (``data.BatchAugment``), ``paper`` (the
    SimCLR/BYOL views and the fine-tuning crop+flip of :mod:`bissl_fast.data.augment`) or deterministic
    flips.

    The split tensors are normalized per channel; ``paper`` maps them back to ``[0, 1]``, augments
    there (colour jitter, grayscale and solarize are defined on ``[0, 1]``) and normalizes with the
    same statistics. ``views`` accepts an image batch or an ``(images, labels, ...)`` batch of an
    external loader (labels ignored; with ``paper``, uint8 batches such as those of
    :func:`bissl_fast.data.datasets.make_loader` are taken as raw images) and moves it to ``device``.
    """

    def __init__(self, mode: str, splits: Splits, pretext: str, device: torch.device) -> None:
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
        if self.mode == "paper" and x.is_floating_point():  # uint8 batches (bissl_fast.data.datasets) are raw images
            x = self._unit_range(x, self.pretext_stats)
        return self.views_aug.views(x, 2)

    def downstream(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "flip":
            return x
        if self.mode == "paper":
            x = self._unit_range(x, self.stats)
        return self.light(x)


__all__ = ["Augment", "Splits", "data_change", "data_fingerprint", "load_splits", "make_loader"]
