"""Image datasets and batched augmentations for the BiSSL trainer and demo (no torchvision).

Readers return an :class:`ImageDataset` of float images in ``[0, 1]`` with shape ``[N, C, H, W]``
and int64 labels:

- :func:`load_digits` -- scikit-learn's 8x8 handwritten digits (1797 images, 10 classes, shipped
  with scikit-learn, nothing downloaded), optionally upsampled;
- :func:`load_cifar10` -- the torchvision on-disk format (``cifar-10-batches-py/data_batch_*``
  pickles), read with ``pickle`` + numpy;
- :func:`load_imagefolder` -- one subfolder per class, images read with Pillow.

:class:`BatchAugment` draws SimCLR-style views on whole batches in one ``affine_grid`` /
``grid_sample`` call (random resized crop, translation, rotation, optional horizontal flip) plus
brightness/contrast jitter and Gaussian noise. :class:`TensorLoader` is an in-memory, shardable,
resumable batch iterator: its order depends only on ``(seed, epoch)`` so ``state_dict`` is two ints.
"""
from __future__ import annotations

import math
import os
import pickle
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .._validation import check_float_tensor, check_int_at_least, check_nonnegative

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class ImageDataset:
    """Images ``x`` (float32 ``[N, C, H, W]`` in ``[0, 1]``), labels ``y`` (int64 ``[N]``), class names."""

    x: torch.Tensor
    y: torch.Tensor
    classes: list[str]
    name: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _resize(x: torch.Tensor, size: int | None) -> torch.Tensor:
    if size is None or (x.shape[-2] == size and x.shape[-1] == size):
        return x
    check_int_at_least("size", size, 4)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)


def load_digits(size: int | None = 16) -> ImageDataset:
    """scikit-learn digits: 1797 grayscale images ``[1797, 1, size, size]`` (``size=None`` keeps 8x8)."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is a demo/test dependency
        raise ImportError("the digits dataset needs scikit-learn: `pip install scikit-learn`") from exc
    bunch = sk_load_digits()
    # Pixel values are integers 0..16.
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    return ImageDataset(_resize(x, size), y, [str(c) for c in range(10)], "digits")


def _cifar_dir(root: str | os.PathLike) -> str:
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data_root {root!r} does not exist or is not a directory")
    nested = os.path.join(root, "cifar-10-batches-py")
    return nested if os.path.isdir(nested) else root


def _read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise ValueError(f"{path!r} is not a readable CIFAR-10 batch pickle: {exc}") from exc
    if not isinstance(entry, dict):
        raise ValueError(f"{path!r} is not a CIFAR-10 batch: expected a dict, got {type(entry).__name__}")
    data = entry.get(b"data", entry.get("data"))
    labels = entry.get(b"labels", entry.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{path!r} is not a CIFAR-10 batch: missing 'data' or 'labels'")
    data = np.asarray(data)
    labels = np.asarray(labels, dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{path!r} is not a CIFAR-10 batch: data must be [N, 3072] with N labels, "
            f"got data {data.shape} and {labels.shape[0]} labels"
        )
    return data, labels


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def read_cifar10(root: str | os.PathLike, train: bool = True) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The CIFAR-10 python pickles under ``root`` (``cifar-10-batches-py`` or its parent): uint8
    ``[N, 3, 32, 32]`` images, int64 ``[N]`` labels in 0..9 and the class names (from
    ``batches.meta`` when present). ``train`` reads ``data_batch_1..5``, else ``test_batch``."""
    folder = _cifar_dir(root)
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 folder {folder!r} lacks {missing}; expected the python-version archive "
            "(cifar-10-python.tar.gz) extracted there"
        )
    parts = [_read_cifar_batch(os.path.join(folder, n)) for n in names]
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"CIFAR-10 labels must be in 0..9, got range {labels.min()}..{labels.max()}")
    classes = list(CIFAR10_CLASSES)
    meta = os.path.join(folder, "batches.meta")
    if os.path.isfile(meta):
        with open(meta, "rb") as f:
            names_meta = pickle.load(f, encoding="bytes").get(b"label_names")
        if names_meta and len(names_meta) == 10:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names_meta]
    images = np.ascontiguousarray(data.astype(np.uint8, copy=False).reshape(-1, 3, 32, 32))
    return images, labels.astype(np.int64), classes


def load_cifar10(root: str | os.PathLike, train: bool = True, size: int | None = None) -> ImageDataset:
    """CIFAR-10 from the torchvision layout: ``root/cifar-10-batches-py/{data_batch_1..5, test_batch}``.

    ``root`` may also be the ``cifar-10-batches-py`` folder itself. Returns ``[N, 3, 32, 32]``
    images (resized to ``size`` when given). Nothing is downloaded.
    """
    images, labels, classes = read_cifar10(root, train)
    x = torch.from_numpy(images.astype(np.float32) / 255.0)
    return ImageDataset(_resize(x, size), torch.from_numpy(labels), classes, "cifar10")


def load_imagefolder(root: str | os.PathLike, size: int | None = None, channels: int = 3) -> ImageDataset:
    """Images in ``root/<class>/<image>`` (Pillow), as ``[N, channels, size, size]`` in ``[0, 1]``.

    ``channels`` is 1 (grayscale) or 3 (RGB). Without ``size`` every image must have the size of the
    first one; with it, each image is resized (bilinear) to ``size x size``.
    """
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as exc:  # pragma: no cover - Pillow is a demo/test dependency
        raise ImportError("the imagefolder dataset needs Pillow: `pip install pillow`") from exc
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data_root {root!r} does not exist or is not a directory")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if not classes:
        raise ValueError(f"image folder {root!r} has no class subfolders (expected root/<class>/<image>)")
    images: list[np.ndarray] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        folder = os.path.join(root, cls)
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise ValueError(f"class folder {folder!r} contains no images with extensions {IMAGE_EXTENSIONS}")
        for name in files:
            path = os.path.join(folder, name)
            try:
                with Image.open(path) as img:
                    img = img.convert("L" if channels == 1 else "RGB")
                    if size is not None:
                        img = img.resize((size, size), Image.BILINEAR)
                    arr = np.asarray(img, dtype=np.float32) / 255.0
            except (OSError, UnidentifiedImageError) as exc:
                raise ValueError(f"cannot read image {path!r}: {exc}") from exc
            if images and arr.shape != images[0].shape:
                raise ValueError(
                    f"image {path!r} has shape {arr.shape[:2]} but the first image has {images[0].shape[:2]}; "
                    "pass size=... to resize all images"
                )
            images.append(arr)
            labels.append(label)
    x = torch.from_numpy(np.stack(images))
    x = x.unsqueeze(1) if channels == 1 else x.permute(0, 3, 1, 2).contiguous()
    return ImageDataset(x, torch.tensor(labels, dtype=torch.int64), classes, "imagefolder")


def load_dataset(name: str, root: str | os.PathLike | None = None, size: int | None = None) -> ImageDataset:
    """Dispatch on ``name``: ``"digits"`` (``size`` default 16), ``"cifar10"`` / ``"imagefolder"`` (need ``root``)."""
    if name == "digits":
        return load_digits(16 if size is None else size)
    if name in ("cifar10", "imagefolder"):
        if root is None:
            raise ValueError(f"data={name!r} needs a data root folder (--data-root DIR)")
        if name == "cifar10":
            return load_cifar10(root, train=True, size=size)
        return load_imagefolder(root, size=size)
    raise ValueError(f"unknown dataset {name!r}; expected 'digits', 'cifar10' or 'imagefolder'")


def stratified_split(y: torch.Tensor, per_class: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(chosen, rest)``: ``per_class`` random samples of each class, and all others."""
    check_int_at_least("per_class", per_class, 1)
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        if idx.numel() <= per_class:
            raise ValueError(f"class {c} has {idx.numel()} samples, need more than per_class={per_class}")
        chosen.append(idx[torch.randperm(idx.numel(), generator=gen)[:per_class]])
    chosen_idx = torch.cat(chosen).sort().values
    mask = torch.ones(y.numel(), dtype=torch.bool)
    mask[chosen_idx] = False
    return chosen_idx, torch.nonzero(mask).flatten()


class BatchAugment:
    """Random SimCLR-style augmentation of a whole batch ``[B, C, H, W]`` at once.

    Per sample: random resized crop (area fraction in ``scale``, aspect ratio in ``ratio``), a
    translation of up to ``translate`` (fraction of the image), a rotation of up to
    ``rotation`` degrees, a horizontal flip with probability ``flip`` (leave 0 for digits, whose
    mirror images are different symbols), then brightness/contrast jitter of relative size
    ``jitter`` and Gaussian noise with std ``noise``. All geometric parts are one affine map, so
    the batch is resampled once with ``grid_sample``. Randomness comes from ``generator`` when
    given, else from torch's global generator (which the trainer checkpoints).
    """

    def __init__(
        self,
        scale: tuple[float, float] = (0.5, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        translate: float = 0.1,
        rotation: float = 15.0,
        flip: float = 0.0,
        jitter: float = 0.2,
        noise: float = 0.05,
    ) -> None:
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        if not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
        if not 0 <= flip <= 1:
            raise ValueError(f"flip is a probability in [0, 1], got {flip}")
        self.scale = scale
        self.ratio = ratio
        self.translate = check_nonnegative("translate", translate)
        self.rotation = check_nonnegative("rotation", rotation)
        self.flip = float(flip)
        self.jitter = check_nonnegative("jitter", jitter)
        self.noise = check_nonnegative("noise", noise)

    def _uniform(self, n: int, low: float, high: float, gen: torch.Generator | None, device: torch.device) -> torch.Tensor:
        return torch.rand(n, generator=gen, device=device) * (high - low) + low

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One augmented copy of ``x`` (``[B, C, H, W]``), same shape and dtype."""
        check_float_tensor("x", x, ndim=4)
        b, dev = x.shape[0], x.device
        gen = generator
        area = self._uniform(b, *self.scale, gen, dev)
        log_r = self._uniform(b, math.log(self.ratio[0]), math.log(self.ratio[1]), gen, dev)
        aspect = torch.exp(log_r)
        # Crop side lengths as fractions of the image; affine_grid maps output [-1, 1] to these.
        sx = torch.sqrt(area * aspect).clamp(max=1.0)
        sy = torch.sqrt(area / aspect).clamp(max=1.0)
        # Crop centre anywhere that keeps the crop inside, plus the extra translation.
        tx = (1 - sx) * self._uniform(b, -1.0, 1.0, gen, dev) + self._uniform(b, -1.0, 1.0, gen, dev) * 2 * self.translate
        ty = (1 - sy) * self._uniform(b, -1.0, 1.0, gen, dev) + self._uniform(b, -1.0, 1.0, gen, dev) * 2 * self.translate
        angle = self._uniform(b, -1.0, 1.0, gen, dev) * math.radians(self.rotation)
        flip = torch.where(torch.rand(b, generator=gen, device=dev) < self.flip, -1.0, 1.0)
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack(
            [
                torch.stack([cos * sx * flip, -sin * sy, tx], dim=1),
                torch.stack([sin * sx * flip, cos * sy, ty], dim=1),
            ],
            dim=1,
        ).to(x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if self.jitter > 0:
            brightness = self._uniform(b, -self.jitter, self.jitter, gen, dev).to(x.dtype).view(b, 1, 1, 1)
            contrast = self._uniform(b, 1 - self.jitter, 1 + self.jitter, gen, dev).to(x.dtype).view(b, 1, 1, 1)
            mean = out.mean(dim=(1, 2, 3), keepdim=True)
            out = (out - mean) * contrast + mean + brightness
        if self.noise > 0:
            out = out + self.noise * torch.randn(out.shape, generator=gen, device=dev, dtype=out.dtype)
        return out

    def views(self, x: torch.Tensor, count: int = 2, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """``count`` independent augmentations of ``x`` (the views of a SimCLR/BYOL batch)."""
        check_int_at_least("count", count, 1)
        return [self(x, generator) for _ in range(count)]


class TensorLoader:
    """Shuffled mini-batches ``(x[idx], y[idx])`` of in-memory tensors; resumable and shardable.

    Epoch ``e`` visits ``randperm(N)`` drawn from a generator seeded with ``seed + e`` (or ``0..N-1``
    without ``shuffle``), cut into global batches of ``batch_size * world_size`` samples, the
    incomplete last one dropped. Rank ``r`` gets rows ``r*batch_size:(r+1)*batch_size`` of each
    global batch, so ``world_size`` processes together see exactly the batches of one process with
    ``batch_size * world_size``. Iterating continues from the current position; ``state_dict()``
    is ``{"epoch", "position"}``, and one ``iter()`` pass ends at the end of an epoch.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        batch_size: int = 64,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        check_float_tensor("x", x)
        if y is not None and (not isinstance(y, torch.Tensor) or y.shape[:1] != x.shape[:1]):
            raise ValueError(f"y must be a tensor with {x.shape[0]} rows like x, got {getattr(y, 'shape', y)}")
        self.batch_size = check_int_at_least("batch_size", batch_size, 1)
        self.world_size = check_int_at_least("world_size", world_size, 1)
        self.rank = check_int_at_least("rank", rank, 0)
        if self.rank >= self.world_size:
            raise ValueError(f"rank must be < world_size={world_size}, got {rank}")
        if x.shape[0] < batch_size * world_size:
            raise ValueError(f"x has {x.shape[0]} samples, fewer than one global batch ({batch_size} x {world_size} ranks)")
        self.x, self.y, self.shuffle, self.seed = x, y, shuffle, int(seed)
        self.epoch = 0
        self.position = 0

    def __len__(self) -> int:
        return self.x.shape[0] // (self.batch_size * self.world_size)

    def _order(self) -> torch.Tensor:
        n = self.x.shape[0]
        if not self.shuffle:
            return torch.arange(n)
        return torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch))

    def __iter__(self) -> Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        order = self._order()
        global_batch = self.batch_size * self.world_size
        while self.position < len(self):
            start = self.position * global_batch + self.rank * self.batch_size
            idx = order[start : start + self.batch_size]
            self.position += 1
            yield self.x[idx] if self.y is None else (self.x[idx], self.y[idx])
        self.epoch += 1
        self.position = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])


def normalize_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of ``x`` ``[N, C, H, W]``, shaped ``[1, C, 1, 1]`` for broadcasting."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    std = x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return mean, std


__all__: Sequence[str] = [
    "CIFAR10_CLASSES",
    "BatchAugment",
    "ImageDataset",
    "TensorLoader",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_imagefolder",
    "normalize_stats",
    "read_cifar10",
    "stratified_split",
]
