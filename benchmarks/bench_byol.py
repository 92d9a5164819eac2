"""BYOL loss: reference (F.normalize composition) vs the fused row kernels (cpp / cuda / triton).

Modes: ``fwd`` (loss), ``fwd+bwd`` (loss and the gradients of the predictions p1, p2; targets
detached as in BYOL), ``hvp`` (gradient with create_graph, then the gradient of <grad, v>: one
Hessian-vector product w.r.t. (p1, p2)). Full grid on CUDA (B in 256, 4096, 65536; D in 256, 4096;
fp32 and bf16), small grid on CPU (B in 256, 4096; D = 256; fp32), see
``bench_utils.bench_sizes_full``. ``bytes_moved`` is the unique traffic, the floor a fused
implementation can reach: fwd reads 4 ``[B, D]`` tensors; fwd+bwd also writes dp1, dp2 (6);
hvp reads the 4 inputs and 2 directions and writes 2 products (8). The floor charges those bytes
at the streaming read rate measured at the same size. Each fast provider's speedup is measured
interleaved with the reference (``benchmark_op(reference=...)``).
"""
from __future__ import annotations

import pytest
import torch
from bench_utils import size_grid, skip_unless_timed

from bissl_fast import byol_loss, reference
from bissl_fast.bench.timing import StreamFloor

PROVIDERS = ["reference", "torch", "cpp", "cuda", "triton"]  # reference first: the speedups are against it
MODES = ["fwd", "fwd+bwd", "hvp"]
TENSORS_MOVED = {"fwd": 4, "fwd+bwd": 6, "hvp": 8}
FULL = [(b, d, dt) for b in (256, 4096, 65536) for d in (256, 4096) for dt in (torch.float32, torch.bfloat16)]
SMALL = [(256, 256, torch.float32), (4096, 256, torch.float32)]


def _loss_fn(provider: str):
    if provider == "reference":
        return reference.byol_loss
    return lambda *xs: byol_loss(*xs, backend=provider)


def _step(loss_fn, mode: str):
    if mode == "fwd":
        return lambda p1, p2, t1, t2, v1, v2: loss_fn(p1, p2, t1, t2)
    if mode == "fwd+bwd":

        def fwd_bwd(p1, p2, t1, t2, v1, v2):
            return torch.autograd.grad(loss_fn(p1, p2, t1, t2), (p1, p2))

        return fwd_bwd

    def hvp(p1, p2, t1, t2, v1, v2):
        grads = torch.autograd.grad(loss_fn(p1, p2, t1, t2), (p1, p2), create_graph=True)
        return torch.autograd.grad(grads, (p1, p2), (v1, v2))

    return hvp


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("b,d,dtype", size_grid(SMALL, FULL), ids=lambda v: str(v).replace("torch.", ""))
def test_byol(benchmark_op, bench_device, provider, mode, b, d, dtype):
    skip_unless_timed(bench_device, provider, (b, d, dtype), SMALL, FULL)
    inputs = []
    for _ in range(2):
        p1, p2, t1, t2, v1, v2 = (torch.randn(b, d, device=bench_device, dtype=dtype) for _ in range(6))
        p1.requires_grad_(mode != "fwd")
        p2.requires_grad_(mode != "fwd")
        inputs.append((p1, p2, t1, t2, v1, v2))
    bytes_moved = TENSORS_MOVED[mode] * b * d * torch.finfo(dtype).bits // 8
    benchmark_op(
        _step(_loss_fn(provider), mode), inputs, op="byol", provider=provider, mode=mode,
        size={"B": b, "D": d}, dtype=dtype, device=bench_device,
        reference=None if provider == "reference" else _step(_loss_fn("reference"), mode),
        floor=StreamFloor(bytes_moved), bytes_moved=bytes_moved,
    )
