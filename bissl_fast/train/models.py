"""Small ResNet-style models for tests, benchmarks and the demo (no torchvision needed).

``SmallResNet`` is a CIFAR-style ResNet (3x3 stem, BasicBlocks, BatchNorm, global pooling) whose
width and depth are arguments; ``resnet18_cifar`` gives the standard ResNet-18 layout.
:class:`PretextModel` carries the small SimCLR projector / BYOL predictor MLPs used with them (the
paper's wider heads and the linear classifier are in :mod:`bissl_fast.train.heads`).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """ResNet backbone: ``[B, in_channels, H, W]`` images to ``[B, out_dim]`` features.

    ``widths[k]`` channels and ``blocks[k]`` BasicBlocks in stage ``k`` (stride 2 from stage 1 on).
    """

    def __init__(self, in_channels: int = 1, widths: Sequence[int] = (16, 32), blocks: Sequence[int] = (1, 1)) -> None:
        super().__init__()
        if len(widths) != len(blocks) or not widths:
            raise ValueError(f"widths and blocks must be non-empty and of equal length, got {widths}, {blocks}")
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers = []
        in_ch = widths[0]
        for stage, (width, count) in enumerate(zip(widths, blocks)):
            for i in range(count):
                layers.append(BasicBlock(in_ch, width, 2 if (stage > 0 and i == 0) else 1))
                in_ch = width
        self.layers = nn.Sequential(*layers)
        self.out_dim = in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.stem(x)).mean(dim=(2, 3))


def resnet18_cifar(in_channels: int = 3) -> SmallResNet:
    """ResNet-18 layout (64-128-256-512 channels, 2 blocks per stage) with a CIFAR 3x3 stem."""
    return SmallResNet(in_channels, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2))


def mlp_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """SimCLR projector / BYOL projector-predictor: Linear-BN-ReLU-Linear."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, out_dim))


class PretextModel(nn.Module):
    """Lower-level model: ``backbone`` + ``head`` (projector; BYOL adds a ``predictor``)."""

    def __init__(self, backbone: nn.Module, feature_dim: int, proj_dim: int = 64, hidden_dim: int = 128, predictor: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = mlp_head(feature_dim, hidden_dim, proj_dim)
        self.predictor = mlp_head(proj_dim, hidden_dim, proj_dim) if predictor else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))
