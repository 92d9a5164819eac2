"""The plain-PyTorch references against independent float64 computations written differently."""
from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from bissl_fast import reference


def _loop_nt_xent(z: torch.Tensor, tau: float, views: int) -> float:
    """NT-Xent with explicit loops over rows and positives, in Python floats."""
    rows = [[float(v) for v in row] for row in z.double()]
    n = len(rows)
    b = n // views
    unit = []
    for row in rows:
        norm = max(math.sqrt(sum(v * v for v in row)), 1e-12)
        unit.append([v / norm for v in row])

    def sim(i: int, j: int) -> float:
        return sum(a * c for a, c in zip(unit[i], unit[j])) / tau

    total = 0.0
    for i in range(n):
        lse = math.log(sum(math.exp(sim(i, j)) for j in range(n) if j != i))
        for k in range(1, views):
            total += lse - sim(i, (i + k * b) % n)
    return total / (n * (views - 1))


@pytest.mark.parametrize("views,b,d,tau", [(2, 3, 5, 0.5), (3, 4, 3, 0.1), (2, 1, 7, 1.0), (4, 2, 4, 0.07)])
def test_nt_xent_matches_explicit_loops(views, b, d, tau):
    z = torch.randn(views * b, d, dtype=torch.float64) * 3
    out = reference.nt_xent(z, tau, views=views)
    assert out.dtype == torch.float64
    assert abs(float(out) - _loop_nt_xent(z, tau, views)) < 1e-12


def test_nt_xent_two_tensor_form_equals_concatenation():
    z0, z1 = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    both = reference.nt_xent(z0, z1, 0.3)
    assert float(both) == float(reference.nt_xent(torch.cat([z0, z1]), 0.3))
    assert float(reference.nt_xent(z0, z1, temperature=0.3)) == float(both)


def test_nt_xent_is_invariant_to_row_scale():
    z = torch.randn(8, 5, dtype=torch.float64)
    scale = torch.rand(8, 1, dtype=torch.float64) * 1e3 + 1e-3
    assert abs(float(reference.nt_xent(z * scale, 0.5)) - float(reference.nt_xent(z, 0.5))) < 1e-12


def test_nt_xent_gradcheck_and_gradgradcheck():
    z = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda t: reference.nt_xent(t, 0.5, views=3), (z,))
    assert gradgradcheck(lambda t: reference.nt_xent(t, 0.5, views=3), (z,))


def _loop_byol(p1, p2, t1, t2) -> float:
    def cos(a, c):
        a, c = [float(v) for v in a], [float(v) for v in c]
        na = max(math.sqrt(sum(v * v for v in a)), 1e-12)
        nc = max(math.sqrt(sum(v * v for v in c)), 1e-12)
        return sum(x * y for x, y in zip(a, c)) / (na * nc)

    b = p1.shape[0]
    return sum((2 - 2 * cos(p1[i], t2[i])) + (2 - 2 * cos(p2[i], t1[i])) for i in range(b)) / b


def test_byol_matches_explicit_loops():
    p1, p2, t1, t2 = (torch.randn(5, 7, dtype=torch.float64) for _ in range(4))
    assert abs(float(reference.byol_loss(p1, p2, t1, t2)) - _loop_byol(p1, p2, t1, t2)) < 1e-12


def test_byol_gradcheck_and_gradgradcheck():
    ins = tuple(torch.randn(3, 4, dtype=torch.float64, requires_grad=True) for _ in range(4))
    assert gradcheck(reference.byol_loss, ins)
    assert gradgradcheck(reference.byol_loss, ins)


def test_normalized_regression_per_row():
    p, t = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    rows = reference.normalized_regression(p, t)
    assert rows.shape == (4,)
    expected = 2 - 2 * torch.nn.functional.cosine_similarity(p, t, dim=1, eps=0)
    assert torch.allclose(rows, expected, rtol=0, atol=1e-14)


def _tiny_problem(seed: int = 0):
    """A logistic-regression-like loss with two parameter tensors (Hessian PSD, coupled)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(12, 3, generator=gen, dtype=torch.float64)
    y = (torch.rand(12, generator=gen) > 0.5).double()
    w = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, generator=gen, dtype=torch.float64, requires_grad=True)

    def loss_of(w_, b_):
        logits = x @ w_ + b_.sum() + 0.3 * (b_ ** 2).sum()
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, y) + 0.05 * (w_ ** 2).sum()

    return (w, b), loss_of


def test_hvp_equals_dense_hessian_product():
    (w, b), loss_of = _tiny_problem()
    v = (torch.randn(3, dtype=torch.float64), torch.randn(2, dtype=torch.float64))
    hv = reference.hvp(lambda: loss_of(w, b), (w, b), v)
    dense = torch.autograd.functional.hessian(lambda flat: loss_of(flat[:3], flat[3:]), torch.cat([w, b]).detach())
    expected = dense @ torch.cat(v)
    assert torch.allclose(torch.cat(hv), expected, rtol=1e-12, atol=1e-14)


def test_hvp_of_unused_parameter_is_zero():
    (w, b), loss_of = _tiny_problem()
    unused = torch.randn(4, dtype=torch.float64, requires_grad=True)
    v = (torch.ones(3, dtype=torch.float64), torch.ones(2, dtype=torch.float64), torch.ones(4, dtype=torch.float64))
    hv = reference.hvp(lambda: loss_of(w, b), (w, b, unused), v)
    assert torch.equal(hv[2], torch.zeros(4, dtype=torch.float64))


def test_implicit_grad_global_cg_converges_to_dense_solve():
    (w, b), loss_of = _tiny_problem()
    v = (torch.randn(3, dtype=torch.float64), torch.randn(2, dtype=torch.float64))
    lam, damping = 0.001, 0.05  # small damping so H matters and CG needs all 5 directions
    x = reference.implicit_grad(lambda: loss_of(w, b), (w, b), v, lam=lam, damping=damping, iters=5, layerwise=False)
    dense = torch.autograd.functional.hessian(lambda flat: loss_of(flat[:3], flat[3:]), torch.cat([w, b]).detach())
    a = torch.eye(5, dtype=torch.float64) + dense / (lam + damping)
    expected = torch.linalg.solve(a, torch.cat(v))
    assert torch.allclose(torch.cat(x), expected, rtol=1e-9, atol=1e-10)
    early = reference.implicit_grad(lambda: loss_of(w, b), (w, b), v, lam=lam, damping=damping, iters=2, layerwise=False)
    assert not torch.allclose(torch.cat(early), expected, rtol=1e-6)


def test_layerwise_cg_solves_block_diagonal_systems_exactly():
    gen = torch.Generator().manual_seed(1)
    blocks = []
    for n in (3, 4):
        m = torch.randn(n, n, generator=gen, dtype=torch.float64)
        blocks.append(m @ m.T + torch.eye(n, dtype=torch.float64))
    rhs = (torch.randn(3, dtype=torch.float64), torch.randn(4, dtype=torch.float64))
    x = reference.cg_solve(lambda d: tuple(a @ di for a, di in zip(blocks, d)), rhs, iters=4, layerwise=True)
    for a, xi, bi in zip(blocks, x, rhs):
        assert torch.allclose(a @ xi, bi, rtol=1e-9, atol=1e-10)


def test_cg_first_iterate_is_the_steepest_descent_step():
    a = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    rhs = (torch.tensor([1.0, -1.0], dtype=torch.float64),)
    x = reference.cg_solve(lambda d: (a @ d[0],), rhs, iters=1)
    r = rhs[0]
    alpha = (r @ r) / (r @ (a @ r) + reference.CG_EPS)
    assert torch.allclose(x[0], alpha * r, rtol=1e-15, atol=0)


def test_cg_passes_nan_through_nan_to_num():
    rhs = (torch.ones(3, dtype=torch.float64),)
    x = reference.cg_solve(lambda d: (d[0] * float("nan"),), rhs, iters=2)
    assert torch.isfinite(x[0]).all()


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda: reference.nt_xent(torch.randn(5, 3), 0.5), ValueError),  # N not divisible by views
        (lambda: reference.nt_xent(torch.randn(6, 3), 0.0), ValueError),
        (lambda: reference.nt_xent(torch.randn(6, 3), -1.0), ValueError),
        (lambda: reference.nt_xent(torch.randn(6, 3), float("nan")), ValueError),
        (lambda: reference.nt_xent(torch.randn(6), 0.5), ValueError),
        (lambda: reference.nt_xent(torch.randint(0, 3, (6, 3)), 0.5), TypeError),
        (lambda: reference.nt_xent(torch.randn(0, 3), 0.5), ValueError),
        (lambda: reference.nt_xent(torch.randn(6, 3), 0.5, views=1), ValueError),
        (lambda: reference.nt_xent(torch.randn(3, 3), torch.randn(4, 3), 0.5), ValueError),
        (lambda: reference.nt_xent(torch.randn(3, 3), torch.randn(3, 3, dtype=torch.float64), 0.5), TypeError),
        (lambda: reference.byol_loss(*(torch.randn(3, 4) for _ in range(3)), torch.randn(3, 5)), ValueError),
        (lambda: reference.byol_loss(*(torch.randn(3, 4) for _ in range(3)), torch.ones(3, 4, dtype=torch.int64)), TypeError),
        (lambda: reference.normalized_regression(torch.randn(3, 4), torch.randn(4, 4)), ValueError),
        (lambda: reference.cg_solve(lambda d: d, (torch.ones(2),), iters=0), ValueError),
        (lambda: reference.cg_solve(lambda d: d, torch.ones(2)), TypeError),
        (lambda: reference.cg_solve(lambda d: d, ()), ValueError),
        (lambda: reference.hvp(lambda: torch.ones(()), (torch.ones(2, requires_grad=True),), (torch.ones(3),)), ValueError),
        (lambda: reference.implicit_grad(lambda: torch.ones(()), (torch.ones(2, requires_grad=True),), (torch.ones(2),), lam=0, damping=0), ValueError),
        (lambda: reference.implicit_grad(lambda: torch.ones(()), (torch.ones(2, requires_grad=True),), (torch.ones(2),), lam=-1.0), ValueError),
    ],
)
def test_bad_input_raises_clear_errors(call, error):
    with pytest.raises(error):
        call()
