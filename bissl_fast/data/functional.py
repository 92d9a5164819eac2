"""Functional forms of the augmentations on image batches ``[B, C, H, W]`` (float in ``[0, 1]``, or
``uint8``): deterministic operations with one parameter per image (crop + resize, colour adjustments,
blur, solarize) and the per-image random draws the augmentations take their parameters from
(uniform numbers, flags, torchvision's crop boxes).

The random augmentations of :mod:`bissl_fast.data.augment` draw per-image parameters and apply these.
Semantics follow torchvision's functional transforms image by image (grayscale uses the exact ITU-R
601 luma weights 0.299/0.587/0.114; torchvision uses 0.2989 for R).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .._validation import check_int_at_least, check_size_pair

# ITU-R BT.601 luma (also PIL's "L" conversion); the weights sum to 1, so gray stays in [0, 1].
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


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


def check_channels(x: torch.Tensor, what: str) -> None:
    if x.shape[1] not in (1, 3):
        raise ValueError(f"{what} needs 1 (gray) or 3 (RGB) channels, got {x.shape[1]} in shape {tuple(x.shape)}")


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


def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma ``0.299 R + 0.587 G + 0.114 B``: ``[B, 3, H, W]`` -> ``[B, 1, H, W]`` (1 channel: as is)."""
    x = as_float_images(x)
    check_channels(x, "rgb_to_grayscale")
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (LUMA_WEIGHTS[0] * r + LUMA_WEIGHTS[1] * g + LUMA_WEIGHTS[2] * b).unsqueeze(1)


def per_sample(factor: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    if isinstance(factor, torch.Tensor):
        return factor.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)
    return torch.full((x.shape[0], 1, 1, 1), float(factor), device=x.device, dtype=x.dtype)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """``clamp(x * factor, 0, 1)`` with one factor per image (``[B]`` or a float); 1 is the identity."""
    x = as_float_images(x)
    return (x * per_sample(factor, x)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """Blend each image with the mean of its luma: ``clamp(f * x + (1 - f) * mean, 0, 1)``; 1 is the identity."""
    x = as_float_images(x)
    check_channels(x, "adjust_contrast")
    f = per_sample(factor, x)
    mean = rgb_to_grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return (f * x + (1.0 - f) * mean).clamp_(0.0, 1.0)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """Blend each pixel with its luma: ``clamp(f * x + (1 - f) * gray, 0, 1)``; gray images unchanged."""
    x = as_float_images(x)
    check_channels(x, "adjust_saturation")
    if x.shape[1] == 1:
        return x
    f = per_sample(factor, x)
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
    check_channels(x, "adjust_hue")
    if x.shape[1] == 1:
        return x
    hue, saturation, value = _rgb_to_hsv(x)
    hue = torch.remainder(hue + per_sample(shift, x).squeeze(1), 1.0)
    return _hsv_to_rgb(hue, saturation, value)


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
    s = per_sample(sigma, x).view(b, 1)
    taps = torch.linspace(-pad, pad, kernel_size, device=x.device, dtype=x.dtype).view(1, -1)
    kernel = torch.exp(-0.5 * (taps / s) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # [B*C, k]
    # Every (image, channel) pair is its own conv group, so each image gets its own kernel.
    planes = F.pad(x.reshape(1, b * c, height, width), (pad, pad, pad, pad), mode="reflect")
    planes = F.conv2d(planes, kernel.view(b * c, 1, 1, kernel_size), groups=b * c)
    planes = F.conv2d(planes, kernel.view(b * c, 1, kernel_size, 1), groups=b * c)
    return planes.view(b, c, height, width).clamp_(0.0, 1.0)


def solarize(x: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Invert every value at or above ``threshold``: ``where(x >= threshold, 1 - x, x)``."""
    x = as_float_images(x)
    return torch.where(x >= threshold, 1.0 - x, x)


def random_uniform01(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) float32 draws on ``device``, from ``generator`` (on its own device) when given."""
    if generator is None:
        return torch.rand(shape, device=device)
    # Asynchronous: from pageable memory CUDA stages the source before returning, without a device sync.
    return torch.rand(shape, generator=generator, device=generator.device).to(device, non_blocking=True)


def random_uniform(shape: tuple[int, ...], low: float, high: float, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return random_uniform01(shape, generator, device) * (high - low) + low


def random_flags(batch: int, p: float, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Per-sample booleans ``[B]``, true with probability ``p`` (one draw per sample even for p in {0, 1})."""
    return random_uniform01((batch,), generator, device) < p


def check_range(name: str, bounds: Sequence[float], low: float, high: float | None = None) -> tuple[float, float]:
    if len(bounds) != 2:
        raise ValueError(f"{name} must be a (min, max) pair, got {bounds!r}")
    a, b = float(bounds[0]), float(bounds[1])
    upper_ok = high is None or b <= high
    if not (math.isfinite(a) and math.isfinite(b) and low < a <= b and upper_ok):
        bound = f"{low} < min <= max" + (f" <= {high}" if high is not None else "")
        raise ValueError(f"{name} must satisfy {bound}, got {bounds!r}")
    return a, b


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
    scale = check_range("scale", scale, 0.0, 1.0)
    ratio = check_range("ratio", ratio, 0.0)
    device = torch.device(device)
    # float64 for the box arithmetic: the rounding below must match Python's on the same draws.
    area = float(height * width)
    target = area * random_uniform((batch, attempts), *scale, generator, device).double()
    log_ratio = random_uniform((batch, attempts), math.log(ratio[0]), math.log(ratio[1]), generator, device).double()
    aspect = torch.exp(log_ratio)
    w = torch.round(torch.sqrt(target * aspect)).long()
    h = torch.round(torch.sqrt(target / aspect)).long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.argmax(fits.int(), dim=1, keepdim=True)  # index of the first fitting try
    found = fits.any(dim=1)
    h = h.gather(1, first).squeeze(1)
    w = w.gather(1, first).squeeze(1)
    u_top, u_left = random_uniform01((batch,), generator, device).double(), random_uniform01((batch,), generator, device).double()
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


__all__: Sequence[str] = [
    "LUMA_WEIGHTS",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "as_float_images",
    "blur_kernel_size",
    "check_range",
    "check_channels",
    "gaussian_blur",
    "per_sample",
    "random_flags",
    "random_uniform",
    "random_uniform01",
    "resized_crop",
    "rgb_to_grayscale",
    "sample_crop_boxes",
    "solarize",
]
