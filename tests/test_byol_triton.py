"""Triton BYOL kernels against bissl_fast.reference.byol_loss (same checks as test_byol.py).

Runs on CPU tensors with TRITON_INTERPRET=1 (second pytest pass) or on a GPU. Shapes are small but
awkward for the kernels' blocks: B = 1, B not a multiple of BLOCK_B, D not a power of two, D larger
than one BLOCK_D chunk.
"""
from __future__ import annotations

import pytest
import torch
from helpers import assert_close_rel
from test_byol import (
    FP32_TOL,
    LOW_PRECISION_TOL,
    check_hvp,
    check_loss_and_grad,
    check_non_contiguous_and_partial_grad,
)

from bissl_fast import BYOLLoss, byol_loss, normalized_regression, reference
from bissl_fast.ops import byol as byol_mod
from bissl_fast._backends import backends

pytestmark = pytest.mark.triton
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("b,d", [(1, 7), (37, 1100)])
@pytest.mark.parametrize("need_targets", [False, True], ids=["detached", "targets_grad"])
def test_loss_and_grad_fp32(b, d, need_targets):
    check_loss_and_grad("triton", DEVICE, b, d, torch.float32, FP32_TOL, need_targets)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loss_and_grad_low_precision(dtype):
    check_loss_and_grad("triton", DEVICE, 19, 40, dtype, LOW_PRECISION_TOL, need_targets=True)


@pytest.mark.parametrize("scales", [(1e15, 1e-6, 1e8, 1e-8), (1e-14, 1e-13, 3.0, 1e-15)], ids=["large_small", "below_eps"])
def test_extreme_norms(scales):
    check_loss_and_grad("triton", DEVICE, 9, 17, torch.float64, 1e-12, need_targets=True, scales=scales)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, FP32_TOL)])
@pytest.mark.parametrize("targets_require_grad", [False, True], ids=["detached", "targets_grad"])
def test_hvp_through_mlp(dtype, tol, targets_require_grad):
    check_hvp("triton", DEVICE, dtype, tol, targets_require_grad)


def test_non_contiguous_inputs_and_partial_requires_grad():
    check_non_contiguous_and_partial_grad("triton", DEVICE)


def test_matches_cpp_row_ops():
    """The Triton and C++ row ops compute the same fwd/bwd/hvp (both run byol_math.h's formulas)."""
    if DEVICE != "cpu" or not backends()["cpp"]:
        pytest.skip("compares with the C++ CPU kernel: interpreter pass with the extension built")
    gen = torch.Generator().manual_seed(3)
    p, t, wp, wt = (torch.randn(6, 45, generator=gen, dtype=torch.float64) for _ in range(4))
    g = torch.randn(6, generator=gen, dtype=torch.float64)
    cpp, tri = byol_mod.extension_ops(), byol_mod.TRITON_OPS
    assert_close_rel("fwd", tri.fwd(p, t), cpp.fwd(p, t), 1e-14)
    for t_grad in (False, True):
        a, b = tri.bwd(g, p, t, t_grad), cpp.bwd(g, p, t, t_grad)
        assert a[1].shape == b[1].shape
        assert_close_rel("bwd dp", a[0], b[0], 1e-14)
        if t_grad:
            assert_close_rel("bwd dt", a[1], b[1], 1e-14)
        for w in (None, wt):
            a, b = tri.hvp(g, p, t, wp, w, t_grad), cpp.hvp(g, p, t, wp, w, t_grad)
            assert_close_rel("hvp (dgrad, dp)", a[:2], b[:2], 1e-14)
            if t_grad:
                assert_close_rel("hvp dt", a[2], b[2], 1e-14)


def test_opcheck_triton_ops():
    gen = torch.Generator().manual_seed(4)
    p, t, wp = (torch.randn(3, 5, generator=gen, dtype=torch.float64, device=DEVICE) for _ in range(3))
    g = torch.randn(3, generator=gen, dtype=torch.float64, device=DEVICE)
    ops = byol_mod.TRITON_OPS
    base = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(ops.fwd, (p.clone().requires_grad_(), t), test_utils=base)
    torch.library.opcheck(ops.bwd, (g, p.clone().requires_grad_(), t.clone().requires_grad_(), True), test_utils=base)
    torch.library.opcheck(ops.hvp, (g, p, t, wp, None, False), test_utils=base)


def test_module_and_per_row():
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(10, 24, generator=gen).to(DEVICE) for _ in range(4)]
    ref = reference.byol_loss(*[x.double().cpu() for x in xs])
    assert_close_rel("BYOLLoss", BYOLLoss(backend="triton")(*xs).cpu(), ref, FP32_TOL)
    rows = normalized_regression(xs[0], xs[3], backend="triton")
    assert rows.shape == (10,)
    assert_close_rel("per-row loss", rows.cpu(),
                     reference.normalized_regression(xs[0].double().cpu(), xs[3].double().cpu()), FP32_TOL)
    assert_close_rel("byol_loss", byol_loss(*xs, backend="triton").cpu(), ref, FP32_TOL)


def test_forward_over_reverse_matches_reference():
    """``torch.func.jvp`` of ``torch.func.grad`` (the solver's "fwd-rev" product) on the Triton ops."""
    p1, p2, t1, t2 = (torch.randn(9, 33) for _ in range(4))
    w1, w2 = torch.randn_like(p1), torch.randn_like(p2)

    def hvp(loss):
        return torch.func.jvp(torch.func.grad(lambda a, b: loss(a, b, t1, t2), argnums=(0, 1)), (p1, p2), (w1, w2))[1]

    got = hvp(lambda *xs: byol_loss(*xs, backend="triton"))
    expected = hvp(lambda *xs: reference.byol_loss(*(x.double() for x in xs)))
    assert_close_rel("fwd-rev HVP", got, expected, 1e-5)


def test_launch_arguments_have_their_routes_signature(monkeypatch):
    """Every launch passes arguments of its route's signature (what tests/test_triton_resources.py
    compiles ahead of time), here for the forward, backward and HVP with targets that need grad."""
    from bissl_fast.kernels import triton_routes

    launched = []
    launch = triton_routes.Route.launch

    def recorded(self, grid, *args):
        kinds = tuple(triton_routes.pointer(a.dtype) if isinstance(a, torch.Tensor) else {int: "i32"}[type(a)]
                      for a in args)
        assert kinds == tuple(kind for _, kind in self.signature), self.name
        launched.append(self.kernel.name)
        return launch(self, grid, *args)

    monkeypatch.setattr(triton_routes.Route, "launch", recorded)
    p1, p2, t1, t2 = (torch.randn(5, 70, device=DEVICE, requires_grad=True) for _ in range(4))
    (grad,) = torch.autograd.grad(byol_loss(p1, p2, t1, t2, backend="triton"), p1, create_graph=True)
    torch.autograd.grad((grad * torch.randn_like(grad)).sum(), (p1, t2))
    assert {"_byol_fwd_kernel", "_byol_bwd_kernel", "_byol_hvp_kernel"} <= set(launched)
