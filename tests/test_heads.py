"""The paper's heads: layer layout, shapes, bias-free last layer."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from bissl_fast.train.heads import (
    PAPER_MLP,
    Classifier,
    ProjectionModel,
    linear_head,
    predictor,
    projector,
)


def test_projector_layout_is_the_papers():
    proj = projector(2048)
    kinds = [type(m) for m in proj]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    linears = [m for m in proj if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(2048, 256), (256, 256), (256, 256)]
    assert linears[0].bias is not None and linears[1].bias is not None and linears[2].bias is None
    assert proj(torch.randn(4, 2048)).shape == (4, 256)
    pred = predictor()
    assert [type(m) for m in pred] == kinds and pred(torch.randn(3, 256)).shape == (3, 256)
    assert PAPER_MLP == (256, 256, 256)
    assert [type(m) for m in projector(8, (16, 4), batchnorm=False)] == [nn.Linear, nn.ReLU, nn.Linear]


def test_models_have_the_trainer_attributes():
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(12, 6))
    pretext = ProjectionModel(backbone, 6, byol=True, widths=(10, 5))
    assert pretext(torch.randn(3, 2, 6)).shape == (3, 5)
    assert pretext.predictor(torch.randn(3, 5)).shape == (3, 5)
    assert ProjectionModel(backbone, 6).predictor is None
    clf = Classifier(backbone, 6, 4)
    assert isinstance(clf.head, nn.Linear) and clf(torch.randn(3, 2, 6)).shape == (3, 4)
    with pytest.raises(ValueError, match="num_classes"):
        linear_head(6, 1)
    with pytest.raises(ValueError, match="widths must name"):
        projector(6, ())
