"""Batched SimCLR/BYOL view augmentations on image tensors, on any device, without torchvision.

Every augmentation is a callable ``aug(x, generator=None) -> x'`` on an image batch ``x`` of shape
``[B, C, H, W]`` (``C`` is 1 or 3) with a ``views(x, count=2, generator=None) -> list[Tensor]``
method, and draws its random parameters **per sample** in one batched call:

- input: float images with values in ``[0, 1]`` (or ``uint8`` images, converted to float32 / 255
  first); outputs stay in ``[0, 1]`` until :class:`Normalize`, which must come last;
- randomness: from ``generator`` when given (a CPU generator also drives a batch on the GPU: the few
  per-sample parameters are drawn on the generator's device and moved), else from torch's default
  generator of the batch's device; the same generator seed gives the same output;
- the semantics follow torchvision's transforms v2 applied image by image (documented deviations:
  grayscale uses the exact ITU-R 601 luma weights 0.299/0.587/0.114, torchvision 0.2989 for R).

Values are not checked for the ``[0, 1]`` range: that would synchronize the device on every call.

Presets (``docs/design.md §2.5``): :func:`simclr_augment`, :func:`byol_augment` (asymmetric
blur/solarize per view) and :func:`downstream_augment`.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Callable, NamedTuple, Protocol, Sequence

import torch

from .._validation import check_int_at_least, check_size_pair
from .functional import (
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    as_float_images,
    blur_kernel_size,
    check_channels,
    check_range,
    gaussian_blur,
    random_flags,
    random_uniform,
    random_uniform01,
    resized_crop,
    rgb_to_grayscale,
    sample_crop_boxes,
    solarize,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class Augmentation(Protocol):
    """What the trainer and the pipeline call: one augmented copy, or ``count`` views."""

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor: ...

    def views(self, x: torch.Tensor, count: int = 2, generator: torch.Generator | None = None) -> list[torch.Tensor]: ...


def _check_probability(name: str, p: float) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} is a probability in [0, 1], got {p!r}")
    return float(p)


class _Op(ABC):
    """Shared ``views``: ``count`` independent draws of the same augmentation."""

    @abstractmethod
    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One augmented copy of ``x`` ``[B, C, H, W]``."""

    def views(self, x: torch.Tensor, count: int = 2, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """``count`` independent augmentations of ``x`` ``[B, C, H, W]``, each ``[B, C, H', W']``."""
        check_int_at_least("count", count, 1)
        return [self(x, generator) for _ in range(count)]


class RandomResizedCrop(_Op):
    """Random crop of area fraction in ``scale`` and aspect ratio ``w / h`` in ``ratio``, resized to ``size``.

    torchvision's ``RandomResizedCrop`` per sample (boxes from :func:`sample_crop_boxes`), bilinear,
    antialiased by default like torchvision v2. ``flip_p`` > 0 also mirrors each output with that
    probability inside the same resampling (same result as a following :class:`RandomHorizontalFlip`).
    ``[B, C, H, W]`` -> ``[B, C, size_h, size_w]``.
    """

    def __init__(
        self,
        size: int | Sequence[int],
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        antialias: bool = True,
        flip_p: float = 0.0,
    ) -> None:
        self.size = check_size_pair(size)
        self.scale = check_range("scale", scale, 0.0, 1.0)
        self.ratio = check_range("ratio", ratio, 0.0)
        self.antialias = bool(antialias)
        self.flip_p = _check_probability("flip_p", flip_p)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = as_float_images(x)
        b, _, height, width = x.shape
        boxes = sample_crop_boxes(b, height, width, self.scale, self.ratio, generator, x.device)
        flip = random_flags(b, self.flip_p, generator, x.device) if self.flip_p > 0 else None
        return resized_crop(x, boxes, self.size, flip, self.antialias)

    def __repr__(self) -> str:
        return f"RandomResizedCrop(size={self.size}, scale={self.scale}, ratio={self.ratio}, antialias={self.antialias}, flip_p={self.flip_p})"


class RandomHorizontalFlip(_Op):
    """Mirror each image left-right with probability ``p``. ``[B, C, H, W]`` -> same shape."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = _check_probability("p", p)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = as_float_images(x)
        flip = random_flags(x.shape[0], self.p, generator, x.device)
        return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


def _subset_on_device(device: torch.device) -> bool:
    """Whether to process data-dependent subsets of a batch (cheaper; synchronizes a GPU, so CPU only)."""
    return device.type == "cpu"


class JitterParams(NamedTuple):
    """Per-image colour-jitter draws, each ``[B]`` except ``order`` ``[B, 4]``.

    ``applied``: whether the image is jittered at all; ``order``: a permutation of
    (0 brightness, 1 contrast, 2 saturation, 3 hue), applied left to right; the three factors and the
    hue shift.
    """

    applied: torch.Tensor
    order: torch.Tensor
    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor


class ColorJitter(_Op):
    """With probability ``p`` per image, jitter brightness, contrast, saturation and hue in a random order.

    Factors per image as torchvision's ``ColorJitter``: brightness, contrast and saturation uniform in
    ``[max(0, 1 - s), 1 + s]``, hue shift uniform in ``[-hue, hue]``; the order of the four
    adjustments is a random permutation per image (torchvision draws one per call, which for
    single images is the same thing). ``p`` plays the role of ``RandomApply([ColorJitter], p)``.
    ``[B, C, H, W]`` -> same shape; gray images get brightness and contrast only.
    """

    def __init__(self, brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0, hue: float = 0.0, p: float = 1.0) -> None:
        for name, value in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if isinstance(hue, bool) or not isinstance(hue, (int, float)) or not 0.0 <= hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {hue!r}")
        self.brightness, self.contrast, self.saturation, self.hue = float(brightness), float(contrast), float(saturation), float(hue)
        self.p = _check_probability("p", p)

    def sample_params(self, batch: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> JitterParams:
        """Per-image parameters for a batch of ``batch`` images (see :class:`JitterParams`)."""
        device = torch.device(device)
        applied = random_flags(batch, self.p, generator, device)
        order = torch.argsort(random_uniform01((batch, 4), generator, device), dim=1)
        brightness, contrast, saturation = (
            random_uniform((batch,), max(0.0, 1.0 - s), 1.0 + s, generator, device)
            for s in (self.brightness, self.contrast, self.saturation)
        )
        hue = random_uniform((batch,), -self.hue, self.hue, generator, device)
        return JitterParams(applied, order, brightness, contrast, saturation, hue)

    def apply(self, x: torch.Tensor, params: JitterParams) -> torch.Tensor:
        """Jitter ``x`` ``[B, C, H, W]`` with given per-image parameters; adjustments with strength 0 are skipped."""
        x = as_float_images(x)
        check_channels(x, "ColorJitter")
        factors = (params.brightness, params.contrast, params.saturation)
        ops: tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ...] = (adjust_brightness, adjust_contrast, adjust_saturation)
        active = (self.brightness > 0, self.contrast > 0, self.saturation > 0)
        applied, order = params.applied.to(x.device), params.order.to(x.device)
        out = x
        for position in range(4):
            chosen = order[:, position]
            for k in range(3):
                if active[k]:
                    # A factor of exactly 1 is the identity on [0, 1] images, so images whose k-th
                    # step is not at this position (or that skip jitter) pass through unchanged.
                    selected = applied & (chosen == k)
                    factor = factors[k].to(x.device)
                    out = ops[k](out, torch.where(selected, factor, torch.ones_like(factor)))
            if self.hue > 0 and x.shape[1] == 3:
                selected = applied & (chosen == 3)
                if _subset_on_device(out.device):
                    # The HSV round trip is the costly step: convert only the selected images.
                    rows = selected.nonzero().squeeze(1)
                    if rows.numel() > 0:
                        out = out.index_copy(0, rows, adjust_hue(out.index_select(0, rows), params.hue.to(x.device)[rows]))
                else:
                    out = torch.where(selected.view(-1, 1, 1, 1), adjust_hue(out, params.hue), out)
        return out

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = as_float_images(x)
        check_channels(x, "ColorJitter")
        return self.apply(x, self.sample_params(x.shape[0], generator, x.device))

    def __repr__(self) -> str:
        return f"ColorJitter(brightness={self.brightness}, contrast={self.contrast}, saturation={self.saturation}, hue={self.hue}, p={self.p})"


class RandomGrayscale(_Op):
    """With probability ``p`` per image, replace RGB by its ITU-R 601 luma on all three channels."""

    def __init__(self, p: float = 0.2) -> None:
        self.p = _check_probability("p", p)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = as_float_images(x)
        check_channels(x, "RandomGrayscale")
        chosen = random_flags(x.shape[0], self.p, generator, x.device)
        if x.shape[1] == 1:
            return x
        return torch.where(chosen.view(-1, 1, 1, 1), rgb_to_grayscale(x).expand_as(x), x)

    def __repr__(self) -> str:
        return f"RandomGrayscale(p={self.p})"


class GaussianBlur(_Op):
    """With probability ``p`` per image, Gaussian blur with ``sigma ~ U(sigma)`` (pixels) and a fixed odd kernel."""

    def __init__(self, kernel_size: int, sigma: tuple[float, float] = (0.1, 2.0), p: float = 0.5) -> None:
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd int >= 1, got {kernel_size!r}")
        self.kernel_size = kernel_size
        self.sigma = check_range("sigma", sigma, 0.0)
        self.p = _check_probability("p", p)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = as_float_images(x)
        b = x.shape[0]
        chosen = random_flags(b, self.p, generator, x.device)
        sigma = random_uniform((b,), *self.sigma, generator, x.device)
        if self.p == 0.0:
            return x
        return torch.where(chosen.view(-1, 1, 1, 1), gaussian_blur(x, sigma, self.kernel_size), x)

    def __repr__(self) -> str:
        return f"GaussianBlur(kernel_size={self.kernel_size}, sigma={self.sigma}, p={self.p})"


class RandomSolarize(_Op):
    """With probability ``p`` per image, :func:`solarize` at ``threshold``."""

    def __init__(self, threshold: float = 0.5, p: float = 0.2) -> None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
        self.threshold = float(threshold)
        self.p = _check_probability("p", p)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = as_float_images(x)
        chosen = random_flags(x.shape[0], self.p, generator, x.device)
        return torch.where(chosen.view(-1, 1, 1, 1), solarize(x, self.threshold), x)

    def __repr__(self) -> str:
        return f"RandomSolarize(threshold={self.threshold}, p={self.p})"


class Normalize(_Op):
    """``(x - mean) / std`` per channel (e.g. :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD`); deterministic.

    Takes ``[0, 1]`` images (or ``uint8``) ``[B, C, H, W]`` with ``C == len(mean)``; put it last.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        if len(mean) == 0 or len(mean) != len(std):
            raise ValueError(f"mean and std need one value per channel, got {len(mean)} and {len(std)}")
        if not all(math.isfinite(m) for m in mean) or not all(math.isfinite(s) and s > 0 for s in std):
            raise ValueError(f"mean must be finite and std finite and > 0, got mean={mean} std={std}")
        self.mean, self.std = mean, std

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = as_float_images(x)
        if x.shape[1] != len(self.mean):
            raise ValueError(f"Normalize has {len(self.mean)} channels, the batch {x.shape[1]} (shape {tuple(x.shape)})")
        mean = torch.tensor(self.mean, dtype=x.dtype).view(1, -1, 1, 1).to(x.device, non_blocking=True)
        std = torch.tensor(self.std, dtype=x.dtype).view(1, -1, 1, 1).to(x.device, non_blocking=True)
        return (x - mean) / std

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


class Compose(_Op):
    """The augmentations in order; each draws its own per-image parameters from the same generator."""

    def __init__(self, steps: Sequence[Callable[..., torch.Tensor]]) -> None:
        if len(steps) == 0:
            raise ValueError("Compose needs at least one step")
        for step in steps:
            if not callable(step):
                raise TypeError(f"every step must be callable as step(x, generator), got {type(step).__name__}")
        self.steps = list(steps)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = as_float_images(x)
        for step in self.steps:
            x = step(x, generator)
        return x

    def __repr__(self) -> str:
        inner = ",\n  ".join(repr(s) for s in self.steps)
        return f"Compose([\n  {inner}\n])"


class MultiViewAugment(_Op):
    """One pipeline per view: ``views(x, count)`` gives view ``i`` from ``pipelines[i % len(pipelines)]``.

    For asymmetric recipes such as BYOL's. Calling it directly (``aug(x)``) applies the first pipeline.
    """

    def __init__(self, pipelines: Sequence[Callable[..., torch.Tensor]]) -> None:
        if len(pipelines) == 0:
            raise ValueError("MultiViewAugment needs at least one pipeline")
        self.pipelines = list(pipelines)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.pipelines[0](x, generator)

    def views(self, x: torch.Tensor, count: int = 2, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """``count`` views ``[B, C, H', W']``, view ``i`` drawn with pipeline ``i % len(pipelines)``."""
        check_int_at_least("count", count, 1)
        return [self.pipelines[i % len(self.pipelines)](x, generator) for i in range(count)]

    def __repr__(self) -> str:
        return "MultiViewAugment([" + ", ".join(repr(p) for p in self.pipelines) + "])"


def _with_normalize(steps: list[Callable[..., torch.Tensor]], normalize: Normalize | None) -> Compose:
    if normalize is not None:
        if not isinstance(normalize, Normalize):
            raise TypeError(f"normalize must be a Normalize or None, got {type(normalize).__name__}")
        steps.append(normalize)
    return Compose(steps)


def simclr_augment(
    size: int, *, strength: float = 1.0, blur_p: float = 0.5, normalize: Normalize | None = None
) -> Compose:
    """SimCLR's views: crop (scale 0.08-1), flip, jitter (0.8s, 0.8s, 0.8s, 0.2s) with p 0.8, gray p 0.2, blur.

    Blur with probability ``blur_p`` (SimCLR: 0.5 on ImageNet, 0 on CIFAR), kernel ~10% of ``size``,
    sigma in [0.1, 2.0]. ``[B, C, H, W]`` in ``[0, 1]`` -> ``[B, C, size, size]``.
    """
    check_int_at_least("size", size, 1)
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 2.5:
        raise ValueError(f"strength must be in [0, 2.5] (hue 0.2 * strength <= 0.5), got {strength!r}")
    steps: list[Callable[..., torch.Tensor]] = [
        RandomResizedCrop(size, scale=(0.08, 1.0), flip_p=0.5),
        ColorJitter(0.8 * strength, 0.8 * strength, 0.8 * strength, 0.2 * strength, p=0.8),
        RandomGrayscale(p=0.2),
    ]
    if blur_p > 0:
        steps.append(GaussianBlur(blur_kernel_size(size), (0.1, 2.0), p=_check_probability("blur_p", blur_p)))
    return _with_normalize(steps, normalize)


def byol_augment(size: int, *, normalize: Normalize | None = None) -> MultiViewAugment:
    """BYOL's asymmetric views: crop, flip, jitter (0.4, 0.4, 0.2, 0.1) p 0.8, gray p 0.2, then per view
    blur p (1.0, 0.1) and solarize p (0.0, 0.2). ``views(x, 2)`` returns (view 1, view 2).
    """
    check_int_at_least("size", size, 1)

    def view(blur_p: float, solarize_p: float) -> Compose:
        return _with_normalize(
            [
                RandomResizedCrop(size, scale=(0.08, 1.0), flip_p=0.5),
                ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8),
                RandomGrayscale(p=0.2),
                GaussianBlur(blur_kernel_size(size), (0.1, 2.0), p=blur_p),
                RandomSolarize(0.5, p=solarize_p),
            ],
            normalize,
        )

    return MultiViewAugment([view(1.0, 0.0), view(0.1, 0.2)])


def downstream_augment(size: int, *, normalize: Normalize | None = None) -> Compose:
    """Fine-tuning augmentation: random resized crop (scale 0.08-1) and horizontal flip."""
    check_int_at_least("size", size, 1)
    return _with_normalize([RandomResizedCrop(size, scale=(0.08, 1.0), flip_p=0.5)], normalize)


__all__: Sequence[str] = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Augmentation",
    "ColorJitter",
    "Compose",
    "GaussianBlur",
    "JitterParams",
    "MultiViewAugment",
    "Normalize",
    "RandomGrayscale",
    "RandomHorizontalFlip",
    "RandomResizedCrop",
    "RandomSolarize",
    "byol_augment",
    "downstream_augment",
    "simclr_augment",
]
