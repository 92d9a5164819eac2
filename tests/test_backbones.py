"""build_backbone: built-in names, any module, timm / torchvision wiring, one-line errors."""
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


def test_external_models_lose_their_classifier(monkeypatch):
    """The timm / torchvision paths, checked on stand-in modules (neither library is installed here)."""
    calls = []

    def create_model(name, pretrained, num_classes, in_chans):
        calls.append((name, pretrained, num_classes, in_chans))
        model = _FakeResNet()
        model.fc = nn.Identity()
        model.num_features = 4
        return model

    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(create_model=create_model))
    monkeypatch.setattr("bissl_fast.train.backbones._installed", lambda name: name == "timm")
    module, width = build_backbone("resnet50")
    assert calls == [("resnet50", False, 0, 3)] and width == 4
    fake_tv = types.SimpleNamespace(models=types.SimpleNamespace(get_model=lambda name, weights: _FakeResNet()))
    monkeypatch.setitem(sys.modules, "torchvision", fake_tv)
    module, width = build_backbone("torchvision:resnet18", in_channels=1)
    assert width == 4 and isinstance(module.fc, nn.Identity) and module.conv1.in_channels == 1
    assert module(torch.randn(2, 1, 8, 8)).shape == (2, 4) and feature_dim(module, 1) == 4
