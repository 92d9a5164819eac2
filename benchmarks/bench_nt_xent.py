"""NT-Xent: reference (materialized N x N logits) vs the chunked torch path vs the Triton kernels.

Modes: ``fwd`` (loss), ``fwd+bwd`` (loss and dL/dz), ``hvp`` (grad with create_graph, then the
gradient of <grad, v>: one Hessian-vector product w.r.t. z). Full grid on CUDA (N in 1024, 8192,
32768; D in 128, 256; fp32 and bf16), small grid on CPU (N in 512, 2048; D = 128; fp32), see
``bench_utils.bench_sizes_full``. The floor is the GEMM work no implementation can skip, in
``[N, D] x [D, N]`` matmuls timed at this size: fwd needs the Gram matrix (1); fwd+bwd adds
``P z`` (2); the HVP needs the Gram matrix, the tangent Gram ``z v^T`` (its transpose is free),
``P v`` and ``dP z`` (4). Each fast provider's speedup is measured interleaved with the reference.
"""
from __future__ import annotations

import pytest
import torch
from bench_utils import size_grid, skip_unless_timed

from bissl_fast import nt_xent, reference
from bissl_fast.bench.timing import GemmFloor

PROVIDERS = ["reference", "torch", "triton"]  # reference first: the others' speedup is against it
MODES = ["fwd", "fwd+bwd", "hvp"]
MIN_GEMMS = {"fwd": 1, "fwd+bwd": 2, "hvp": 4}
FULL = [(n, d, dt) for n in (1024, 8192, 32768) for d in (128, 256) for dt in (torch.float32, torch.bfloat16)]
SMALL = [(512, 128, torch.float32), (2048, 128, torch.float32)]
TEMPERATURE = 0.5


def _loss_fn(provider: str):
    if provider == "reference":
        return lambda z: reference.nt_xent(z, temperature=TEMPERATURE)
    return lambda z: nt_xent(z, temperature=TEMPERATURE, backend=provider)


def _step(loss_fn, mode: str):
    if mode == "fwd":
        return lambda z, v: loss_fn(z)
    if mode == "fwd+bwd":

        def fwd_bwd(z, v):
            loss = loss_fn(z)
            loss.backward()
            return loss

        return fwd_bwd

    def hvp(z, v):
        (grad,) = torch.autograd.grad(loss_fn(z), z, create_graph=True)
        (hv,) = torch.autograd.grad(grad, z, v)
        return hv

    return hvp


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n,d,dtype", size_grid(SMALL, FULL), ids=lambda v: str(v).replace("torch.", ""))
def test_nt_xent(benchmark_op, bench_device, provider, mode, n, d, dtype):
    skip_unless_timed(bench_device, provider, (n, d, dtype), SMALL, FULL)
    inputs = []
    for _ in range(2):
        z = torch.randn(n, d, device=bench_device, dtype=dtype, requires_grad=mode != "fwd")
        inputs.append((z, torch.randn(n, d, device=bench_device, dtype=dtype)))
    try:
        benchmark_op(
            _step(_loss_fn(provider), mode), inputs, op="nt_xent", provider=provider, mode=mode,
            size={"N": n, "D": d}, dtype=dtype, device=bench_device,
            reference=None if provider == "reference" else _step(_loss_fn("reference"), mode),
            floor=GemmFloor(n, d, n, MIN_GEMMS[mode]), flops=MIN_GEMMS[mode] * 2 * n * n * d,
        )
    except torch.cuda.OutOfMemoryError:
        # The reference materializes several N x N buffers: at N=32768 that is 4.3 GB each.
        pytest.skip(f"{provider} ran out of GPU memory at N={n}")
