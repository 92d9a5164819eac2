"""build_backbone on the real torchvision and timm models: classifier removed, feature width right, ViTs at
their native or a given size, other channel counts, one-line refusals. Random weights only."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from bissl_fast.train.backbones import build_backbone
from helpers import import_or_skip

pytestmark = pytest.mark.integration


def _check(module: nn.Module, width: int, channels: int, size: int, classes: int = 1000) -> None:
    """Features ``[B, width]`` in train and eval mode, and no ``classes``-way layer left."""
    assert not any(isinstance(m, nn.Linear) and m.out_features == classes for m in module.modules())
    x = torch.randn(2, channels, size, size)
    for training in (True, False):
        module.train(training)
        with torch.no_grad():
            assert module(x).shape == (2, width), training


@pytest.mark.parametrize("name,width", [
    ("resnet18", 512), ("resnet50", 2048), ("efficientnet_b0", 1280), ("mobilenet_v2", 1280),
    ("mobilenet_v3_small", 1024), ("mobilenet_v3_large", 1280), ("convnext_tiny", 768), ("regnet_y_400mf", 440),
    ("densenet121", 1024), ("swin_t", 768), ("googlenet", 1024), ("vgg11", 4096),
])
def test_torchvision_models(name, width):
    import_or_skip("torchvision")
    module, found = build_backbone(f"torchvision:{name}")
    assert found == width
    _check(module, width, 3, 64)


def test_torchvision_vit_at_native_and_given_size():
    import_or_skip("torchvision")
    module, width = build_backbone("torchvision:vit_b_16")
    assert width == 768 and module.image_size == 224
    _check(module, 768, 3, 224)
    module, width = build_backbone("torchvision:vit_b_16", image_size=96)
    assert width == 768 and module.image_size == 96
    _check(module, 768, 3, 96)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "convnext_tiny", "vit_b_16"])
def test_torchvision_other_channel_counts(name):
    import_or_skip("torchvision")
    size = 32 if name == "vit_b_16" else 48
    module, width = build_backbone(f"torchvision:{name}", in_channels=1, image_size=size)
    _check(module, width, 1, size)


def test_torchvision_refusals_are_one_line():
    import_or_skip("torchvision")
    for name, match in (
        ("squeezenet1_0", r"its classifier 'classifier' does not end in a Linear layer \(Sequential\)"),
        ("fasterrcnn_resnet50_fpn", r"a detection, segmentation, video, optical-flow or quantized torchvision model"),
        ("r3d_18", r"a detection, segmentation, video, optical-flow or quantized torchvision model"),
        ("resnet9", r"no torchvision model; build_backbone takes torchvision's image classifiers"),
    ):
        with pytest.raises(ValueError, match=rf"^backbone 'torchvision:{name}': {match}") as info:
            build_backbone(f"torchvision:{name}")
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"^backbone failed on a dummy \[2, 3, 64, 64\] batch: .*\(image_size= sets") as info:
        build_backbone("torchvision:inception_v3")  # needs at least 75 px
    assert "\n" not in str(info.value)
    module, width = build_backbone("torchvision:inception_v3", image_size=80)  # no auxiliary classifier left
    assert width == 2048 and module.AuxLogits is None
    _check(module, 2048, 3, 80)


@pytest.mark.parametrize("name,width", [
    ("resnet50", 2048), ("efficientnet_b0", 1280), ("mobilenetv3_small_100", 1024), ("convnext_atto", 320),
])
def test_timm_models(name, width):
    import_or_skip("timm")
    module, found = build_backbone(f"timm:{name}")
    assert found == width
    _check(module, width, 3, 64)
    module, found = build_backbone(f"timm:{name}", in_channels=2)
    _check(module, width, 2, 64)


def test_timm_vit_at_native_and_given_size():
    import_or_skip("timm")
    module, width = build_backbone("timm:vit_tiny_patch16_224")
    assert width == 192
    _check(module, 192, 3, 224)
    module, width = build_backbone("timm:vit_tiny_patch16_224", image_size=96)
    _check(module, 192, 3, 96)
    with pytest.raises(ValueError, match=r"^unknown timm model 'resnet9' \(timm.list_models\(\) names them\)$"):
        build_backbone("timm:resnet9")


def test_paper_names_prefer_timm():
    import_or_skip("timm")
    module, width = build_backbone("resnet50", image_size=96)
    assert type(module).__module__.startswith("timm") and width == 2048
