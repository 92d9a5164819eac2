"""A replicate of the demo up to its first training step, and its fingerprint.

:func:`prepare_replicate` builds everything a replicate needs before training (splits, normalized data,
augmentations, the initialized pretext model, the pretraining view stream) from one integer seed;
:func:`replicate_fingerprint` records what that set-up computes before training diverges, so that a
committed result can be checked against today's code in seconds (``tests/test_staleness.py``).
"""
from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from ..data.tensors import BatchAugment, ImageDataset, TensorLoader, normalize_stats
from ..ops.byol import byol_loss
from ..ops.nt_xent import nt_xent
from ..train.ema import EMATarget
from ..train.models import PretextModel, SmallResNet


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


def pretrain_target(model: PretextModel, pretext: str) -> EMATarget | None:
    """BYOL's target network at the start of pretraining (a copy of backbone and projector); None for SimCLR."""
    return EMATarget([model.backbone, model.head], momentum=PRETRAIN_BYOL_MOMENTUM) if pretext == "byol" else None


def pretrain_loss(model: PretextModel, target: EMATarget | None, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
    """The pretraining loss of one batch of two views ``[b, C, H, W]``: NT-Xent (tau 0.5), or BYOL against ``target``."""
    h1, h2 = (model.head(model.backbone(v)) for v in (v1, v2))
    if target is None:
        return nt_xent(h1, h2, 0.5)
    t_backbone, t_head = target.modules
    with torch.no_grad():
        t1, t2 = (t_head(t_backbone(v)) for v in (v1, v2))
    return byol_loss(model.predictor(h1), model.predictor(h2), t1, t2)


@dataclass
class ReplicateSetup:
    """A replicate before any training: its splits (normalized with the unlabeled pool's statistics), the
    augmentations, the initialized pretext model and the stream of its pretraining views."""

    data_sha256: str
    splits: Splits
    mean: torch.Tensor
    std: torch.Tensor
    x_unl: torch.Tensor
    x_lab: torch.Tensor
    y_lab: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    view_aug: BatchAugment
    light_aug: BatchAugment
    batch_size: int
    pretext: PretextModel
    feature_dim: int
    pretrain_stream: ViewStream
    pretext_name: str
    pretrain_seed: int


def _sha256(*tensors: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def prepare_replicate(settings: ExperimentSettings, data: ImageDataset, replicate_seed: int, device: torch.device) -> ReplicateSetup:
    """Everything of replicate ``replicate_seed`` up to the first training step (no training)."""
    s = settings
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
    torch.manual_seed(derive_seed(replicate_seed, "init"))
    backbone = SmallResNet(data.x.shape[1], widths=s.widths, blocks=(1,) * len(s.widths)).to(device)
    pretext = PretextModel(backbone, backbone.out_dim, proj_dim=64, hidden_dim=128, predictor=s.pretext == "byol").to(device)
    pretrain_seed = derive_seed(replicate_seed, "pretrain")
    return ReplicateSetup(
        _sha256(data.x, data.y), splits, mean, std, x_unl, x_lab, y_lab, x_val, y_val, x_test, y_test, view_aug, light_aug,
        batch_size, pretext, backbone.out_dim, ViewStream(x_unl, batch_size, view_aug, pretrain_seed), s.pretext,
        pretrain_seed,
    )


def _weighted_checksum(tensors: Sequence[torch.Tensor]) -> list[float]:
    """Float64 (sum, sum of squares, position-weighted sum) over all ``tensors``: a swap of two tensors changes it too."""
    flat = torch.cat([t.detach().double().flatten() for t in tensors])
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64) / flat.numel()
    return [float(flat.sum()), float(flat.square().sum()), float((weights * flat).sum())]


def replicate_fingerprint(setup: ReplicateSetup) -> dict[str, Any]:
    """What the replicate computes before training diverges, to recognise results of other code later.

    Exact hashes of the data and the split indices; float64 checksums (sum, sum of squares) of the
    normalization statistics, the initial pretext parameters and the first pretraining batch's views;
    and the first pretraining step's loss before any update. Computed on copies (a fresh view stream,
    a copy of the model whose BatchNorm statistics the forward may move), so the run itself is unchanged.
    """
    s = setup
    stream = ViewStream(s.x_unl, s.batch_size, s.view_aug, s.pretrain_seed)
    v1, v2 = next(iter(stream))
    model = copy.deepcopy(s.pretext)
    initial = [t for t in model.state_dict().values() if t.is_floating_point()]
    with torch.no_grad():
        first_loss = float(pretrain_loss(model, pretrain_target(model, s.pretext_name), v1, v2))
    return {
        "data_sha256": s.data_sha256,
        "split_sha256": _sha256(s.splits.test, s.splits.val, s.splits.labeled, s.splits.unlabeled),
        "normalize_checksum": _checksum([s.mean, s.std]),
        "init_checksum": _weighted_checksum(initial),
        "first_views_checksum": _checksum([v1, v2]),
        "first_pretrain_loss": first_loss,
    }


#: Floats of a fingerprint may differ by rounding between CPUs (vector widths, summation order); a
#: change of data, split, augmentation, initialization or loss moves them by far more.
FINGERPRINT_RTOL = 1e-5
FINGERPRINT_ATOL = 1e-6


def fingerprint_mismatches(recorded: dict[str, Any], today: dict[str, Any]) -> list[str]:
    """The fields where ``today``'s fingerprint differs from ``recorded`` (hashes exactly, floats to rounding)."""
    wrong = []
    for key, ref in recorded.items():
        now = today.get(key)
        if isinstance(ref, str) or now is None:
            same = ref == now
        else:
            ref_values, now_values = (v if isinstance(v, list) else [v] for v in (ref, now))
            same = len(ref_values) == len(now_values) and all(
                math.isclose(a, b, rel_tol=FINGERPRINT_RTOL, abs_tol=FINGERPRINT_ATOL) for a, b in zip(ref_values, now_values)
            )
        if not same:
            wrong.append(key)
    return wrong + sorted(set(today) - set(recorded))


__all__ = ["FINGERPRINT_ATOL", "FINGERPRINT_RTOL", "ExperimentSettings", "ReplicateSetup", "Splits", "ViewStream", "derive_seed", "fingerprint_mismatches", "prepare_replicate",
           "pretrain_loss", "pretrain_target", "replicate_fingerprint", "split_indices"]
