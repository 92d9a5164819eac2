"""Backbones by name or module: ``build_backbone(arch, in_channels, image_size) -> (module, feature_dim)``.

Every backbone maps images ``[B, in_channels, H, W]`` to features ``[B, feature_dim]``.

- Built-in (no extra dependency): ``tiny_resnet`` / ``small_resnet`` / ``resnet18_cifar``
  (:mod:`bissl_fast.train.models`, BatchNorm) and ``tiny_cnn`` (two convolutions, tanh, no BatchNorm:
  its result does not depend on how a batch is split over ranks).
- ``resnet18`` / ``resnet34`` / ``resnet50`` / ``resnet101`` / ``resnet152``: timm's model (the
  paper's choice) when timm is installed, else torchvision's (the two name their tensors alike).
- ``timm:<name>``: any timm model, built with ``num_classes=0`` (timm's own classifier removal: the
  features are its pre-logits) and ``in_chans``.
- ``torchvision:<name>``: any torchvision classification model (``torchvision.models.list_models(
  module=torchvision.models)``): ResNet / ResNeXt / RegNet, EfficientNet, MobileNet, ConvNeXt, ViT,
  Swin, VGG, DenseNet, ... Its classifier loses its last ``Linear`` and the dropout just before it
  (so MobileNetV3 keeps its pre-logits layer, ConvNeXt its last LayerNorm, as timm does); GoogLeNet /
  Inception lose their auxiliary classifiers; with ``in_channels != 3`` the first convolution is rebuilt.
- Any ``nn.Module`` returning ``[B, F]``: used as is.

Models with a fixed input size (ViTs) are built for ``image_size`` when given, else keep their native
size. The feature width is measured: one forward of a dummy ``[2, in_channels, S, S]`` batch (eval
mode) with ``S`` = ``image_size``, else the model's fixed size, else 64 (32 for modules passed in);
a model that cannot run it is refused with one line.
"""
from __future__ import annotations

from typing import Any, Callable

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
#: Probe side for models that take any input size (big enough for every stride-32 network).
_PROBE_SIZE = 64


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
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"backbone failed on a dummy [2, {in_channels}, {size}, {size}] batch: {first_line} "
                         "(image_size= sets the probe's size)") from exc
    finally:
        module.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ValueError(f"a backbone must return features [B, F], got {getattr(out, 'shape', type(out).__name__)}")
    return int(out.shape[1])


def _timm(name: str, in_channels: int, image_size: int | None) -> tuple[nn.Module, int]:
    try:
        import timm
    except ImportError:
        raise ImportError(f"backbone {name!r} needs timm: pip install timm") from None
    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r} (timm.list_models() names them)")
    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": 0, "in_chans": in_channels}
    model = timm.create_model(name, **kwargs)
    fixed = getattr(getattr(model, "patch_embed", None), "img_size", None)
    native = int(fixed[0]) if isinstance(fixed, (tuple, list)) else fixed
    if image_size is not None and native is not None and image_size != native:
        model = timm.create_model(name, img_size=image_size, **kwargs)
    return model, feature_dim(model, in_channels, image_size or native or _PROBE_SIZE)


def _drop_final_linear(head: nn.Module) -> tuple[nn.Module, int] | None:
    """``head`` without its last ``Linear`` and the dropout just before it, and that Linear's input
    width; ``None`` when the head does not end in a ``Linear`` (after dropout / identity layers)."""
    if isinstance(head, nn.Linear):
        return nn.Identity(), head.in_features
    if not isinstance(head, nn.Sequential):
        return None
    layers = list(head.children())
    while layers and isinstance(layers[-1], (nn.Dropout, nn.Identity)):
        layers.pop()
    if not layers or not isinstance(layers[-1], nn.Linear):
        return None
    width = layers.pop().in_features
    while layers and isinstance(layers[-1], nn.Dropout):
        layers.pop()
    return (nn.Sequential(*layers) if layers else nn.Identity()), width


def _rebuild_first_conv(model: nn.Module, in_channels: int, label: str) -> None:
    """Replace the first ``Conv2d`` (the stem, in registration order) by one taking ``in_channels``."""
    name, conv = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), ("", None))
    if conv is None or conv.in_channels != 3:
        raise ValueError(f"backbone {label!r}: cannot adapt it to in_channels={in_channels} (its first layer is "
                         "not a 3-channel Conv2d)")
    parent_name, _, attr = name.rpartition(".")
    stem = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                     conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode)
    setattr(model.get_submodule(parent_name), attr, stem)


def _torchvision(name: str, in_channels: int, image_size: int | None) -> tuple[nn.Module, int]:
    label = f"torchvision:{name}"
    try:
        import torchvision
    except ImportError:
        raise ImportError(f"backbone {label!r} needs torchvision: pip install torchvision") from None
    if name not in torchvision.models.list_models(module=torchvision.models):
        kind = "a detection, segmentation, video, optical-flow or quantized" if name in torchvision.models.list_models() else "no"
        raise ValueError(f"backbone {label!r}: {kind} torchvision model; build_backbone takes torchvision's image "
                         "classifiers (torchvision.models.list_models(module=torchvision.models))")
    builder = torchvision.models.get_model_builder(name)
    kwargs: dict[str, Any] = {"weights": None}
    model = builder(**kwargs)
    if getattr(model, "aux_logits", False):  # GoogLeNet / Inception: side classifiers, and a tuple in train mode
        kwargs["aux_logits"] = False
    native = getattr(model, "image_size", None)  # ViT: position embeddings for one input size
    if image_size is not None and isinstance(native, int) and image_size != native:
        kwargs["image_size"] = image_size
    if len(kwargs) > 1:
        model = builder(**kwargs)
    for attr in ("fc", "classifier", "heads", "head"):
        head = getattr(model, attr, None)
        if isinstance(head, nn.Module):
            stripped = _drop_final_linear(head)
            if stripped is None:
                raise ValueError(f"backbone {label!r}: its classifier {attr!r} does not end in a Linear layer "
                                 f"({type(head).__name__}), so there is no feature layer to keep")
            setattr(model, attr, stripped[0])
            break
    else:
        raise ValueError(f"backbone {label!r}: no classifier found under fc, classifier, heads or head")
    if in_channels != 3:
        _rebuild_first_conv(model, in_channels, label)
    return model, feature_dim(model, in_channels, image_size or native or _PROBE_SIZE)


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def build_backbone(arch: str | nn.Module, in_channels: int = 3, image_size: int | None = None) -> tuple[nn.Module, int]:
    """``(backbone, feature_dim)`` for a name (see the module docstring) or an ``nn.Module``.

    ``image_size``: the side of the images it will see; ViTs are built for it, and the feature width
    is probed at it. Raises one line (``ValueError`` / ``ImportError``) for what it cannot build.
    """
    check_int_at_least("in_channels", in_channels, 1)
    if image_size is not None:
        check_int_at_least("image_size", image_size, 1)
    if isinstance(arch, nn.Module):
        return arch, feature_dim(arch, in_channels, image_size or 32)
    if not isinstance(arch, str):
        raise TypeError(f"arch must be a name or an nn.Module, got {type(arch).__name__}")
    if arch in BUILTIN:
        module = BUILTIN[arch](in_channels)
        return module, int(module.out_dim)
    source, _, name = arch.partition(":")
    if name:
        if source == "timm":
            return _timm(name, in_channels, image_size)
        if source == "torchvision":
            return _torchvision(name, in_channels, image_size)
    elif arch in EXTERNAL:
        if _installed("timm"):
            return _timm(arch, in_channels, image_size)
        if _installed("torchvision"):
            return _torchvision(arch, in_channels, image_size)
        raise ImportError(f"backbone {arch!r} needs timm or torchvision: pip install timm (the paper's) or pip install torchvision")
    raise ValueError(f"unknown backbone {arch!r}; valid: {valid_names()}")


__all__ = ["BUILTIN", "EXTERNAL", "TinyCNN", "build_backbone", "feature_dim", "valid_names"]
