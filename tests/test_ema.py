"""EMATarget: the EMA formula, frozen target parameters, reset, errors."""
from __future__ import annotations

import pytest
import torch
from helpers import rel_err
from torch import nn

from bissl_fast.train.ema import BYOL_MOMENTUM, EMATarget


def test_update_is_the_ema_formula_and_buffers_stay_the_targets():
    online = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    ema = EMATarget(online)
    assert ema.momentum == BYOL_MOMENTUM == 0.9995
    target = ema.modules[0]
    assert all(not p.requires_grad for p in target.parameters())
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
        online[1].running_mean.add_(3.0)
    before = [p.clone() for p in target.parameters()]
    ema.update(0.9)
    expected = [0.9 * t + 0.1 * o.detach() for t, o in zip(before, online.parameters())]
    assert rel_err([p for p in target.parameters()], expected) < 1e-7
    assert torch.equal(target[1].running_mean, torch.zeros(4))  # buffers are not averaged
    ema.update()
    expected = [BYOL_MOMENTUM * t + (1 - BYOL_MOMENTUM) * o.detach() for t, o in zip(expected, online.parameters())]
    assert rel_err([p for p in target.parameters()], expected) < 1e-7
    ema.reset()
    for t, o in zip(target.parameters(), online.parameters()):
        assert torch.equal(t, o.detach())


def test_given_targets_and_several_modules():
    backbone, head = nn.Linear(3, 4), nn.Linear(4, 2)
    t_backbone, t_head = nn.Linear(3, 4), nn.Linear(4, 2)
    ema = EMATarget([backbone, head], [t_backbone, t_head], momentum=0.0)
    ema.update()
    for t, o in zip(list(t_backbone.parameters()) + list(t_head.parameters()), list(backbone.parameters()) + list(head.parameters())):
        assert torch.equal(t, o.detach())


def test_errors():
    with pytest.raises(ValueError, match="momentum must be in"):
        EMATarget(nn.Linear(2, 2), momentum=1.5)
    with pytest.raises(ValueError, match="momentum"):
        EMATarget(nn.Linear(2, 2)).update(-0.1)
    with pytest.raises(ValueError, match="parameter shapes"):
        EMATarget(nn.Linear(2, 2), nn.Linear(2, 3))
    with pytest.raises(ValueError, match="target has 1 modules, online 2"):
        EMATarget([nn.Linear(2, 2), nn.Linear(2, 2)], [nn.Linear(2, 2)])
    with pytest.raises(TypeError, match="online must be an nn.Module"):
        EMATarget("net")
