"""Map-style datasets that read images from disk, and a real ``DataLoader`` for them.

- :class:`ImageFolderDataset` -- ``root/<class>/<image>``; the file list is scanned once, each image
  is decoded on access (Pillow, an optional extra) and resized to a fixed size;
- :class:`CIFAR10Dataset` -- the python-version pickles (``cifar-10-batches-py``), held as uint8.

Both yield ``(image, label)`` with ``image`` a ``uint8`` tensor ``[C, H, W]`` and ``label`` an int, so
a batch is ``(uint8 [B, C, H, W], int64 [B])``: four times less to copy than float32. Move the batch
to the device first and augment there; the augmentations of :mod:`bissl_fast.data.augment` take uint8
batches (as float / 255)::

    loader = make_loader(CIFAR10Dataset(root), 256, shuffle=True, seed=0, workers=4, drop_last=True)
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        view1, view2 = aug.views(x, 2)

:func:`make_loader` shards with a ``DistributedSampler`` when ``torch.distributed`` is initialized;
then call ``loader.sampler.set_epoch(epoch)`` before each pass (the BiSSL trainer does).
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .._validation import check_int_at_least, check_size_pair
from .tensors import CIFAR10_CLASSES, IMAGE_EXTENSIONS, read_cifar10


def _existing_dir(root: str | os.PathLike) -> str:
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data folder {root!r} does not exist or is not a directory")
    return root


class ImageFolderDataset(Dataset):
    """Images in ``root/<class>/<image>``, decoded lazily to uint8 ``[channels, height, width]``.

    Classes are the sorted subfolder names (label = index); files with an extension in
    ``extensions`` count as images. ``size`` (int or ``(height, width)``) is the fixed output size;
    ``resize="stretch"`` resizes the whole image to it (aspect ratio not kept), ``"center_crop"``
    scales the shorter side to fit and cuts the centre. Resampling is Pillow's bilinear (antialiased).
    ``channels`` is 3 (RGB) or 1 (luma).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        size: int | Sequence[int],
        *,
        channels: int = 3,
        resize: str = "stretch",
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
    ) -> None:
        try:
            from PIL import Image  # noqa: F401
        except ImportError as exc:
            raise ImportError("ImageFolderDataset needs Pillow (optional extra): pip install pillow") from exc
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        if resize not in ("stretch", "center_crop"):
            raise ValueError(f"resize must be 'stretch' or 'center_crop', got {resize!r}")
        self.size = check_size_pair(size)
        self.channels, self.resize = channels, resize
        self.root = _existing_dir(root)
        extensions = tuple(e.lower() for e in extensions)
        self.classes = sorted(
            d for d in os.listdir(self.root) if os.path.isdir(os.path.join(self.root, d)) and not d.startswith(".")
        )
        if not self.classes:
            raise ValueError(f"image folder {self.root!r} has no class subfolders (expected root/<class>/<image>)")
        self.samples: list[tuple[str, int]] = []
        for label, cls in enumerate(self.classes):
            folder = os.path.join(self.root, cls)
            files = sorted(f for f in os.listdir(folder) if f.lower().endswith(extensions))
            if not files:
                raise ValueError(f"class folder {folder!r} contains no images with extensions {extensions}")
            self.samples.extend((os.path.join(folder, f), label) for f in files)
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def _fit(self, img: Any) -> Any:
        from PIL import Image

        height, width = self.size
        if self.resize == "stretch":
            return img.resize((width, height), Image.BILINEAR)
        grow = max(height / img.height, width / img.width)
        scaled_w, scaled_h = max(width, round(img.width * grow)), max(height, round(img.height * grow))
        img = img.resize((scaled_w, scaled_h), Image.BILINEAR)
        left, top = (scaled_w - width) // 2, (scaled_h - height) // 2
        return img.crop((left, top, left + width, top + height))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """``(uint8 [channels, height, width], label)``."""
        from PIL import Image, UnidentifiedImageError

        path, label = self.samples[index]
        try:
            with Image.open(path) as img:
                img = self._fit(img.convert("L" if self.channels == 1 else "RGB"))
                array = np.array(img, dtype=np.uint8)
        except (OSError, UnidentifiedImageError) as exc:
            raise ValueError(f"cannot read image {path!r}: {exc}") from exc
        image = torch.from_numpy(array)
        image = image.unsqueeze(0) if self.channels == 1 else image.permute(2, 0, 1).contiguous()
        return image, label

    def __repr__(self) -> str:
        return f"ImageFolderDataset({self.root!r}, {len(self)} images, {len(self.classes)} classes, size={self.size})"


class CIFAR10Dataset(Dataset):
    """CIFAR-10 from ``root/cifar-10-batches-py`` (or that folder itself): uint8 ``[3, 32, 32]`` and labels.

    ``train=True`` reads ``data_batch_1..5`` (50000 images), ``train=False`` ``test_batch`` (10000).
    The pickles hold whole batches, so the split is read once at construction (150 MB as uint8 for
    the training split, shared with forked loader workers); nothing is downloaded.
    """

    def __init__(self, root: str | os.PathLike, train: bool = True) -> None:
        images, labels, classes = read_cifar10(_existing_dir(root), train)
        self.data = images
        self.targets = labels.tolist()
        self.train = bool(train)
        self.classes = classes

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """``(uint8 [3, 32, 32], label)``."""
        return torch.from_numpy(self.data[index].copy()), self.targets[index]

    def __repr__(self) -> str:
        return f"CIFAR10Dataset({'train' if self.train else 'test'}, {len(self)} images)"


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    workers: int = 0,
    pin_memory: bool | None = None,
    drop_last: bool,
    distributed: bool | None = None,
    num_replicas: int | None = None,
    rank: int | None = None,
) -> DataLoader:
    """A ``DataLoader`` over a map-style ``dataset`` with ``batch_size`` samples per batch (per rank).

    - ``shuffle``: a new order every pass, all drawn from one generator seeded with ``seed`` (the
      loader's ``generator``, which also seeds workers; the trainer checkpoints it);
    - ``workers``: loader processes, started for each pass. Not persistent: a persistent pool skips
      the per-pass seed draw, so the order of later passes would depend on ``workers`` and a resumed
      run (fresh pool) would not replay the order of the interrupted one;
    - ``pin_memory``: page-locked batches for fast ``.to("cuda", non_blocking=True)``; default: when
      CUDA is available;
    - ``distributed``: shard with a ``DistributedSampler`` (each rank ``batch_size`` samples of a
      disjoint slice, order from ``seed`` and the epoch: call ``loader.sampler.set_epoch(epoch)``
      before each pass); default: when ``torch.distributed`` is initialized. ``num_replicas`` and
      ``rank`` default to the process group's;
    - ``drop_last``: drop the last incomplete batch (and, distributed, the tail that does not split
      evenly over ranks instead of padding it with repeats).

    Batches are whatever the dataset's items collate to: ``(uint8 [B, C, H, W], int64 [B])`` for the
    datasets of this module.
    """
    if not isinstance(dataset, Dataset) or not hasattr(dataset, "__len__"):
        raise TypeError(f"dataset must be a map-style torch.utils.data.Dataset with __len__, got {type(dataset).__name__}")
    check_int_at_least("batch_size", batch_size, 1)
    check_int_at_least("workers", workers, 0)
    check_int_at_least("seed", seed, 0)
    for name, flag in (("shuffle", shuffle), ("drop_last", drop_last)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    size = len(dataset)
    if size == 0:
        raise ValueError("dataset is empty")
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    elif pin_memory and not torch.cuda.is_available():
        raise ValueError("pin_memory=True needs CUDA, which is not available here (leave pin_memory=None for auto)")
    if distributed is None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    generator = torch.Generator().manual_seed(seed)
    sampler = None
    per_rank = size
    if distributed:
        group_ready = torch.distributed.is_available() and torch.distributed.is_initialized()
        if not group_ready and (num_replicas is None or rank is None):
            raise ValueError("distributed=True needs an initialized torch.distributed process group, or num_replicas and rank")
        sampler = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        per_rank = sampler.num_samples
    elif num_replicas is not None or rank is not None:
        raise ValueError("num_replicas and rank are only used with distributed sampling (distributed=True)")
    if drop_last and per_rank < batch_size:
        raise ValueError(
            f"dataset has {per_rank} samples per rank, fewer than one batch of {batch_size}: "
            "with drop_last=True the loader would yield nothing"
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else None,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        generator=generator,
    )


__all__: Sequence[str] = ["CIFAR10_CLASSES", "CIFAR10Dataset", "ImageFolderDataset", "make_loader"]
