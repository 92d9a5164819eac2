"""NT-Xent under vmap: the batched kernels and ops against one vector at a time, the batching rules
under both vmaps, and torch.func transforms over the fused loss (docs/design.md §2.1, §2.3)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_rel, prototype_vmap, rel_err
from test_nt_xent import blocks  # noqa: F401  (fixture: single-block and row-block layouts)

from bissl_fast import nt_xent, reference
from bissl_fast.kernels import nt_xent_torch

ops = torch.ops.bissl_fast
INV_TAU = 1 / 0.3


def _inputs(n: int, d: int, k: int, dtype: torch.dtype = torch.float64):
    u = F.normalize(torch.randn(n, d, dtype=torch.float64), dim=1)
    lse = nt_xent_torch.lse_forward(u, INV_TAU, "ieee")
    c = torch.rand(n, dtype=torch.float64) + 0.05
    w = torch.randn(k, n, d, dtype=torch.float64)
    return u.to(dtype), lse, c, w.to(dtype)


@pytest.mark.parametrize("weights", ["shared", "per_vector", "signed"])
@pytest.mark.parametrize("n,d", [(6, 3), (37, 10)])
def test_batched_kernels_match_one_vector_at_a_time(blocks, n, d, weights):  # noqa: F811
    k = 5
    u, lse, c, w = _inputs(n, d, k)
    if weights == "per_vector":
        c = torch.rand(k, n, dtype=torch.float64)
    elif weights == "signed":  # weights of either sign take the unshifted exponentials
        c = torch.randn(n, dtype=torch.float64)
    grad_u, r = nt_xent_torch.lse_double_backward_batched(u, lse, c, w, INV_TAU, "ieee")
    cs = c if c.dim() == 2 else c.expand(k, n)
    for j in range(k):
        ref_u, ref_r = nt_xent_torch.lse_double_backward(u, lse, cs[j], w[j], INV_TAU, "ieee")
        assert rel_err(grad_u[j], ref_u) < 1e-13
        assert rel_err(r[j], ref_r) < 1e-13
    cb = torch.randn(k, n, dtype=torch.float64)
    out = nt_xent_torch.lse_backward_batched(u, lse, cb, INV_TAU, "ieee")
    for j in range(k):
        assert rel_err(out[j], nt_xent_torch.lse_backward(u, lse, cb[j], INV_TAU, "ieee")) < 1e-13


def test_batched_kernels_fp32_against_fp64(blocks):  # noqa: F811
    u, lse, c, w = _inputs(40, 9, 4)
    ref = nt_xent_torch.lse_double_backward_batched(u, lse, c, w, INV_TAU, "ieee")
    out = nt_xent_torch.lse_double_backward_batched(u.float(), lse.float(), c.float(), w.float(), INV_TAU, "ieee")
    assert out[0].dtype == torch.float32 and out[1].dtype == torch.float32
    assert_close_rel("grad_u", out[0], ref[0], 1e-5)
    assert_close_rel("r", out[1], ref[1], 1e-5)
    half = nt_xent_torch.lse_double_backward_batched(u.bfloat16(), lse.float(), c.float(), w.bfloat16(), INV_TAU, "ieee")
    assert half[0].dtype == torch.bfloat16
    assert_close_rel("grad_u from bf16 rows", half[0], ref[0], 1e-2)


def _loop(op, args, in_dims, k):
    outs = [op(*(a if d is None else a.select(d, j) for a, d in zip(args, in_dims))) for j in range(k)]
    return torch.stack(outs) if isinstance(outs[0], torch.Tensor) else tuple(torch.stack(o) for o in zip(*outs))


@pytest.mark.parametrize("vmap", [torch.func.vmap, prototype_vmap], ids=["torch.func", "is_grads_batched"])
@pytest.mark.parametrize(
    "in_dims",
    [(None, None, None, 0), (None, None, None, 1), (None, None, 0, 0), (None, None, 0, None), (0, None, None, 1)],
    ids=["w", "w_dim1", "c_and_w", "c", "u_and_w"],
)
def test_double_backward_rule_matches_loop(vmap, in_dims):
    k, n, d = 3, 11, 5
    u, lse, c, w = _inputs(n, d, k)
    args = [u, lse, c, w[0]]
    for i, dim in enumerate(in_dims):
        if dim is not None:
            args[i] = torch.stack([args[i] + 0.1 * j for j in range(k)], dim=dim)

    def op(u, lse, c, w):
        return ops.nt_xent_lse_double_backward(u, lse, c, w, INV_TAU, "torch", "ieee")

    out = vmap(op, in_dims=in_dims)(*args)
    ref = _loop(op, args, in_dims, k)
    assert rel_err(out, ref) < 1e-13


@pytest.mark.parametrize("vmap", [torch.func.vmap, prototype_vmap], ids=["torch.func", "is_grads_batched"])
def test_forward_and_backward_rules_match_loop(vmap):
    k, n, d = 3, 9, 4
    u, lse, c, _ = _inputs(n, d, k)
    us = torch.stack([F.normalize(u + 0.2 * j, dim=1) for j in range(k)])
    forward = lambda x: ops.nt_xent_lse(x, INV_TAU, "torch", "ieee")  # noqa: E731
    assert rel_err(vmap(forward)(us), _loop(forward, [us], [0], k)) < 1e-13
    cs = torch.randn(k, n, dtype=torch.float64)
    backward = lambda cw: ops.nt_xent_lse_backward(u, lse, cw, INV_TAU, "torch", "ieee")  # noqa: E731
    assert rel_err(vmap(backward)(cs), _loop(backward, [cs], [0], k)) < 1e-13


def test_torch_func_transforms_over_the_fused_loss():
    """grad, vmap, jvp and their compositions (vmap of grad, forward-over-reverse Hessians) agree with
    the reference loss, which is plain autograd."""
    z = torch.randn(8, 5, dtype=torch.float64)
    zs = torch.randn(3, 8, 5, dtype=torch.float64)
    v = torch.randn(8, 5, dtype=torch.float64)

    def fused(x):
        return nt_xent(x, temperature=0.4)

    def plain(x):
        return reference.nt_xent(x, temperature=0.4)

    assert rel_err(torch.func.grad(fused)(z), torch.func.grad(plain)(z)) < 1e-12
    assert rel_err(torch.func.vmap(fused)(zs), torch.stack([plain(x) for x in zs])) < 1e-12
    assert rel_err(torch.func.jvp(fused, (z,), (v,))[1], torch.func.jvp(plain, (z,), (v,))[1]) < 1e-12
    assert rel_err(torch.func.vmap(torch.func.grad(fused))(zs), torch.func.vmap(torch.func.grad(plain))(zs)) < 1e-12
    hessian = torch.func.jacfwd(torch.func.grad(fused))(z)
    assert rel_err(hessian, torch.func.hessian(plain)(z)) < 1e-12
    vs = torch.randn(4, 8, 5, dtype=torch.float64)
    hvps = torch.func.vmap(lambda t: torch.func.jvp(torch.func.grad(fused), (z,), (t,))[1])(vs)
    assert rel_err(hvps, torch.einsum("ijkl,bkl->bij", hessian, vs)) < 1e-12


@pytest.mark.parametrize("views", [2, 3])
def test_batched_gradcheck_and_gradgradcheck_fp64(blocks, views):  # noqa: F811
    """gradcheck's batched checks run the backward and the double backward under vmap (the rules)."""
    z = torch.randn(3 * views, 5, dtype=torch.float64, requires_grad=True)

    def f(x):
        return nt_xent(x, temperature=0.4, views=views, backend="torch")

    assert torch.autograd.gradcheck(f, (z,), check_batched_grad=True)
    assert torch.autograd.gradgradcheck(f, (z,), check_batched_grad=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_opcheck_batched_ops(dtype):
    u, lse, c, w = _inputs(10, 6, 3)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    u, w, lse, c = u.to(dtype), w.to(dtype), lse.to(acc), c.to(acc)
    torch.library.opcheck(ops.nt_xent_lse_backward_batched.default, (u, lse, c.expand(3, 10).contiguous(),
                                                                     INV_TAU, "torch", "ieee"))
    for weights in (c, torch.rand(3, 10, dtype=acc)):
        torch.library.opcheck(ops.nt_xent_lse_double_backward_batched.default, (u, lse, weights, w, INV_TAU, "torch",
                                                                                "ieee"))


def test_batched_ops_are_not_differentiable_on_their_own():
    u, lse, c, w = _inputs(6, 4, 2)
    w.requires_grad_()
    grad_u, _ = ops.nt_xent_lse_double_backward_batched(u, lse, c, w, INV_TAU, "torch", "ieee")
    with pytest.raises(RuntimeError, match="has no autograd formula of its own"):
        grad_u.sum().backward()


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,d", [(21, 5), (40, 70)])
def test_triton_batched_launch_equals_one_vector_at_a_time(dtype, n, d):
    """The vector index on the third grid axis: each vector's result is the single launch's, bit for bit;
    through the ops under torch.func.vmap as well."""
    from bissl_fast.kernels import nt_xent_triton

    k = 3
    u = F.normalize(torch.randn(n, d), dim=1).to(dtype)
    lse = nt_xent_triton.lse_forward(u, INV_TAU, "ieee")
    w = torch.randn(k, n, d).to(dtype)
    for c in (torch.rand(n) + 0.1, torch.rand(k, n)):
        grad_u, r = nt_xent_triton.lse_double_backward_batched(u, lse, c, w, INV_TAU, "ieee")
        for j in range(k):
            ref = nt_xent_triton.lse_double_backward(u, lse, c if c.dim() == 1 else c[j], w[j], INV_TAU, "ieee")
            assert torch.equal(grad_u[j], ref[0]) and torch.equal(r[j], ref[1])
    cs = torch.rand(k, n)
    out = nt_xent_triton.lse_backward_batched(u, lse, cs, INV_TAU, "ieee")
    for j in range(k):
        assert torch.equal(out[j], nt_xent_triton.lse_backward(u, lse, cs[j], INV_TAU, "ieee"))
    c = torch.rand(n) + 0.1
    vmapped = torch.func.vmap(lambda wj: ops.nt_xent_lse_double_backward(u, lse, c, wj, INV_TAU, "triton", "ieee"))(w)
    assert torch.equal(vmapped[0], nt_xent_triton.lse_double_backward_batched(u, lse, c, w, INV_TAU, "ieee")[0])


@pytest.mark.triton
def test_triton_hvp_batched_through_the_loss_matches_reference():
    """matmat-style products w.r.t. the embeddings through the Triton loss against the fp64 reference."""
    z = torch.randn(12, 9)
    vs = torch.randn(4, 12, 9)

    def hvps(loss_fn, x, cotangents):
        x = x.detach().requires_grad_()
        (grad,) = torch.autograd.grad(loss_fn(x), x, create_graph=True)
        return torch.func.vmap(lambda v: torch.autograd.grad(grad, x, v, retain_graph=True)[0])(cotangents)

    got = hvps(lambda x: nt_xent(x, temperature=0.3, backend="triton"), z, vs)
    want = hvps(lambda x: reference.nt_xent(x, temperature=0.3), z.double(), vs.double())
    assert_close_rel("batched HVP", got, want, 1e-5)
