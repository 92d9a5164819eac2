"""Data: datasets, loaders and batched augmentations on any device.

- :mod:`.datasets`: lazily decoded image folders and CIFAR-10 as ``torch.utils.data`` datasets, and
  :func:`~.datasets.make_loader` (seeded shuffling, workers, ``DistributedSampler``);
- :mod:`.tensors`: small datasets held in memory as tensors (digits, CIFAR-10, image folders),
  stratified splits, per-channel statistics, :class:`~.tensors.TensorLoader` and the light
  :class:`~.tensors.BatchAugment`;
- :mod:`.augment`: the SimCLR / BYOL / fine-tuning augmentations with per-image random parameters,
  built on the image operations and random draws of :mod:`.functional`.

Imports the library core's validation helpers only.
"""
from .._lazy import lazy_submodules

__getattr__, __dir__ = lazy_submodules(__name__, ("augment", "datasets", "functional", "tensors"))
