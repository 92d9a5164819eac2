"""The closed forms of docs/design.md (NT-Xent §2.1, BYOL §2.2, BatchNorm §2.6) against torch autograd in float64.

The kernels implement these formulas; if one of them is wrong in the document, a test here fails.
Every check uses fresh random inputs, a non-unit upstream gradient and random cotangents.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err

from bissl_fast import reference

TOL = 1e-12


def _grad(out: torch.Tensor, inputs: tuple[torch.Tensor, ...], create_graph: bool = False) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(out, inputs, create_graph=create_graph)


# --------------------------------------------------------------------------------------------
# §2.1 NT-Xent
# --------------------------------------------------------------------------------------------


def _masked_logits(u: torch.Tensor, tau: float) -> torch.Tensor:
    n = u.shape[0]
    eye = torch.eye(n, dtype=torch.bool)
    return (u @ u.T / tau).masked_fill(eye, float("-inf"))


def _probabilities(u: torch.Tensor, tau: float) -> torch.Tensor:
    """``P_ij = exp(s_ij - lse_i)``, ``P_ii = 0``."""
    return torch.softmax(_masked_logits(u, tau), dim=1)


def _positive_mask(n: int, views: int) -> torch.Tensor:
    y = torch.zeros(n, n, dtype=torch.float64)
    y.scatter_(1, reference.positive_index(n, views), 1.0)
    return y


def _loss_of_unit_rows(u: torch.Tensor, tau: float, views: int) -> torch.Tensor:
    """The split form: ``(1/N) sum_i lse_i - 1/(tau N (m-1)) sum_i sum_{p in P(i)} u_i . u_p``."""
    n = u.shape[0]
    lse = torch.logsumexp(_masked_logits(u, tau), dim=1)
    positives = (_positive_mask(n, views) * (u @ u.T)).sum()
    return lse.mean() - positives / (tau * n * (views - 1))


@pytest.mark.parametrize("n,d,views,tau", [(6, 3, 2, 0.5), (12, 5, 3, 0.2), (20, 7, 4, 1.3)])
def test_nt_xent_split_equals_definition(n, d, views, tau):
    z = torch.randn(n, d, dtype=torch.float64)
    u = F.normalize(z, dim=1)
    assert rel_err(_loss_of_unit_rows(u, tau, views), reference.nt_xent(z, temperature=tau, views=views)) < TOL


@pytest.mark.parametrize("n,d,views,tau", [(6, 3, 2, 0.5), (12, 5, 3, 0.2), (20, 7, 4, 1.3)])
def test_nt_xent_gradient_and_double_backward(n, d, views, tau):
    """``dL/du = (g/tau) A u`` and the ``M, Q, r, E`` double backward, w.r.t. ``u`` and ``g``."""
    u = F.normalize(torch.randn(n, d, dtype=torch.float64), dim=1).requires_grad_()
    g = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(n, d, dtype=torch.float64)

    (du,) = _grad(g * _loss_of_unit_rows(u, tau, views), (u,), create_graph=True)
    grad_u, grad_g = _grad((du * w).sum(), (u, g))

    with torch.no_grad():
        p = _probabilities(u, tau)
        y = _positive_mask(n, views)
        big_g = p / n - y / (n * (views - 1))
        a = big_g + big_g.T
        assert rel_err(du.detach(), g * (a @ u) / tau) < TOL

        m = w @ u.T
        q = m + m.T
        r = (q * p).sum(dim=1)
        e = p * (q - r[:, None]) / n
        assert rel_err(grad_u, g * ((a @ w) / tau + ((e + e.T) @ u) / tau**2)) < TOL
        assert rel_err(grad_g, (w * (a @ u)).sum() / tau) < TOL


@pytest.mark.parametrize("n,d,tau", [(5, 3, 0.5), (17, 6, 0.15)])
def test_nt_xent_weighted_lse_term(n, d, tau):
    """The kernels' generalization: ``f(u, c) = sum_i c_i lse_i`` with per-row weights ``c``."""
    u = F.normalize(torch.randn(n, d, dtype=torch.float64), dim=1).requires_grad_()
    c = torch.randn(n, dtype=torch.float64).requires_grad_()
    w = torch.randn(n, d, dtype=torch.float64)
    tangent = torch.randn(n, d, dtype=torch.float64)

    lse = torch.logsumexp(_masked_logits(u, tau), dim=1)
    (du,) = _grad((c * lse).sum(), (u,), create_graph=True)
    grad_u, grad_c = _grad((du * w).sum(), (u, c))
    # Forward mode of lse along a tangent: d lse_i = (1/tau) sum_j P_ij (du_i . u_j + u_i . du_j).
    lse_dir = torch.autograd.functional.jvp(
        lambda x: torch.logsumexp(_masked_logits(x, tau), dim=1), u.detach(), tangent
    )[1]

    with torch.no_grad():
        p = _probabilities(u, tau)
        cp = c[:, None] * p
        a = cp + cp.T  # C P + P^T C
        assert rel_err(du.detach(), (a @ u) / tau) < TOL
        q = w @ u.T + u @ w.T
        r = (p * q).sum(dim=1)
        e = cp * (q - r[:, None])
        assert rel_err(grad_u, (a @ w) / tau + ((e + e.T) @ u) / tau**2) < TOL
        assert rel_err(grad_c, r / tau) < TOL
        q_t = tangent @ u.T + u @ tangent.T
        assert rel_err(lse_dir, (p * q_t).sum(dim=1) / tau) < TOL


# --------------------------------------------------------------------------------------------
# §2.2 BYOL
# --------------------------------------------------------------------------------------------

EPS = reference.NORMALIZE_EPS


def _row_loss(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 2 - 2 * (F.normalize(p, dim=1, eps=EPS) * F.normalize(t, dim=1, eps=EPS)).sum(dim=1)


def _rows(b: int, d: int, p_scale: float, t_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.randn(b, d, dtype=torch.float64) * p_scale
    t = torch.randn(b, d, dtype=torch.float64) * t_scale
    return p.requires_grad_(), t.requires_grad_()


def _row_state(p: torch.Tensor, t: torch.Tensor):
    """``(u, v, n_p, n_t, a, b, c)`` of §2.2 per row (``[B, 1]`` scalars)."""
    norm_p, norm_t = p.norm(dim=1, keepdim=True), t.norm(dim=1, keepdim=True)
    n_p, n_t = norm_p.clamp_min(EPS), norm_t.clamp_min(EPS)
    a, b = (norm_p >= EPS).double(), (norm_t >= EPS).double()
    u, v = p / n_p, t / n_t
    return u, v, n_p, n_t, a, b, (u * v).sum(dim=1, keepdim=True)


def _dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x * y).sum(dim=1, keepdim=True)


def test_byol_gradient_and_hessian_vector_product_in_the_norm_regime():
    """``d/dp (2 - 2c) = -2 (t^ - c p^) / n`` and the closed-form Hessian-vector product in ``p``."""
    p, t = _rows(9, 13, 1.0, 3.0)
    g = torch.rand(9, dtype=torch.float64) + 0.5
    w = torch.randn(9, 13, dtype=torch.float64)
    (dp,) = _grad((g * _row_loss(p, t.detach())).sum(), (p,), create_graph=True)
    (hvp,) = _grad((dp * w).sum(), (p,))
    with torch.no_grad():
        u, v, n, _, _, _, c = _row_state(p, t)
        gcol = g[:, None]
        assert rel_err(dp.detach(), gcol * -2 * (v - c * u) / n) < TOL
        expected = gcol * (2 / n**2) * (u * _dot(v, w) + v * _dot(u, w) + c * w - 3 * c * u * _dot(u, w))
        assert rel_err(hvp, expected) < TOL


@pytest.mark.parametrize(
    "p_scale,t_scale", [(1.0, 2.0), (1e-14, 2.0), (3.0, 1e-15), (1e-14, 1e-13)],
    ids=["both_normed", "p_clamped", "t_clamped", "both_clamped"],
)
def test_byol_general_row_formulas(p_scale, t_scale):
    """The row math with the ``F.normalize`` clamp (``a``, ``b``): gradient and full double backward."""
    p, t = _rows(7, 11, p_scale, t_scale)
    g = (torch.rand(7, dtype=torch.float64) + 0.5).requires_grad_()
    wp = torch.randn(7, 11, dtype=torch.float64)
    wt = torch.randn(7, 11, dtype=torch.float64)
    dp, dt = _grad((g * _row_loss(p, t)).sum(), (p, t), create_graph=True)
    grad_g, grad_p, grad_t = _grad((dp * wp).sum() + (dt * wt).sum(), (g, p, t))

    with torch.no_grad():
        u, v, n_p, n_t, a, b, c = _row_state(p, t)
        gcol = g[:, None]
        gp = (v - a * c * u) / n_p
        gt = (u - b * c * v) / n_t
        assert rel_err((dp.detach(), dt.detach()), (-2 * gcol * gp, -2 * gcol * gt)) < TOL

        dc = (_dot(v, wp) - a * c * _dot(u, wp)) / n_p + (_dot(u, wt) - b * c * _dot(v, wt)) / n_t
        d_gp = (
            wt / n_t - b * _dot(v, wt) * v / n_t - a * dc * u - a * c * (wp - a * u * _dot(u, wp)) / n_p
        ) / n_p - a * _dot(u, wp) * gp / n_p
        d_gt = (
            wp / n_p - a * _dot(u, wp) * u / n_p - b * dc * v - b * c * (wt - b * v * _dot(v, wt)) / n_t
        ) / n_t - b * _dot(v, wt) * gt / n_t
        assert rel_err(grad_g, -2 * dc[:, 0]) < TOL
        assert rel_err((grad_p, grad_t), (-2 * gcol * d_gp, -2 * gcol * d_gt)) < TOL


# --------------------------------------------------------------------------------------------
# §2.6 BatchNorm (train mode: batch statistics; eval mode: running statistics)
# --------------------------------------------------------------------------------------------

BN_EPS = 1e-5


def _channels_last_flat(x: torch.Tensor) -> torch.Tensor:
    """``[N, C, *]`` -> ``[C, M]`` with ``M = N * prod(*)``: one row per channel."""
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def _from_flat(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    shape = (like.shape[1], like.shape[0], *like.shape[2:])
    return flat.reshape(shape).transpose(0, 1)


def _bn_inputs(shape: tuple[int, ...]):
    c = shape[1]
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 0.7).requires_grad_()
    weight = (torch.randn(c, dtype=torch.float64) + 1).requires_grad_()
    bias = torch.randn(c, dtype=torch.float64).requires_grad_()
    grad_out = (torch.randn(shape, dtype=torch.float64) * 1.3).requires_grad_()
    ddx = torch.randn(shape, dtype=torch.float64)
    ddw = torch.randn(c, dtype=torch.float64)
    ddb = torch.randn(c, dtype=torch.float64)
    return x, weight, bias, grad_out, ddx, ddw, ddb


def _mean(t: torch.Tensor) -> torch.Tensor:
    return t.mean(dim=1, keepdim=True)


@pytest.mark.parametrize("shape", [(4, 3), (5, 2, 7), (3, 4, 5, 2), (1, 3, 2, 3)])
def test_batch_norm_train_backward_and_double_backward(shape):
    x, weight, bias, grad_out, ddx, ddw, ddb = _bn_inputs(shape)
    y = F.batch_norm(x, None, None, weight, bias, training=True, eps=BN_EPS)
    dx, dw, db = _grad((y * grad_out).sum(), (x, weight, bias), create_graph=True)
    gx, gw, gg = _grad((dx * ddx).sum() + (dw * ddw).sum() + (db * ddb).sum(), (x, weight, grad_out))

    with torch.no_grad():
        xf, gf, ddxf = (_channels_last_flat(t) for t in (x, grad_out, ddx))
        gamma, dgamma, dbeta = weight[:, None], ddw[:, None], ddb[:, None]
        mu = _mean(xf)
        invstd = 1 / torch.sqrt(_mean((xf - mu) ** 2) + BN_EPS)
        xhat = (xf - mu) * invstd
        g_c = gf - _mean(gf)
        mean_gx = _mean(gf * xhat)

        # Backward.
        assert rel_err(db, gf.sum(dim=1)) < TOL
        assert rel_err(dw.detach(), (gf * xhat).sum(dim=1)) < TOL
        assert rel_err(dx.detach(), _from_flat(gamma * invstd * (g_c - xhat * mean_gx), x)) < TOL

        # Double backward.
        ddx_c = ddxf - _mean(ddxf)
        mean_ddx_xhat = _mean(ddxf * xhat)
        mean_ddx_g = _mean(ddx_c * gf)
        expected_gg = gamma * invstd * (ddx_c - xhat * mean_ddx_xhat) + dgamma * xhat + dbeta
        expected_gw = invstd * (ddxf * (g_c - xhat * mean_gx)).sum(dim=1, keepdim=True)
        expected_gx = gamma * invstd**2 * (
            xhat * (3 * mean_ddx_xhat * mean_gx - mean_ddx_g) - mean_gx * ddx_c - mean_ddx_xhat * g_c
        ) + dgamma * invstd * (g_c - xhat * mean_gx)
        assert rel_err(gg, _from_flat(expected_gg, x)) < TOL
        assert rel_err(gw, expected_gw[:, 0]) < TOL
        assert rel_err(gx, _from_flat(expected_gx, x)) < TOL


@pytest.mark.parametrize("shape", [(4, 3), (3, 4, 5, 2)])
def test_batch_norm_eval_backward_and_double_backward(shape):
    x, weight, bias, grad_out, ddx, ddw, ddb = _bn_inputs(shape)
    c = shape[1]
    running_mean = torch.randn(c, dtype=torch.float64)
    running_var = torch.rand(c, dtype=torch.float64) + 0.5
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training=False, eps=BN_EPS)
    dx, dw, db = _grad((y * grad_out).sum(), (x, weight, bias), create_graph=True)
    gx, gw, gg = _grad((dx * ddx).sum() + (dw * ddw).sum() + (db * ddb).sum(), (x, weight, grad_out))

    with torch.no_grad():
        xf, gf, ddxf = (_channels_last_flat(t) for t in (x, grad_out, ddx))
        gamma, dgamma, dbeta = weight[:, None], ddw[:, None], ddb[:, None]
        invstd = 1 / torch.sqrt(running_var[:, None] + BN_EPS)
        xhat = (xf - running_mean[:, None]) * invstd
        assert rel_err(dx.detach(), _from_flat(gamma * invstd * gf, x)) < TOL
        assert rel_err(dw.detach(), (gf * xhat).sum(dim=1)) < TOL
        assert rel_err(db, gf.sum(dim=1)) < TOL
        assert rel_err(gg, _from_flat(gamma * invstd * ddxf + dgamma * xhat + dbeta, x)) < TOL
        assert rel_err(gw, invstd[:, 0] * (ddxf * gf).sum(dim=1)) < TOL
        assert rel_err(gx, _from_flat(dgamma * invstd * gf, x)) < TOL
