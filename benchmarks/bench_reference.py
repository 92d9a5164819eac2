"""Timings of the plain-PyTorch reference ops on this device (the baselines every fast path beats)."""
from __future__ import annotations

import pytest
import torch

from bissl_fast import reference
from bissl_fast.models import SmallResNet

from bench_utils import bench_sizes_full


def _sizes(device, small, full):
    return full if bench_sizes_full(device) else small


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("n,d", [(512, 128), (2048, 128), (8192, 256)])
def test_reference_nt_xent(benchmark_op, bench_device, mode, n, d):
    if (n, d) not in _sizes(bench_device, [(512, 128), (2048, 128)], [(512, 128), (2048, 128), (8192, 256)]):
        pytest.skip("size only in the full grid")
    inputs = [(torch.randn(n, d, device=bench_device, requires_grad=mode != "fwd"),) for _ in range(3)]

    def step(z):
        loss = reference.nt_xent(z, 0.5)
        if mode == "fwd+bwd":
            loss.backward()
        return loss

    benchmark_op(step, inputs, op="nt_xent", provider="reference", mode=mode, size={"N": n, "D": d},
                 dtype=torch.float32, device=bench_device, flops=(2 if mode == "fwd" else 4) * 2 * n * n * d)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("b,d", [(256, 256), (4096, 256)])
def test_reference_byol(benchmark_op, bench_device, mode, b, d):
    inputs = []
    for _ in range(3):
        p1, p2 = (torch.randn(b, d, device=bench_device, requires_grad=mode != "fwd") for _ in range(2))
        t1, t2 = (torch.randn(b, d, device=bench_device) for _ in range(2))
        inputs.append((p1, p2, t1, t2))

    def step(p1, p2, t1, t2):
        loss = reference.byol_loss(p1, p2, t1, t2)
        if mode == "fwd+bwd":
            loss.backward()
        return loss

    benchmark_op(step, inputs, op="byol", provider="reference", mode=mode, size={"B": b, "D": d},
                 dtype=torch.float32, device=bench_device, bytes_moved=(4 + (2 if mode == "fwd+bwd" else 0)) * b * d * 4)


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
                 device=bench_device, rounds=3)
