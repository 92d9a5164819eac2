"""Backbones by name or module: ``build_backbone(arch, in_channels) -> (module, feature_dim)``.

Every backbone maps images ``[B, in_channels, H, W]`` to features ``[B, feature_dim]``.

- Built-in (no extra dependency): ``tiny_resnet`` / ``small_resnet`` / ``resnet18_cifar``
  (:mod:`bissl_fast.train.models`, BatchNorm) and ``tiny_cnn`` (two convolutions, tanh, no BatchNorm:
  its result does not depend on how a batch is split over ranks).
- ``resnet18`` / ``resnet34`` / ``resnet50`` / ``resnet101`` / ``resnet152``: timm's model (the
  paper's choice) when timm is installed, else torchvision's; ``timm:<name>`` or
  ``torchvision:<name>`` picks one. The classifier is removed; the feature width is read off the
  model (or found by one dummy forward).
- Any ``nn.Module`` returning ``[B, F]``: used as is, ``F`` found by a dummy forward.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .._validation import check_int_at_least
from .models import SmallResNet, resnet18_cifar


class TinyCNN(nn.Module):
    """Two 3x3 convolutions with tanh and global average pooling: ``[B, C, H, W] -> [B, width]``; no BatchNorm."""

    def __init__(self, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width // 2, 3, padding=1)
        self.conv2 = nn.Conv2d(width // 2, width, 3, stride=2, padding=1)
        self.out_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv2(torch.tanh(self.conv1(x)))).mean(dim=(2, 3))


BUILTIN: dict[str, Callable[[int], nn.Module]] = {
    "tiny_cnn": lambda c: TinyCNN(c),
    "tiny_resnet": lambda c: SmallResNet(c, widths=(8, 16), blocks=(1, 1)),
    "small_resnet": lambda c: SmallResNet(c, widths=(16, 32), blocks=(1, 1)),
    "resnet18_cifar": resnet18_cifar,
}
#: Names resolved through timm (preferred, as in the paper) or torchvision.
EXTERNAL = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def valid_names() -> str:
    return ", ".join([*BUILTIN, *EXTERNAL]) + ", timm:<name>, torchvision:<name>"


@torch.no_grad()
def feature_dim(module: nn.Module, in_channels: int, size: int = 32) -> int:
    """Width ``F`` of ``module``'s ``[B, F]`` output on a dummy ``[2, in_channels, size, size]`` batch (eval mode)."""
    was_training = module.training
    param = next(module.parameters(), None)
    x = torch.zeros(2, in_channels, size, size, device=param.device if param is not None else None,
                    dtype=param.dtype if param is not None else None)
    module.eval()
    try:
        out = module(x)
    except Exception as exc:
        raise ValueError(f"backbone failed on a dummy [2, {in_channels}, {size}, {size}] batch: {exc}") from exc
    finally:
        module.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ValueError(f"a backbone must return features [B, F], got {getattr(out, 'shape', type(out).__name__)}")
    return int(out.shape[1])


def _strip_classifier(model: nn.Module) -> int | None:
    """Replace the classifier with ``Identity``; returns its input width when it is one ``Linear``."""
    for attr in ("fc", "classifier", "head"):
        layer = getattr(model, attr, None)
        if isinstance(layer, nn.Linear):
            setattr(model, attr, nn.Identity())
            return layer.in_features
    return None


def _timm(name: str, in_channels: int) -> tuple[nn.Module, int]:
    try:
        import timm
    except ImportError:
        raise ImportError(f"backbone {name!r} needs timm: pip install timm") from None
    model = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_channels)
    width = getattr(model, "num_features", None)
    return model, int(width) if isinstance(width, int) else feature_dim(model, in_channels, 64)


def _torchvision(name: str, in_channels: int) -> tuple[nn.Module, int]:
    try:
        import torchvision
    except ImportError:
        raise ImportError(f"backbone {name!r} needs torchvision: pip install torchvision") from None
    model = torchvision.models.get_model(name, weights=None)
    conv1 = getattr(model, "conv1", None)
    if in_channels != 3 and isinstance(conv1, nn.Conv2d):
        model.conv1 = nn.Conv2d(in_channels, conv1.out_channels, conv1.kernel_size, conv1.stride, conv1.padding, bias=False)
    width = _strip_classifier(model)
    return model, width if width is not None else feature_dim(model, in_channels, 64)


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def build_backbone(arch: str | nn.Module, in_channels: int = 3) -> tuple[nn.Module, int]:
    """``(backbone, feature_dim)`` for a name (see the module docstring) or an ``nn.Module``."""
    check_int_at_least("in_channels", in_channels, 1)
    if isinstance(arch, nn.Module):
        return arch, feature_dim(arch, in_channels)
    if not isinstance(arch, str):
        raise TypeError(f"arch must be a name or an nn.Module, got {type(arch).__name__}")
    if arch in BUILTIN:
        module = BUILTIN[arch](in_channels)
        return module, int(module.out_dim)
    source, _, name = arch.partition(":")
    if name:
        if source == "timm":
            return _timm(name, in_channels)
        if source == "torchvision":
            return _torchvision(name, in_channels)
    elif arch in EXTERNAL:
        if _installed("timm"):
            return _timm(arch, in_channels)
        if _installed("torchvision"):
            return _torchvision(arch, in_channels)
        raise ImportError(f"backbone {arch!r} needs timm or torchvision: pip install timm (the paper's) or pip install torchvision")
    raise ValueError(f"unknown backbone {arch!r}; valid: {valid_names()}")


__all__ = ["BUILTIN", "EXTERNAL", "TinyCNN", "build_backbone", "feature_dim", "valid_names"]
