"""LARS against a hand-written step; the warm-up + cosine schedule against its closed form."""
from __future__ import annotations

import math

import pytest
import torch
from helpers import rel_err

from bissl_fast.train.optim import (
    LARS,
    WarmupCosine,
    warmup_cosine,
    warmup_cosine_factor,
)


def _hand_lars(params, grads, mus, lr, wd, momentum, eta):
    out = []
    for p, g, mu in zip(params, grads, mus):
        d = g + wd * p
        pn, dn = float(p.norm()), float(d.norm())
        if pn > 0 and dn > 0:
            d = d * (eta * pn / dn)
        mu.mul_(momentum).add_(d)
        out.append(p - lr * mu)
    return out


def test_lars_matches_a_hand_written_step():
    torch.manual_seed(0)
    params = [torch.randn(5, 3, dtype=torch.float64, requires_grad=True), torch.zeros(4, dtype=torch.float64, requires_grad=True),
              torch.randn(2, dtype=torch.float64, requires_grad=True)]
    opt = LARS(params, lr=4.8, weight_decay=1e-6, momentum=0.9, eta=1e-3)
    ref = [p.detach().clone() for p in params]
    mus = [torch.zeros_like(p) for p in ref]
    for step in range(3):
        grads = [torch.randn_like(p) for p in params]
        grads[2] = torch.zeros_like(grads[2]) if step == 1 else grads[2]  # a zero update norm keeps the trust at 1
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        ref = _hand_lars(ref, grads, mus, 4.8, 1e-6, 0.9, 1e-3)
        assert rel_err([p.detach() for p in params], ref) < 1e-14
    # A zero parameter (norm 0) takes the raw update, as the paper's LARS does.
    assert float(params[1].detach().abs().max()) > 0


def test_lars_errors():
    p = [torch.zeros(2, requires_grad=True)]
    for kwargs, match in [(dict(lr=0.0), "lr"), (dict(lr=1.0, momentum=1.0), "momentum"), (dict(lr=1.0, eta=0.0), "eta"),
                          (dict(lr=1.0, weight_decay=-1.0), "weight_decay")]:
        with pytest.raises(ValueError, match=match):
            LARS(p, **kwargs)


def _closed_form(step, warmup, total, floor):
    s = step + 1
    if s < warmup:
        return s / warmup
    q = 0.5 * (1 + math.cos(math.pi * min((s - warmup) / (total - warmup), 1.0)))
    return q + floor * (1 - q)


@pytest.mark.parametrize("warmup,total", [(0, 50), (10, 50), (200, 10000)])
def test_warmup_cosine_closed_form(warmup, total):
    for step in range(total + 3):
        assert warmup_cosine_factor(step, warmup, total, 1e-3) == pytest.approx(_closed_form(step, warmup, total, 1e-3), abs=1e-15)
    assert warmup_cosine_factor(total - 1, warmup, total) == pytest.approx(1e-3)
    if warmup:
        assert warmup_cosine_factor(warmup - 1, warmup, total) == pytest.approx(1.0)


def test_scheduler_steps_per_optimizer_step_and_checkpoints():
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=2.0)
    sched = warmup_cosine(opt, warmup_steps=3, total_steps=10, floor=0.01)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([2.0 * _closed_form(k, 3, 10, 0.01) for k in range(10)], abs=1e-15)
    opt2 = torch.optim.SGD([p], lr=2.0)
    sched2 = warmup_cosine(opt2, warmup_steps=1, total_steps=2)
    sched2.load_state_dict(sched.state_dict())
    assert isinstance(sched2.lr_lambdas[0], WarmupCosine) and sched2.lr_lambdas[0].total_steps == 10
    with pytest.raises(ValueError, match="floor"):
        WarmupCosine(1, 10, floor=2.0)
