"""BYOL under vmap: ``byol_hvp_batched`` against one cotangent at a time, the batching rules of the row
ops under both vmaps, and torch.func transforms over the fused loss (docs/design.md §2.2, §2.3). The
Triton op set's rules run in the Triton pass (marked ``triton``)."""
from __future__ import annotations

import pytest
import torch
from helpers import assert_close_rel, prototype_vmap, rel_err

from bissl_fast import byol_loss, reference
from bissl_fast._backends import backend_reasons, backends
from bissl_fast.ops import byol as byol_mod

needs_cpp = pytest.mark.skipif(not backends()["cpp"], reason=backend_reasons().get("cpp", ""))
DEVICES = [pytest.param("cpu", marks=needs_cpp), pytest.param("cuda", marks=pytest.mark.cuda)]
VMAPS = [pytest.param(torch.func.vmap, id="torch.func"), pytest.param(prototype_vmap, id="is_grads_batched")]


def _rows(b: int, d: int, dtype: torch.dtype, device: str, k: int = 4):
    gen = torch.Generator().manual_seed(b * 100 + d)
    p, t = (torch.randn(b, d, generator=gen, dtype=torch.float64) for _ in range(2))
    p[0] *= 1e-14  # one row of p below F.normalize's eps: the clamped regime
    wp, wt = (torch.randn(k, b, d, generator=gen, dtype=torch.float64) for _ in range(2))
    g = torch.randn(b, generator=gen, dtype=torch.float64)
    return tuple(x.to(dtype).to(device) for x in (g, p, t, wp, wt))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_wt,t_grad", [(False, False), (True, True), (False, True), (True, False)])
@pytest.mark.parametrize("b", [13, 1000], ids=["one-row-block", "ragged-row-blocks"])
def test_hvp_batched_equals_one_cotangent_at_a_time(device, dtype, with_wt, t_grad, b):
    """The same row arithmetic in the same order: equal to the unbatched op bit for bit. B = 1000 rows of
    37 spans several of the CPU kernel's 32 KiB row blocks (110 / 221 / 442 rows) with a ragged last one."""
    g, p, t, wp, wt = _rows(b, 37, dtype, device)
    ops = byol_mod.extension_ops()
    dgrad, dp, dt = torch.ops.bissl_fast.byol_hvp_batched(g, p, t, wp, wt if with_wt else None, t_grad)
    assert dgrad.shape == (4, b) and dp.shape == (4, b, 37)
    assert dt.shape == ((4, b, 37) if t_grad else (0,))
    for j in range(4):
        ref = ops.hvp(g, p, t, wp[j], wt[j] if with_wt else None, t_grad)
        assert torch.equal(dgrad[j], ref[0]) and torch.equal(dp[j], ref[1])
        if t_grad:
            assert torch.equal(dt[j], ref[2])


def _loop(op, args, in_dims, k):
    outs = [op(*(a if d is None or a is None else a.select(d, j) for a, d in zip(args, in_dims))) for j in range(k)]
    if isinstance(outs[0], torch.Tensor):
        return torch.stack(outs)
    return tuple(torch.stack(o) if o[0].numel() else o[0] for o in zip(*outs))


def _batch(x: torch.Tensor, dim: int, k: int) -> torch.Tensor:
    return torch.stack([x * (1 + 0.1 * j) for j in range(k)], dim=dim)


HVP_IN_DIMS = {
    "wp": (None, None, None, 0, None),
    "wp_and_wt_dim1": (None, None, None, 1, 1),
    "wt_only": (None, None, None, None, 0),
    "rows": (0, 0, None, 0, 0),  # every vector has its own rows: k*B rows of one call
}


@pytest.mark.parametrize("vmap", VMAPS)
@pytest.mark.parametrize("case", list(HVP_IN_DIMS))
@pytest.mark.parametrize("op_set", [pytest.param("extension", marks=needs_cpp), pytest.param("triton",
                                                                                            marks=pytest.mark.triton)])
def test_rules_match_loop(vmap, case, op_set):
    k = 3
    g, p, t, wp, wt = (x[0] if x.dim() == 3 else x for x in _rows(7, 10, torch.float32, "cpu"))
    ops = byol_mod.TRITON_OPS if op_set == "triton" else byol_mod.extension_ops()
    in_dims = HVP_IN_DIMS[case]
    args = [_batch(x, d, k) if d is not None else x for x, d in zip((g, p, t, wp, wt), in_dims)]
    hvp = lambda g_, p_, t_, wp_, wt_: ops.hvp(g_, p_, t_, wp_, wt_, True)  # noqa: E731
    out, ref = vmap(hvp, in_dims=in_dims)(*args), _loop(hvp, args, in_dims, k)
    assert all(torch.equal(o, r) for o, r in zip(out, ref))
    pt_dims = in_dims[1:3] if case == "rows" else (0, None)
    pt = [_batch(x, 0, k) if d is not None else x for x, d in zip((p, t), pt_dims)]
    fwd_out = vmap(ops.fwd, in_dims=pt_dims)(*pt)
    assert torch.equal(fwd_out, _loop(ops.fwd, pt, pt_dims, k))
    bwd = lambda g_, p_, t_: ops.bwd(g_, p_, t_, True)  # noqa: E731
    bwd_dims = (0, *pt_dims)
    bwd_args = [_batch(g, 0, k), *pt]
    assert all(torch.equal(o, r) for o, r in zip(vmap(bwd, in_dims=bwd_dims)(*bwd_args),
                                                  _loop(bwd, bwd_args, bwd_dims, k)))


@needs_cpp
def test_torch_func_transforms_over_the_fused_loss():
    """grad, vmap, jvp, vmap of grad and forward-over-reverse Hessians against the reference loss."""
    gen = torch.Generator().manual_seed(0)
    p1, p2, t1, t2 = (torch.randn(5, 6, generator=gen, dtype=torch.float64) for _ in range(4))
    ps = torch.randn(3, 5, 6, generator=gen, dtype=torch.float64)
    v = torch.randn(5, 6, generator=gen, dtype=torch.float64)

    def fused(a):
        return byol_loss(a, p2, t1, t2, backend="cpp")

    def plain(a):
        return reference.byol_loss(a, p2, t1, t2)

    assert rel_err(torch.func.grad(fused)(p1), torch.func.grad(plain)(p1)) < 1e-12
    assert rel_err(torch.func.vmap(fused)(ps), torch.stack([plain(a) for a in ps])) < 1e-12
    assert rel_err(torch.func.jvp(fused, (p1,), (v,))[1], torch.func.jvp(plain, (p1,), (v,))[1]) < 1e-12
    assert rel_err(torch.func.vmap(torch.func.grad(fused))(ps), torch.func.vmap(torch.func.grad(plain))(ps)) < 1e-12
    hessian = torch.func.jacfwd(torch.func.grad(fused))(p1)
    assert rel_err(hessian, torch.func.hessian(plain)(p1)) < 1e-12
    hvps = torch.func.vmap(lambda t: torch.func.jvp(torch.func.grad(fused), (p1,), (t,))[1])(ps)
    assert rel_err(hvps, torch.einsum("ijkl,bkl->bij", hessian, ps)) < 1e-12


@needs_cpp
@pytest.mark.parametrize("targets", ["detached", "grad"])
def test_batched_gradcheck_and_gradgradcheck_fp64(targets):
    """gradcheck's batched checks run the backward and the double backward under the older vmap."""
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(4, 6, generator=gen, dtype=torch.float64) for _ in range(4)]
    n_grad = 2 if targets == "detached" else 4
    for x in xs[:n_grad]:
        x.requires_grad_()
    fn = lambda *a: byol_loss(*a, *xs[n_grad:], backend="cpp")  # noqa: E731
    assert torch.autograd.gradcheck(fn, xs[:n_grad], check_batched_grad=True)
    assert torch.autograd.gradgradcheck(fn, xs[:n_grad], check_batched_grad=True)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_hvp_batched(device):
    g, p, t, wp, wt = _rows(5, 9, torch.float64, device, k=3)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    for args in ((g, p, t, wp, None, False), (g, p, t, wp, wt, True)):
        torch.library.opcheck(torch.ops.bissl_fast.byol_hvp_batched.default, args, test_utils=tests)


@needs_cpp
def test_hvp_batched_checks_and_not_differentiable():
    byol_mod.extension_ops()
    g, p, t, wp, wt = _rows(3, 4, torch.float64, "cpu", k=2)
    op = torch.ops.bissl_fast.byol_hvp_batched
    with pytest.raises(RuntimeError, match=r"wp must have shape \[k, 3, 4\]"):
        op(g, p, t, wp[0], None, False)
    with pytest.raises(RuntimeError, match="the same number of cotangents"):
        op(g, p, t, wp, wt[:1], False)
    with pytest.raises(NotImplementedError, match="not differentiable"):
        op(g, p, t, wp.clone().requires_grad_(), None, False)[1].sum().backward()


@needs_cpp
def test_hvp_of_k_cotangents_through_the_loss_matches_reference_fp32():
    """A batched HVP w.r.t. the predictions of the fp32 fused loss against the fp64 reference's."""
    gen = torch.Generator().manual_seed(2)
    p1, p2, t1, t2 = (torch.randn(9, 20, generator=gen) for _ in range(4))
    vs = torch.randn(5, 9, 20, generator=gen)

    def hvps(loss_fn, a, cotangents):
        a = a.detach().requires_grad_()
        (grad,) = torch.autograd.grad(loss_fn(a), a, create_graph=True)
        return torch.func.vmap(lambda v: torch.autograd.grad(grad, a, v, retain_graph=True)[0])(cotangents)

    got = hvps(lambda a: byol_loss(a, p2, t1, t2, backend="cpp"), p1, vs)
    want = hvps(lambda a: reference.byol_loss(a, p2.double(), t1.double(), t2.double()), p1.double(), vs.double())
    assert_close_rel("batched HVP", got, want, 1e-5)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_wt,t_grad", [(False, False), (True, True)])
def test_triton_hvp_batched_equals_one_cotangent_at_a_time(dtype, with_wt, t_grad):
    """One launch for every cotangent, each program's row norms reduced once: per cotangent the single
    launch's result, bit for bit."""
    g, p, t, wp, wt = _rows(7, 70, dtype, "cpu", k=3)
    dgrad, dp, dt = torch.ops.bissl_fast.byol_triton_hvp_batched(g, p, t, wp, wt if with_wt else None, t_grad)
    for j in range(3):
        ref = byol_mod.TRITON_OPS.hvp(g, p, t, wp[j], wt[j] if with_wt else None, t_grad)
        assert torch.equal(dgrad[j], ref[0]) and torch.equal(dp[j], ref[1])
        if t_grad:
            assert torch.equal(dt[j], ref[2])
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.bissl_fast.byol_triton_hvp_batched.default,
                          (g, p, t, wp, wt if with_wt else None, t_grad), test_utils=tests)
