"""The paper-style implicit-gradient solve (reference.implicit_grad): one solve, recomputing every HVP.

The loss references are timed as the ``reference`` provider of each op's own suite.
"""
from __future__ import annotations

import torch

from bissl_fast import reference
from bissl_fast.train.models import SmallResNet


def test_reference_implicit_grad(benchmark_op, bench_device):
    torch.manual_seed(0)
    net = SmallResNet(1, widths=(8, 16)).to(bench_device)
    x = torch.randn(32, 1, 12, 12, device=bench_device)
    params = tuple(net.parameters())
    v = tuple(torch.randn_like(p) for p in params)

    def loss_fn():
        return reference.nt_xent(net(x), 0.5)

    benchmark_op(lambda: reference.implicit_grad(loss_fn, params, v), [()], op="implicit_grad", provider="reference",
                 mode="solve", size={"B": 32, "P": sum(p.numel() for p in params)}, dtype=torch.float32,
                 device=bench_device)
