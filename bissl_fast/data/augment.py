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
import torch.nn.functional as F

from ._validation import check_int_at_least, check_size_pair

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

# ITU-R BT.601 luma (also PIL's "L" conversion); the weights sum to 1, so gray stays in [0, 1].
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


class Augmentation(Protocol):
    """What the trainer and the pipeline call: one augmented copy, or ``count`` views."""

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor: ...

    def views(self, x: torch.Tensor, count: int = 2, generator: torch.Generator | None = None) -> list[torch.Tensor]: ...


# --------------------------------------------------------------------------------------------
# Input checks and random draws
# --------------------------------------------------------------------------------------------


def as_float_images(x: object, name: str = "x") -> torch.Tensor:
    """``x`` as a float image batch ``[B, C, H, W]``: float kept as is, ``uint8`` mapped to float32 / 255."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor image batch [B, C, H, W], got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be a 4-D image batch [B, C, H, W], got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a float (values in [0, 1]) or uint8 image batch, got {x.dtype}")
    return x


def _check_channels(x: torch.Tensor, what: str) -> None:
    if x.shape[1] not in (1, 3):
        raise ValueError(f"{what} needs 1 (gray) or 3 (RGB) channels, got {x.shape[1]} in shape {tuple(x.shape)}")


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) float32 draws on ``device``, from ``generator`` (on its own device) when given."""
    if generator is None:
        return torch.rand(shape, device=device)
    # Asynchronous: from pageable memory CUDA stages the source before returning, without a device sync.
    return torch.rand(shape, generator=generator, device=generator.device).to(device, non_blocking=True)


def _uniform(shape: tuple[int, ...], low: float, high: float, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return _rand(shape, generator, device) * (high - low) + low


def _bernoulli(batch: int, p: float, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Per-sample booleans ``[B]``, true with probability ``p`` (one draw per sample even for p in {0, 1})."""
    return _rand((batch,), generator, device) < p


def _check_probability(name: str, p: float) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} is a probability in [0, 1], got {p!r}")
    return float(p)


def _check_range(name: str, bounds: Sequence[float], low: float, high: float | None = None) -> tuple[float, float]:
    if len(bounds) != 2:
        raise ValueError(f"{name} must be a (min, max) pair, got {bounds!r}")
    a, b = float(bounds[0]), float(bounds[1])
    upper_ok = high is None or b <= high
    if not (math.isfinite(a) and math.isfinite(b) and low < a <= b and upper_ok):
        bound = f"{low} < min <= max" + (f" <= {high}" if high is not None else "")
        raise ValueError(f"{name} must satisfy {bound}, got {bounds!r}")
    return a, b


class _Op(ABC):
    """Shared ``views``: ``count`` independent draws of the same augmentation."""

    @abstractmethod
    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One augmented copy of ``x`` ``[B, C, H, W]``."""

    def views(self, x: torch.Tensor, count: int = 2, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """``count`` independent augmentations of ``x`` ``[B, C, H, W]``, each ``[B, C, H', W']``."""
        check_int_at_least("count", count, 1)
        return [self(x, generator) for _ in range(count)]


# --------------------------------------------------------------------------------------------
# Random resized crop (+ optional flip folded into the resampling)
# --------------------------------------------------------------------------------------------


def sample_crop_boxes(
    batch: int,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    attempts: int = 10,
) -> torch.Tensor:
    """Crop boxes ``[B, 4]`` int64 rows ``(top, left, crop_height, crop_width)``, torchvision's sampling.

    Per sample, up to ``attempts`` tries: area fraction ``s ~ U(scale)`` of ``height * width``, aspect
    ratio ``r = w / h`` log-uniform in ``ratio``, ``w = round(sqrt(s*A*r))``, ``h = round(sqrt(s*A/r))``;
    the first try that fits is placed uniformly at random. If none fits, the fallback is a center
    crop of the whole image clipped to the nearest aspect ratio inside ``ratio``. All tries are drawn
    for every sample (a fixed number of draws, so a seed gives the same boxes on every device).
    """
    check_int_at_least("batch", batch, 1)
    check_int_at_least("height", height, 1)
    check_int_at_least("width", width, 1)
    check_int_at_least("attempts", attempts, 1)
    scale = _check_range("scale", scale, 0.0, 1.0)
    ratio = _check_range("ratio", ratio, 0.0)
    device = torch.device(device)
    # float64 for the box arithmetic: the rounding below must match Python's on the same draws.
    area = float(height * width)
    target = area * _uniform((batch, attempts), *scale, generator, device).double()
    log_ratio = _uniform((batch, attempts), math.log(ratio[0]), math.log(ratio[1]), generator, device).double()
    aspect = torch.exp(log_ratio)
    w = torch.round(torch.sqrt(target * aspect)).long()
    h = torch.round(torch.sqrt(target / aspect)).long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.argmax(fits.int(), dim=1, keepdim=True)  # index of the first fitting try
    found = fits.any(dim=1)
    h = h.gather(1, first).squeeze(1)
    w = w.gather(1, first).squeeze(1)
    u_top, u_left = _rand((batch,), generator, device).double(), _rand((batch,), generator, device).double()
    top = torch.floor(u_top * (height - h + 1).double()).long()
    left = torch.floor(u_left * (width - w + 1).double()).long()

    in_ratio = width / height
    if in_ratio < ratio[0]:
        fb_w, fb_h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fb_w, fb_h = int(round(height * ratio[1])), height
    else:
        fb_w, fb_h = width, height
    # Python scalars as the fallback values: no host-to-device copy (which would synchronize a GPU).
    fallback = ((height - fb_h) // 2, (width - fb_w) // 2, fb_h, fb_w)
    return torch.stack([torch.where(found, v, fb) for v, fb in zip((top, left, h, w), fallback)], dim=1)


def _resample_weights(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int, antialias: bool, dtype: torch.dtype) -> torch.Tensor:
    """Row weights ``[B, out_size, in_size]`` that resize the span ``[start, start + length)`` to ``out_size``.

    Exactly the weights of ``F.interpolate(mode="bilinear", align_corners=False)`` on the cropped span
    (triangle filter at source position ``scale * (o + 0.5) - 0.5``; with ``antialias`` the filter is
    widened by the downscale factor, as PyTorch's antialiased bilinear does), zero outside the span.
    """
    work = torch.float64 if dtype == torch.float64 else torch.float32
    length = length.to(work).view(-1, 1, 1)
    scale = length / out_size  # [B, 1, 1]
    center = scale * (torch.arange(out_size, device=start.device, dtype=work).view(1, -1, 1) + 0.5)
    pos = torch.arange(in_size, device=start.device, dtype=work).view(1, 1, -1) - start.to(work).view(-1, 1, 1)
    support = torch.clamp(scale, min=1.0) if antialias else torch.ones_like(scale)
    weights = torch.clamp(1.0 - (pos + 0.5 - center).abs() / support, min=0.0)
    weights = weights * ((pos >= 0) & (pos < length))
    return (weights / weights.sum(dim=2, keepdim=True)).to(dtype)


def resized_crop(
    x: torch.Tensor, boxes: torch.Tensor, size: int | Sequence[int], flip: torch.Tensor | None = None, antialias: bool = True
) -> torch.Tensor:
    """Crop each image to its box and resize it to ``size``; optionally mirror it horizontally.

    ``x``: ``[B, C, H, W]``; ``boxes``: int ``[B, 4]`` rows ``(top, left, height, width)`` inside the
    image; ``flip``: bool ``[B]`` or None. Returns ``[B, C, size_h, size_w]`` equal (to float rounding)
    to ``F.interpolate(x[b:b+1, :, top:top+h, left:left+w], size, mode="bilinear",
    align_corners=False, antialias=antialias)`` per image, computed for the whole batch as two batched
    matrix products with per-sample interpolation matrices.
    """
    x = as_float_images(x)
    out_h, out_w = check_size_pair(size)
    b, _, height, width = x.shape
    if not isinstance(boxes, torch.Tensor) or boxes.shape != (b, 4) or boxes.is_floating_point():
        raise ValueError(f"boxes must be an integer tensor [{b}, 4] of (top, left, height, width), got {getattr(boxes, 'shape', boxes)}")
    boxes = boxes.to(x.device)
    top, left, box_h, box_w = boxes.unbind(1)
    rows = _resample_weights(top, box_h, height, out_h, antialias, x.dtype)  # [B, out_h, H]
    cols = _resample_weights(left, box_w, width, out_w, antialias, x.dtype)  # [B, out_w, W]
    if flip is not None:
        cols = torch.where(flip.to(x.device).view(-1, 1, 1), cols.flip(1), cols)
    out = torch.matmul(torch.matmul(rows.unsqueeze(1), x), cols.transpose(1, 2).unsqueeze(1))
    # The weights sum to 1 up to rounding: keep the result inside the input's range.
    return out.clamp_(0.0, 1.0)


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
        self.scale = _check_range("scale", scale, 0.0, 1.0)
        self.ratio = _check_range("ratio", ratio, 0.0)
        self.antialias = bool(antialias)
        self.flip_p = _check_probability("flip_p", flip_p)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = as_float_images(x)
        b, _, height, width = x.shape
        boxes = sample_crop_boxes(b, height, width, self.scale, self.ratio, generator, x.device)
        flip = _bernoulli(b, self.flip_p, generator, x.device) if self.flip_p > 0 else None
        return resized_crop(x, boxes, self.size, flip, self.antialias)

    def __repr__(self) -> str:
        return f"RandomResizedCrop(size={self.size}, scale={self.scale}, ratio={self.ratio}, antialias={self.antialias}, flip_p={self.flip_p})"


class RandomHorizontalFlip(_Op):
    """Mirror each image left-right with probability ``p``. ``[B, C, H, W]`` -> same shape."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = _check_probability("p", p)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = as_float_images(x)
        flip = _bernoulli(x.shape[0], self.p, generator, x.device)
        return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


# --------------------------------------------------------------------------------------------
# Colour
# --------------------------------------------------------------------------------------------


def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma ``0.299 R + 0.587 G + 0.114 B``: ``[B, 3, H, W]`` -> ``[B, 1, H, W]`` (1 channel: as is)."""
    x = as_float_images(x)
    _check_channels(x, "rgb_to_grayscale")
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (LUMA_WEIGHTS[0] * r + LUMA_WEIGHTS[1] * g + LUMA_WEIGHTS[2] * b).unsqueeze(1)


def _per_sample(factor: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    if isinstance(factor, torch.Tensor):
        return factor.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)
    return torch.full((x.shape[0], 1, 1, 1), float(factor), device=x.device, dtype=x.dtype)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """``clamp(x * factor, 0, 1)`` with one factor per image (``[B]`` or a float); 1 is the identity."""
    x = as_float_images(x)
    return (x * _per_sample(factor, x)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """Blend each image with the mean of its luma: ``clamp(f * x + (1 - f) * mean, 0, 1)``; 1 is the identity."""
    x = as_float_images(x)
    _check_channels(x, "adjust_contrast")
    f = _per_sample(factor, x)
    mean = rgb_to_grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return (f * x + (1.0 - f) * mean).clamp_(0.0, 1.0)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """Blend each pixel with its luma: ``clamp(f * x + (1 - f) * gray, 0, 1)``; gray images unchanged."""
    x = as_float_images(x)
    _check_channels(x, "adjust_saturation")
    if x.shape[1] == 1:
        return x
    f = _per_sample(factor, x)
    return (f * x + (1.0 - f) * rgb_to_grayscale(x)).clamp_(0.0, 1.0)


def _rgb_to_hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r, g, b = x.unbind(1)
    maxc = x.amax(dim=1)
    minc = x.amin(dim=1)
    chroma = maxc - minc
    gray = chroma == 0
    # Gray pixels have hue 0 and saturation 0; the safe divisor only avoids 0 / 0 there.
    saturation = chroma / torch.where(gray, torch.ones_like(maxc), maxc)
    safe_chroma = torch.where(gray, torch.ones_like(chroma), chroma)
    rc, gc, bc = (maxc - r) / safe_chroma, (maxc - g) / safe_chroma, (maxc - b) / safe_chroma
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(gray, torch.zeros_like(hue), hue)
    hue = torch.remainder(hue / 6.0, 1.0)
    return hue, saturation, maxc


def _hsv_to_rgb(hue: torch.Tensor, saturation: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    # Closed form of colorsys.hsv_to_rgb's six hue sectors: channel n (5 = R, 3 = G, 1 = B) is
    # v - v * s * clamp(min(k, 4 - k), 0, 1) with k = (n + 6 h) mod 6.
    h6 = hue.unsqueeze(1) * 6.0
    n = torch.arange(5, 0, -2, device=hue.device, dtype=hue.dtype).view(1, 3, 1, 1)
    k = torch.remainder(n + h6, 6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    v = value.unsqueeze(1)
    return (v - v * saturation.unsqueeze(1) * ramp).clamp_(0.0, 1.0)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor | float) -> torch.Tensor:
    """Rotate the hue of each image by ``shift`` (a fraction of the colour circle, in [-0.5, 0.5]).

    Through HSV like torchvision's ``adjust_hue``; gray images are returned unchanged.
    """
    x = as_float_images(x)
    _check_channels(x, "adjust_hue")
    if x.shape[1] == 1:
        return x
    hue, saturation, value = _rgb_to_hsv(x)
    hue = torch.remainder(hue + _per_sample(shift, x).squeeze(1), 1.0)
    return _hsv_to_rgb(hue, saturation, value)


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
        applied = _bernoulli(batch, self.p, generator, device)
        order = torch.argsort(_rand((batch, 4), generator, device), dim=1)
        brightness, contrast, saturation = (
            _uniform((batch,), max(0.0, 1.0 - s), 1.0 + s, generator, device)
            for s in (self.brightness, self.contrast, self.saturation)
        )
        hue = _uniform((batch,), -self.hue, self.hue, generator, device)
        return JitterParams(applied, order, brightness, contrast, saturation, hue)

    def apply(self, x: torch.Tensor, params: JitterParams) -> torch.Tensor:
        """Jitter ``x`` ``[B, C, H, W]`` with given per-image parameters; adjustments with strength 0 are skipped."""
        x = as_float_images(x)
        _check_channels(x, "ColorJitter")
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
        _check_channels(x, "ColorJitter")
        return self.apply(x, self.sample_params(x.shape[0], generator, x.device))

    def __repr__(self) -> str:
        return f"ColorJitter(brightness={self.brightness}, contrast={self.contrast}, saturation={self.saturation}, hue={self.hue}, p={self.p})"


class RandomGrayscale(_Op):
    """With probability ``p`` per image, replace RGB by its ITU-R 601 luma on all three channels."""

    def __init__(self, p: float = 0.2) -> None:
        self.p = _check_probability("p", p)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = as_float_images(x)
        _check_channels(x, "RandomGrayscale")
        chosen = _bernoulli(x.shape[0], self.p, generator, x.device)
        if x.shape[1] == 1:
            return x
        return torch.where(chosen.view(-1, 1, 1, 1), rgb_to_grayscale(x).expand_as(x), x)

    def __repr__(self) -> str:
        return f"RandomGrayscale(p={self.p})"


# --------------------------------------------------------------------------------------------
# Blur, solarize, normalize
# --------------------------------------------------------------------------------------------


def blur_kernel_size(size: int) -> int:
    """Odd Gaussian kernel size of about 10% of the image side (SimCLR's rule; at least 3)."""
    return max(3, int(0.1 * check_int_at_least("size", size, 1)) | 1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor | float, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with one ``sigma`` per image, reflect padding (torchvision's ``gaussian_blur``).

    Kernel taps at ``-(k-1)/2 .. (k-1)/2`` with weights ``exp(-t^2 / (2 sigma^2))`` normalized to 1.
    ``[B, C, H, W]`` -> same shape; needs ``H, W > kernel_size // 2``.
    """
    x = as_float_images(x)
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be an odd int >= 1, got {kernel_size!r}")
    b, c, height, width = x.shape
    pad = kernel_size // 2
    if pad >= height or pad >= width:
        raise ValueError(f"kernel_size {kernel_size} is too large for images of {height}x{width} (reflect padding)")
    s = _per_sample(sigma, x).view(b, 1)
    taps = torch.linspace(-pad, pad, kernel_size, device=x.device, dtype=x.dtype).view(1, -1)
    kernel = torch.exp(-0.5 * (taps / s) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # [B*C, k]
    # Every (image, channel) pair is its own conv group, so each image gets its own kernel.
    planes = F.pad(x.reshape(1, b * c, height, width), (pad, pad, pad, pad), mode="reflect")
    planes = F.conv2d(planes, kernel.view(b * c, 1, 1, kernel_size), groups=b * c)
    planes = F.conv2d(planes, kernel.view(b * c, 1, kernel_size, 1), groups=b * c)
    return planes.view(b, c, height, width).clamp_(0.0, 1.0)


class GaussianBlur(_Op):
    """With probability ``p`` per image, Gaussian blur with ``sigma ~ U(sigma)`` (pixels) and a fixed odd kernel."""

    def __init__(self, kernel_size: int, sigma: tuple[float, float] = (0.1, 2.0), p: float = 0.5) -> None:
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd int >= 1, got {kernel_size!r}")
        self.kernel_size = kernel_size
        self.sigma = _check_range("sigma", sigma, 0.0)
        self.p = _check_probability("p", p)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = as_float_images(x)
        b = x.shape[0]
        chosen = _bernoulli(b, self.p, generator, x.device)
        sigma = _uniform((b,), *self.sigma, generator, x.device)
        if self.p == 0.0:
            return x
        return torch.where(chosen.view(-1, 1, 1, 1), gaussian_blur(x, sigma, self.kernel_size), x)

    def __repr__(self) -> str:
        return f"GaussianBlur(kernel_size={self.kernel_size}, sigma={self.sigma}, p={self.p})"


def solarize(x: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Invert every value at or above ``threshold``: ``where(x >= threshold, 1 - x, x)``."""
    x = as_float_images(x)
    return torch.where(x >= threshold, 1.0 - x, x)


class RandomSolarize(_Op):
    """With probability ``p`` per image, :func:`solarize` at ``threshold``."""

    def __init__(self, threshold: float = 0.5, p: float = 0.2) -> None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
        self.threshold = float(threshold)
        self.p = _check_probability("p", p)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = as_float_images(x)
        chosen = _bernoulli(x.shape[0], self.p, generator, x.device)
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


# --------------------------------------------------------------------------------------------
# Pipelines and presets
# --------------------------------------------------------------------------------------------


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
    "LUMA_WEIGHTS",
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
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "as_float_images",
    "blur_kernel_size",
    "byol_augment",
    "downstream_augment",
    "gaussian_blur",
    "resized_crop",
    "rgb_to_grayscale",
    "sample_crop_boxes",
    "simclr_augment",
    "solarize",
]
