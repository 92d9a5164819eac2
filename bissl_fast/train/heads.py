"""The paper's heads (docs/design.md §2.5): SimCLR/BYOL projector, BYOL predictor, downstream linear head.

The projector is ``feat -> 256 -> 256 -> 256``: hidden ``Linear`` layers (with bias) each followed
by ``BatchNorm1d`` and ``ReLU``, and a last ``Linear`` without bias. The BYOL predictor has the
same layout on the projector's output. :class:`ProjectionModel` / :class:`Classifier` hold a
backbone and heads under the attribute names :class:`bissl_fast.BiSSLTrainer` expects.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .._validation import check_int_at_least

#: The paper's projector / predictor widths after the input: ``feat -> 256 -> 256 -> 256``.
PAPER_MLP = (256, 256, 256)


def projector(in_dim: int, widths: Sequence[int] = PAPER_MLP, batchnorm: bool = True) -> nn.Sequential:
    """MLP ``[B, in_dim] -> [B, widths[-1]]``: Linear(+BN)+ReLU per hidden width, a bias-free last Linear."""
    check_int_at_least("in_dim", in_dim, 1)
    widths = [check_int_at_least(f"widths[{i}]", w, 1) for i, w in enumerate(widths)]
    if not widths:
        raise ValueError("widths must name at least the output width")
    dims = [in_dim, *widths]
    layers: list[nn.Module] = []
    for i in range(len(dims) - 2):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if batchnorm:
            layers.append(nn.BatchNorm1d(dims[i + 1]))
        layers.append(nn.ReLU(inplace=True))
    layers.append(nn.Linear(dims[-2], dims[-1], bias=False))
    return nn.Sequential(*layers)


def predictor(dim: int = PAPER_MLP[-1], widths: Sequence[int] = PAPER_MLP, batchnorm: bool = True) -> nn.Sequential:
    """BYOL predictor ``[B, dim] -> [B, widths[-1]]``, laid out like :func:`projector`."""
    return projector(dim, widths, batchnorm)


def linear_head(in_dim: int, num_classes: int) -> nn.Linear:
    """Downstream classifier ``[B, in_dim] -> [B, num_classes]`` logits."""
    check_int_at_least("in_dim", in_dim, 1)
    check_int_at_least("num_classes", num_classes, 2)
    return nn.Linear(in_dim, num_classes)


class ProjectionModel(nn.Module):
    """Lower-level model: ``backbone`` + ``head`` (the projector) and, for BYOL, ``predictor``.

    ``forward(x)`` returns the projection ``head(backbone(x))`` ``[B, widths[-1]]``.
    """

    def __init__(
        self, backbone: nn.Module, feature_dim: int, byol: bool = False, widths: Sequence[int] = PAPER_MLP, batchnorm: bool = True
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = projector(feature_dim, widths, batchnorm)
        self.predictor = predictor(widths[-1], widths, batchnorm) if byol else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class Classifier(nn.Module):
    """Upper-level model: ``backbone`` + linear ``head``; ``forward(x)`` returns logits ``[B, num_classes]``."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = linear_head(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


__all__ = ["PAPER_MLP", "Classifier", "ProjectionModel", "linear_head", "predictor", "projector"]
