"""Batched view augmentations (bissl_fast.data.augment) against plain per-image references, on CPU."""
from __future__ import annotations

import colorsys
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bissl_fast.data.augment as augment_module
from bissl_fast.data.augment import (
    ColorJitter,
    Compose,
    GaussianBlur,
    MultiViewAugment,
    Normalize,
    RandomGrayscale,
    RandomHorizontalFlip,
    RandomResizedCrop,
    RandomSolarize,
    byol_augment,
    downstream_augment,
    simclr_augment,
)
from bissl_fast.data.functional import (
    adjust_hue,
    blur_kernel_size,
    gaussian_blur,
    resized_crop,
    rgb_to_grayscale,
    sample_crop_boxes,
    solarize,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------
# Presets: shapes, ranges, determinism
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", [simclr_augment, byol_augment, downstream_augment])
def test_presets_shapes_ranges_and_seeds(preset):
    x = torch.rand(7, 3, 40, 36)
    aug = preset(24)
    views = aug.views(x, 2, _gen(5))
    assert len(views) == 2
    for v in views:
        assert v.shape == (7, 3, 24, 24) and v.dtype == torch.float32
        assert float(v.min()) >= 0.0 and float(v.max()) <= 1.0
    again = aug.views(x, 2, _gen(5))
    assert all(torch.equal(a, b) for a, b in zip(views, again))
    other = aug.views(x, 2, _gen(6))
    assert not torch.allclose(views[0], other[0])
    assert not torch.allclose(views[0], views[1])
    # Without a generator: torch's global generator, reproducible through torch.manual_seed.
    torch.manual_seed(11)
    a = aug(x)
    torch.manual_seed(11)
    assert torch.equal(a, aug(x))


def test_uint8_input_is_float_over_255_and_normalize_is_last():
    x8 = torch.randint(0, 256, (4, 3, 20, 20), dtype=torch.uint8)
    aug = simclr_augment(16)
    assert torch.equal(aug(x8, _gen(1)), aug(x8.float() / 255.0, _gen(1)))
    norm = Normalize((0.5, 0.4, 0.3), (0.2, 0.25, 0.5))
    with_norm = simclr_augment(16, normalize=norm)
    expected = (aug(x8, _gen(2)) - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.25, 0.5]).view(1, 3, 1, 1)
    assert torch.allclose(with_norm(x8, _gen(2)), expected, atol=1e-6)
    assert float(with_norm(x8, _gen(2)).min()) < 0.0


def test_generator_on_cpu_drives_any_batch_device_and_views_count():
    x = torch.rand(3, 3, 12, 12, dtype=torch.float64)
    out = downstream_augment(8)(x, _gen(0))
    assert out.dtype == torch.float64 and out.shape == (3, 3, 8, 8)
    assert len(simclr_augment(8).views(x.float(), 3, _gen(0))) == 3


@pytest.mark.cuda
def test_cuda_batch_matches_cpu_under_the_same_cpu_generator():
    x = torch.rand(5, 3, 30, 30)
    aug = simclr_augment(16)
    cpu = aug(x, _gen(9))
    gpu = aug(x.cuda(), _gen(9))
    assert gpu.device.type == "cuda"
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-4)


# --------------------------------------------------------------------------------------------
# Random resized crop
# --------------------------------------------------------------------------------------------


def _torchvision_box(height, width, scale, ratio, rng):
    """torchvision's RandomResizedCrop.get_params, written out with Python's random module."""
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _quantiles(values: torch.Tensor) -> torch.Tensor:
    return torch.quantile(values.double(), torch.linspace(0.05, 0.95, 19, dtype=torch.float64))


@pytest.mark.parametrize("height,width", [(224, 224), (96, 160)])
def test_crop_boxes_bounds_and_distribution_match_torchvision(height, width):
    n = 20000
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    boxes = sample_crop_boxes(n, height, width, scale, ratio, _gen(0))
    top, left, h, w = boxes.unbind(1)
    assert boxes.dtype == torch.int64
    assert bool((top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all())
    area = (h * w).double() / (height * width)
    aspect = w.double() / h.double()
    # Rounding w and h to pixels moves the area and the aspect ratio by a few percent at most.
    assert float(area.min()) >= scale[0] * 0.95 and float(area.max()) <= scale[1]
    assert float(aspect.min()) >= ratio[0] * 0.97 and float(aspect.max()) <= ratio[1] * 1.03
    rng = random.Random(0)
    ref = torch.tensor([_torchvision_box(height, width, scale, ratio, rng) for _ in range(n)])
    ref_area = (ref[:, 2] * ref[:, 3]).double() / (height * width)
    ref_aspect = ref[:, 3].double() / ref[:, 2].double()
    assert torch.allclose(_quantiles(area), _quantiles(ref_area), atol=0.02)
    assert torch.allclose(_quantiles(aspect.log()), _quantiles(ref_aspect.log()), atol=0.02)
    # Placement is uniform over the free room: the mean relative offset is 1/2.
    free = (height - h).double().clamp_min(1)
    assert abs(float((top.double() / free)[height - h > 0].mean()) - 0.5) < 0.02


def test_crop_ratio_is_an_aspect_ratio_not_a_scale():
    n, side = 20000, 256
    boxes = sample_crop_boxes(n, side, side, scale=(0.08, 1.0), ratio=(0.5, 1.0), generator=_gen(1))
    h, w = boxes[:, 2].double(), boxes[:, 3].double()
    aspect = w / h
    area = h * w / side**2
    # Every box is at most square (w <= h, to rounding) and as narrow as 1:2 ...
    assert float(aspect.max()) <= 1.0 + 0.02 and float(aspect.min()) < 0.52
    # ... while the area fraction spreads over scale, far below the 0.5 a "ratio as scale" bug would floor it at.
    assert float(area.min()) < 0.1 and float((area < 0.5).double().mean()) > 0.4
    # A fixed ratio 2 and area 1/2: w = sqrt(0.5 * 256^2 * 2) = 256 wide, h = 128 high.
    wide = sample_crop_boxes(50, side, side, scale=(0.5, 0.5), ratio=(2.0, 2.0), generator=_gen(2))
    assert torch.all(wide[:, 2] == 128) and torch.all(wide[:, 3] == 256) and torch.all(wide[:, 1] == 0)


def test_crop_fallback_is_the_center_crop_clipped_to_the_ratio():
    # No box of >= 90% of a 10x200 strip has an aspect ratio <= 4/3: every sample falls back.
    boxes = sample_crop_boxes(6, 10, 200, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3), generator=_gen(3))
    w = round(10 * 4 / 3)
    assert torch.equal(boxes, torch.tensor([[0, (200 - w) // 2, 10, w]] * 6))
    tall = sample_crop_boxes(2, 200, 10, scale=(0.9, 1.0), generator=_gen(3))
    h = round(10 / (3 / 4))
    assert torch.equal(tall, torch.tensor([[(200 - h) // 2, 0, h, 10]] * 2))


@pytest.mark.parametrize("antialias", [True, False])
@pytest.mark.parametrize("size", [(16, 16), (45, 37), (12, 50)])
def test_resized_crop_equals_interpolate_of_each_crop(antialias, size):
    x = torch.rand(6, 3, 37, 29)
    boxes = sample_crop_boxes(6, 37, 29, generator=_gen(4))
    flip = torch.tensor([True, False, True, False, False, True])
    out = resized_crop(x, boxes, size, flip=flip, antialias=antialias)
    assert out.shape == (6, 3, *size)
    for b in range(6):
        t, l, h, w = boxes[b].tolist()
        ref = F.interpolate(x[b : b + 1, :, t : t + h, l : l + w], size=size, mode="bilinear", align_corners=False, antialias=antialias)
        if flip[b]:
            ref = ref.flip(-1)
        assert torch.allclose(out[b : b + 1], ref, atol=1e-5), (b, boxes[b])


def test_random_resized_crop_full_box_is_identity_and_flip_is_exact():
    x = torch.rand(4, 3, 10, 10)
    whole = RandomResizedCrop(10, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert torch.allclose(whole(x, _gen(0)), x, atol=1e-6)
    mirrored = RandomResizedCrop(10, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=1.0)
    assert torch.allclose(mirrored(x, _gen(0)), x.flip(-1), atol=1e-6)


def test_horizontal_flip_is_exact_per_image():
    x = torch.rand(64, 3, 5, 7)
    assert torch.equal(RandomHorizontalFlip(1.0)(x, _gen(0)), x.flip(-1))
    assert torch.equal(RandomHorizontalFlip(0.0)(x, _gen(0)), x)
    out = RandomHorizontalFlip(0.5)(x, _gen(0))
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(64)]
    kept = [torch.equal(out[i], x[i]) for i in range(64)]
    assert all(f != k for f, k in zip(flipped, kept)) and 16 < sum(flipped) < 48


# --------------------------------------------------------------------------------------------
# Colour
# --------------------------------------------------------------------------------------------


def test_grayscale_is_itu_r_601_luma():
    x = torch.rand(3, 3, 6, 5, dtype=torch.float64)
    gray = rgb_to_grayscale(x)
    ref = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    assert gray.shape == (3, 1, 6, 5) and torch.allclose(gray[:, 0], ref, atol=1e-12)
    out = RandomGrayscale(p=1.0)(x, _gen(0))
    assert torch.equal(out, gray.expand(-1, 3, -1, -1))
    assert torch.equal(RandomGrayscale(p=0.0)(x, _gen(0)), x)
    assert torch.equal(rgb_to_grayscale(x[:, :1]), x[:, :1])


def test_grayscale_matches_pillow_l_conversion():
    Image = pytest.importorskip("PIL.Image")
    rgb = torch.randint(0, 256, (16, 16, 3), dtype=torch.uint8)
    pil = torch.from_numpy(np.array(Image.fromarray(rgb.numpy()).convert("L"))).double()
    ours = rgb_to_grayscale(rgb.permute(2, 0, 1).unsqueeze(0))[0, 0].double() * 255.0
    # Pillow rounds its fixed-point luma to an integer.
    assert float((ours - pil).abs().max()) <= 0.5 + 1e-4


def test_solarize_is_exact():
    x = torch.rand(4, 3, 8, 8)
    x[0, 0, 0, :3] = torch.tensor([0.5, 0.4999, 1.0])
    ref = x.clone()
    ref[x >= 0.5] = 1.0 - x[x >= 0.5]
    assert torch.equal(solarize(x, 0.5), ref)
    assert torch.equal(RandomSolarize(0.5, p=1.0)(x, _gen(0)), ref)
    assert torch.equal(RandomSolarize(0.5, p=0.0)(x, _gen(0)), x)


def test_jitter_with_zero_strength_is_the_identity():
    x = torch.rand(8, 3, 9, 9)
    assert torch.equal(ColorJitter(0.0, 0.0, 0.0, 0.0, p=1.0)(x, _gen(0)), x)
    assert torch.equal(ColorJitter(0.5, 0.5, 0.5, 0.0, p=0.0)(x, _gen(0)), x)
    assert torch.allclose(adjust_hue(x, 0.0), x, atol=1e-6)


def test_hue_shift_matches_colorsys():
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    x[0, :, 0, 0] = 0.3  # a gray pixel keeps hue 0
    shifts = torch.tensor([0.3, -0.45], dtype=torch.float64)
    out = adjust_hue(x, shifts)
    for b in range(2):
        for i in range(6):
            for j in range(6):
                h, s, v = colorsys.rgb_to_hsv(*x[b, :, i, j].tolist())
                ref = colorsys.hsv_to_rgb((h + float(shifts[b])) % 1.0, s, v)
                assert torch.allclose(out[b, :, i, j], torch.tensor(ref, dtype=torch.float64), atol=1e-9)


def _plain_jitter(img: torch.Tensor, order, b: float, c: float, s: float, h: float) -> torch.Tensor:
    """torchvision's ColorJitter on one float image [3, H, W], steps in the given order."""
    def luma(t):
        return 0.299 * t[0] + 0.587 * t[1] + 0.114 * t[2]

    out = img.clone()
    for step in order:
        if step == 0:
            out = (out * b).clamp(0, 1)
        elif step == 1:
            out = (c * out + (1 - c) * luma(out).mean()).clamp(0, 1)
        elif step == 2:
            out = (s * out + (1 - s) * luma(out)).clamp(0, 1)
        else:
            flat = out.reshape(3, -1).T.tolist()
            shifted = []
            for r, g, bl in flat:
                hh, ss, vv = colorsys.rgb_to_hsv(r, g, bl)
                shifted.append(colorsys.hsv_to_rgb((hh + h) % 1.0, ss, vv))
            out = torch.tensor(shifted, dtype=img.dtype).T.reshape(img.shape)
    return out


def test_color_jitter_matches_plain_per_image_reference():
    x = torch.rand(24, 3, 5, 5, dtype=torch.float64)
    jitter = ColorJitter(0.8, 0.8, 0.8, 0.2, p=0.8)
    params = jitter.sample_params(24, _gen(7))
    assert params.order.shape == (24, 4) and torch.equal(params.order.sort(dim=1).values, torch.arange(4).expand(24, 4))
    assert len({tuple(o) for o in params.order.tolist()}) > 8  # orders vary per image
    assert 0 < int(params.applied.sum()) < 24
    assert float(params.brightness.min()) >= 0.2 and float(params.brightness.max()) <= 1.8
    assert float(params.hue.abs().max()) <= 0.2
    out = jitter.apply(x, params)
    for i in range(24):
        if params.applied[i]:
            ref = _plain_jitter(x[i], params.order[i].tolist(), *(float(t[i]) for t in params[2:]))
        else:
            ref = x[i]
        assert torch.allclose(out[i], ref, atol=1e-9), i
    # __call__ draws the same parameters from the same generator.
    assert torch.equal(jitter(x, _gen(7)), out)


def test_jitter_subset_and_masked_paths_agree(monkeypatch):
    x = torch.rand(16, 3, 6, 6)
    jitter = ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8)
    subset = jitter(x, _gen(3))
    monkeypatch.setattr(augment_module, "_subset_on_device", lambda device: False)
    assert torch.equal(jitter(x, _gen(3)), subset)


def test_jitter_on_gray_images_changes_brightness_and_contrast_only():
    x = torch.rand(6, 1, 7, 7)
    out = ColorJitter(0.0, 0.0, 0.9, 0.4, p=1.0)(x, _gen(0))
    assert torch.equal(out, x)
    assert not torch.equal(ColorJitter(0.5, 0.0, 0.0, 0.0, p=1.0)(x, _gen(0)), x)


# --------------------------------------------------------------------------------------------
# Blur
# --------------------------------------------------------------------------------------------


def test_gaussian_blur_matches_per_image_conv():
    x = torch.rand(4, 3, 13, 11, dtype=torch.float64)
    sigma = torch.tensor([0.1, 0.7, 1.3, 2.0], dtype=torch.float64)
    k = 5
    out = gaussian_blur(x, sigma, k)
    for b in range(4):
        t = torch.arange(k, dtype=torch.float64) - k // 2
        g = torch.exp(-(t**2) / (2 * float(sigma[b]) ** 2))
        g = g / g.sum()
        kernel = torch.outer(g, g).expand(3, 1, k, k)
        padded = F.pad(x[b : b + 1], (k // 2,) * 4, mode="reflect")
        ref = F.conv2d(padded, kernel, groups=3)
        assert torch.allclose(out[b : b + 1], ref, atol=1e-12), b
    flat = torch.full((2, 3, 8, 8), 0.37, dtype=torch.float64)
    assert torch.allclose(gaussian_blur(flat, 1.5, 7), flat, atol=1e-12)


def test_random_blur_probability_and_kernel_size_rule():
    assert [blur_kernel_size(s) for s in (32, 96, 224)] == [3, 9, 23]
    x = torch.rand(40, 3, 16, 16)
    assert torch.equal(GaussianBlur(3, p=0.0)(x, _gen(0)), x)
    always = GaussianBlur(3, p=1.0)(x, _gen(0))
    assert all(not torch.equal(always[i], x[i]) for i in range(40))
    half = GaussianBlur(3, p=0.5)(x, _gen(1))
    kept = sum(torch.equal(half[i], x[i]) for i in range(40))
    assert 8 < kept < 32


# --------------------------------------------------------------------------------------------
# Multi-view presets
# --------------------------------------------------------------------------------------------


def test_views_use_their_own_pipeline():
    calls = []

    def first(x, generator=None):
        calls.append("first")
        return x + 1

    def second(x, generator=None):
        calls.append("second")
        return x + 2

    x = torch.zeros(2, 3, 4, 4)
    views = MultiViewAugment([first, second]).views(x, 3)
    assert calls == ["first", "second", "first"] and [float(v[0, 0, 0, 0]) for v in views] == [1.0, 2.0, 1.0]


def test_byol_views_have_the_asymmetric_blur_and_solarize():
    aug = byol_augment(32)

    def probs(pipeline: Compose, kind):
        return [s.p for s in pipeline.steps if isinstance(s, kind)]

    assert [probs(p, GaussianBlur) for p in aug.pipelines] == [[1.0], [0.1]]
    assert [probs(p, RandomSolarize) for p in aug.pipelines] == [[0.0], [0.2]]
    # Behaviour, not only settings: on images that the crop and the jitter leave (almost) constant
    # at 0.8, only view 2 can be solarized (to 0.2 after the inversion).
    x = torch.full((200, 3, 32, 32), 0.8)
    plain = Compose([s for s in aug.pipelines[0].steps if not isinstance(s, (ColorJitter, RandomGrayscale))])
    assert float(plain(x, _gen(0)).min()) > 0.5
    v1, v2 = MultiViewAugment(
        [Compose([s for s in p.steps if not isinstance(s, (ColorJitter, RandomGrayscale))]) for p in aug.pipelines]
    ).views(x, 2, _gen(0))
    solarized = (v2.mean(dim=(1, 2, 3)) < 0.5).double().mean()
    assert float((v1.mean(dim=(1, 2, 3)) < 0.5).double().mean()) == 0.0 and 0.1 < float(solarized) < 0.3


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_bad_inputs_raise_one_line_errors():
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="4-D"):
        simclr_augment(8)(torch.rand(3, 8, 8))
    with pytest.raises(TypeError, match="uint8"):
        downstream_augment(8)(torch.ones(2, 3, 8, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="channels"):
        ColorJitter(0.4)(torch.rand(2, 2, 8, 8))
    with pytest.raises(ValueError, match="scale"):
        RandomResizedCrop(8, scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="ratio"):
        RandomResizedCrop(8, ratio=(2.0, 1.0))
    with pytest.raises(ValueError, match="probability"):
        RandomGrayscale(p=1.5)
    with pytest.raises(ValueError, match="hue"):
        ColorJitter(hue=0.6)
    with pytest.raises(ValueError, match="kernel_size"):
        GaussianBlur(4)
    with pytest.raises(ValueError, match="too large"):
        gaussian_blur(x, 1.0, 17)
    with pytest.raises(ValueError, match="channels"):
        Normalize((0.5,), (0.2,))(x)
    with pytest.raises(ValueError, match="std"):
        Normalize((0.5, 0.5, 0.5), (0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match="count"):
        simclr_augment(8).views(x, 0)
    with pytest.raises(ValueError, match="boxes"):
        resized_crop(x, torch.zeros(3, 4, dtype=torch.int64), 4)
