"""build_backbone: built-in names, any module, timm / torchvision wiring on stand-ins, one-line errors."""
from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

from bissl_fast.train.backbones import BUILTIN, build_backbone, feature_dim


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_builtin(name):
    module, width = build_backbone(name, in_channels=1)
    assert module(torch.randn(2, 1, 12, 12)).shape == (2, width)


def test_any_module_width_by_dummy_forward():
    net = nn.Sequential(nn.Conv2d(3, 5, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 7))
    net.train()
    module, width = build_backbone(net)
    assert module is net and width == 7 and net.training
    with pytest.raises(ValueError, match=r"must return features \[B, F\]"):
        build_backbone(nn.Conv2d(3, 4, 3))


def test_unknown_and_missing_dependencies(monkeypatch):
    with pytest.raises(ValueError, match=r"unknown backbone 'vgg0'; valid: tiny_cnn, .*resnet50.*timm:<name>"):
        build_backbone("vgg0")
    monkeypatch.setitem(sys.modules, "timm", None)
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setattr("bissl_fast.train.backbones._installed", lambda name: False)
    with pytest.raises(ImportError, match="pip install timm .*pip install torchvision"):
        build_backbone("resnet50")
    with pytest.raises(ImportError, match="needs timm: pip install timm"):
        build_backbone("timm:resnet50")
    with pytest.raises(ImportError, match="needs torchvision: pip install torchvision"):
        build_backbone("torchvision:resnet18")


class _FakeResNet(nn.Module):
    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, bias=False)
        self.fc = nn.Linear(4, classes)

    def forward(self, x):
        return self.fc(self.conv1(x).mean(dim=(2, 3)))


def _fake_torchvision(model_factory, names=("resnet18",), other=()):
    return types.SimpleNamespace(models=types.SimpleNamespace(
        list_models=lambda module=None: list(names) if module is not None else [*names, *other],
        get_model_builder=lambda name: lambda **kwargs: model_factory(),
    ))


def test_external_models_lose_their_classifier(monkeypatch):
    """The timm / torchvision wiring, on stand-in modules (the real packages: test_integration_backbones.py)."""
    calls = []

    def create_model(name, **kwargs):
        calls.append((name, kwargs))
        model = _FakeResNet()
        model.fc = nn.Identity()
        return model

    fake_timm = types.SimpleNamespace(create_model=create_model, is_model=lambda name: name == "resnet50")
    monkeypatch.setitem(sys.modules, "timm", fake_timm)
    monkeypatch.setattr("bissl_fast.train.backbones._installed", lambda name: name == "timm")
    module, width = build_backbone("resnet50")
    assert calls == [("resnet50", {"pretrained": False, "num_classes": 0, "in_chans": 3})] and width == 4
    with pytest.raises(ValueError, match=r"unknown timm model 'resnet9' \(timm.list_models\(\) names them\)"):
        build_backbone("timm:resnet9")
    monkeypatch.setitem(sys.modules, "torchvision", _fake_torchvision(_FakeResNet))
    module, width = build_backbone("torchvision:resnet18", in_channels=1)
    assert width == 4 and isinstance(module.fc, nn.Identity) and module.conv1.in_channels == 1
    assert module(torch.randn(2, 1, 8, 8)).shape == (2, 4) and feature_dim(module, 1) == 4


class _Headed(nn.Module):
    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = classifier

    def forward(self, x):
        return self.classifier(self.features(x))


@pytest.mark.parametrize("classifier,width,kept", [
    (nn.Sequential(nn.Dropout(0.2), nn.Linear(6, 10)), 6, nn.Identity),                          # EfficientNet, MobileNetV2
    (nn.Sequential(nn.Linear(6, 5), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(5, 10)), 5, nn.Sequential),  # MobileNetV3
    (nn.Sequential(nn.LayerNorm(6), nn.Flatten(1), nn.Linear(6, 10)), 6, nn.Sequential),          # ConvNeXt
    (nn.Linear(6, 10), 6, nn.Identity),                                                           # DenseNet
])
def test_torchvision_classifier_loses_its_last_linear_and_dropout(monkeypatch, classifier, width, kept):
    monkeypatch.setitem(sys.modules, "torchvision", _fake_torchvision(lambda: _Headed(classifier), names=("net",)))
    module, found = build_backbone("torchvision:net")
    assert found == width and isinstance(module.classifier, kept)
    assert not any(isinstance(m, nn.Dropout) or (isinstance(m, nn.Linear) and m.out_features == 10) for m in module.modules())
    module.train()
    x = torch.randn(3, 3, 9, 9)
    assert torch.equal(module(x), module(x))  # no dropout left in the features


def test_torchvision_refusals_are_one_line(monkeypatch):
    squeeze = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(6, 10, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
    monkeypatch.setitem(sys.modules, "torchvision", _fake_torchvision(lambda: _Headed(squeeze), names=("squeeze",),
                                                                      other=("fasterrcnn",)))
    with pytest.raises(ValueError, match=r"^backbone 'torchvision:squeeze': its classifier 'classifier' does not end in a "
                                         r"Linear layer \(Sequential\), so there is no feature layer to keep$"):
        build_backbone("torchvision:squeeze")
    with pytest.raises(ValueError, match=r"^backbone 'torchvision:fasterrcnn': a detection, segmentation, video, "
                                         r"optical-flow or quantized torchvision model; build_backbone takes"):
        build_backbone("torchvision:fasterrcnn")
    with pytest.raises(ValueError, match=r"^backbone 'torchvision:nope': no torchvision model;"):
        build_backbone("torchvision:nope")


def test_probe_failure_is_one_line():
    class Fails(nn.Module):
        def forward(self, x):
            raise RuntimeError("Expected 224 but got 32\nsecond line")

    with pytest.raises(ValueError, match=r"^backbone failed on a dummy \[2, 3, 32, 32\] batch: Expected 224 but got 32 "
                                         r"\(image_size= sets the probe's size\)$"):
        build_backbone(Fails())
