"""Plain-PyTorch references for every op (docs/design.md §2).

These are the baselines that every fast path is validated and benchmarked against. They follow
the paper's implementation: NT-Xent materializes the ``N x N`` logits, the HVP recomputes the
forward pass and the create_graph gradient on every call, and CG runs one Python loop per tensor.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ._validation import (
    check_float_tensor,
    check_int_at_least,
    check_nonnegative,
    check_positive,
    check_same_device,
    check_same_shape,
    check_tensor_tuple,
    parse_nt_xent_args,
)

Tensors = tuple[torch.Tensor, ...]

#: Epsilons of the paper's CG: alpha = r.r / (d.Hd + CG_EPS), beta = r'.r' / (r.r + CG_EPS).
CG_EPS = 1e-12
#: Floor of MINRES's rotation denominator and relative threshold of an invariant Krylov space
#: (float64 machine epsilon, as in SciPy's minres).
MINRES_EPS = 2.220446049250313e-16
NORMALIZE_EPS = 1e-12


def positive_index(n: int, views: int, device: torch.device | None = None) -> torch.Tensor:
    """``[N, views-1]`` column indices of each row's positives: ``(i + k*B) mod N``, k = 1..m-1."""
    b = n // views
    rows = torch.arange(n, device=device).unsqueeze(1)
    shifts = torch.arange(1, views, device=device).unsqueeze(0) * b
    return (rows + shifts) % n


def nt_xent(z: torch.Tensor, *rest, temperature: float | None = None, views: int = 2) -> torch.Tensor:
    """NT-Xent (SimCLR) loss, materializing the ``N x N`` logits.

    ``nt_xent(z, temperature, views=2)`` with ``z`` of shape ``[N, D]``, ``N = views * B``, rows
    view-major; or ``nt_xent(z0, z1, temperature)`` with ``z0, z1`` of shape ``[B, D]``.
    Returns a scalar: ``1/(N(m-1)) * sum_i sum_{p in P(i)} (lse_i - s_ip)``.
    """
    z, tau, m = parse_nt_xent_args(z, rest, temperature, views)
    n = z.shape[0]
    u = F.normalize(z, dim=1, eps=NORMALIZE_EPS)
    s = (u @ u.T) / tau
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    lse = torch.logsumexp(s.masked_fill(eye, float("-inf")), dim=1)
    pos = s.gather(1, positive_index(n, m, z.device))
    return (lse.sum() * (m - 1) - pos.sum()) / (n * (m - 1))


def normalized_regression(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-row BYOL regression loss ``2 - 2 cos(p_b, t_b)``; ``p, t`` are ``[B, D]``, returns ``[B]``."""
    check_float_tensor("p", p, ndim=2)
    check_float_tensor("t", t, ndim=2)
    check_same_shape(p=p, t=t)
    check_same_device(p=p, t=t)
    pn = F.normalize(p, dim=1, eps=NORMALIZE_EPS)
    tn = F.normalize(t, dim=1, eps=NORMALIZE_EPS)
    return 2 - 2 * (pn * tn).sum(dim=1)


def byol_loss(p1: torch.Tensor, p2: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor) -> torch.Tensor:
    """Symmetric BYOL loss ``mean_b[(2 - 2cos(p1_b, t2_b)) + (2 - 2cos(p2_b, t1_b))]``; all ``[B, D]``."""
    for name, t in (("p1", p1), ("p2", p2), ("t1", t1), ("t2", t2)):
        check_float_tensor(name, t, ndim=2)
    check_same_shape(p1=p1, p2=p2, t1=t1, t2=t2)
    check_same_device(p1=p1, p2=p2, t1=t1, t2=t2)
    return (normalized_regression(p1, t2) + normalized_regression(p2, t1)).mean()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def average_over_ranks(tensors: Sequence[torch.Tensor]) -> Tensors:
    """Mean of each tensor over torch.distributed ranks (one all-reduce per tensor, as the paper)."""
    if not _distributed():
        return tuple(tensors)
    world = dist.get_world_size()
    out = []
    for t in tensors:
        t = t.clone()
        dist.all_reduce(t)
        out.append(t / world)
    return tuple(out)


def hvp(loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor], vectors: Sequence[torch.Tensor]) -> Tensors:
    """Hessian-vector product ``H v`` of ``loss_fn()`` w.r.t. ``params``, recomputed from scratch.

    ``loss_fn`` is a zero-argument callable returning the scalar loss; ``vectors`` is one tensor per
    parameter. Every call re-runs the forward pass and the create_graph gradient (the paper's
    behaviour). Parameters that do not reach the loss get a zero product.
    """
    params = check_tensor_tuple("params", params)
    vectors = check_tensor_tuple("vectors", vectors, like=params)
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    pairs = [(g, v) for g, v in zip(grads, vectors) if g is not None and g.requires_grad]
    if not pairs:
        return tuple(torch.zeros_like(p) for p in params)
    hv = torch.autograd.grad(
        [g for g, _ in pairs], params, [v for _, v in pairs], allow_unused=True
    )
    return tuple(torch.zeros_like(p) if h is None else h.detach() for h, p in zip(hv, params))


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum()


def cg_solve(
    matvec: Callable[[Tensors], Sequence[torch.Tensor]],
    b: Sequence[torch.Tensor],
    iters: int = 5,
    layerwise: bool = True,
) -> Tensors:
    """Conjugate gradient for ``A x = b`` from ``x0 = 0``, the paper's numerics (docs/design.md §2.3).

    ``b`` is a tuple of tensors; ``matvec`` maps such a tuple to ``A`` applied to it. ``layerwise``
    runs separate ``alpha``/``beta`` per tensor; otherwise one pair for the concatenated vector.
    ``alpha = r.r / (d.Ad + 1e-12)``, ``beta = r'.r' / (r.r + 1e-12)``; the result goes through
    ``nan_to_num``.
    """
    b = check_tensor_tuple("b", b)
    iters = check_int_at_least("iters", iters, 1)
    x = [torch.zeros_like(t) for t in b]
    r = [t.clone() for t in b]
    d = [t.clone() for t in b]
    for _ in range(iters):
        ad = tuple(matvec(tuple(d)))
        if layerwise:
            rr = [_dot(ri, ri) for ri in r]
            alpha = [rri / (_dot(di, adi) + CG_EPS) for rri, di, adi in zip(rr, d, ad)]
        else:
            rr_all = sum(_dot(ri, ri) for ri in r)
            alpha_all = rr_all / (sum(_dot(di, adi) for di, adi in zip(d, ad)) + CG_EPS)
            rr = [rr_all] * len(r)
            alpha = [alpha_all] * len(r)
        x = [xi + ai * di for xi, ai, di in zip(x, alpha, d)]
        r = [ri - ai * adi for ri, ai, adi in zip(r, alpha, ad)]
        if layerwise:
            beta = [_dot(ri, ri) / (rri + CG_EPS) for ri, rri in zip(r, rr)]
        else:
            beta_all = sum(_dot(ri, ri) for ri in r) / (rr[0] + CG_EPS)
            beta = [beta_all] * len(r)
        d = [ri + bi * di for ri, bi, di in zip(r, beta, d)]
    return tuple(torch.nan_to_num(xi) for xi in x)


def minres_solve(
    matvec: Callable[[Tensors], Sequence[torch.Tensor]],
    b: Sequence[torch.Tensor],
    iters: int = 5,
) -> Tensors:
    """MINRES (Paige-Saunders) for a symmetric ``A x = b`` from ``x0 = 0``, one plain loop (docs/design.md §2.3).

    ``b`` is a tuple of tensors and ``matvec`` maps such a tuple to ``A`` applied to it; ``A`` may be
    indefinite. Iterate ``k`` minimizes ``||b - A x||`` over the Krylov space ``K_k(A, b)``. The
    recurrences are those of SciPy's ``scipy.sparse.linalg.minres`` without preconditioner; the
    scalars are float64 Python numbers. Stops early when the Krylov space is invariant (then the
    iterate solves the system).
    """
    b = check_tensor_tuple("b", b)
    iters = check_int_at_least("iters", iters, 1)
    x = [torch.zeros_like(t) for t in b]
    beta1 = float(sum(_dot(t, t) for t in b)) ** 0.5
    if beta1 == 0.0:
        return tuple(x)
    r1 = [t.clone() for t in b]
    r2 = [t.clone() for t in b]
    w = [torch.zeros_like(t) for t in b]
    w2 = [torch.zeros_like(t) for t in b]
    oldb, beta, dbar, epsln, phibar, cs, sn = 0.0, beta1, 0.0, 0.0, beta1, -1.0, 0.0
    for k in range(iters):
        v = [t * (1.0 / beta) for t in r2]
        y = list(matvec(tuple(v)))
        if k > 0:
            y = [yi - (beta / oldb) * ri for yi, ri in zip(y, r1)]
        alfa = float(sum(_dot(vi, yi) for vi, yi in zip(v, y)))
        y = [yi - (alfa / beta) * ri for yi, ri in zip(y, r2)]
        r1, r2 = r2, y
        oldb, beta = beta, float(sum(_dot(t, t) for t in r2)) ** 0.5
        # Apply the previous rotation, then the new one that annihilates beta.
        oldeps = epsln
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln = sn * beta
        dbar = -cs * beta
        gamma = max((gbar * gbar + beta * beta) ** 0.5, MINRES_EPS)
        cs, sn = gbar / gamma, beta / gamma
        phi, phibar = cs * phibar, sn * phibar
        w1, w2 = w2, w
        w = [(vi - oldeps * a - delta * c) * (1.0 / gamma) for vi, a, c in zip(v, w1, w2)]
        x = [xi + phi * wi for xi, wi in zip(x, w)]
        if beta <= 10 * MINRES_EPS * beta1:
            break
    return tuple(torch.nan_to_num(xi) for xi in x)


def implicit_grad(
    loss_fn: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    v: Sequence[torch.Tensor],
    lam: float = 0.001,
    damping: float = 10.0,
    iters: int = 5,
    layerwise: bool = True,
    method: str = "cg",
) -> Tensors:
    """Solve ``(I + H / (lam + damping)) x = v``, ``H`` the Hessian of ``loss_fn()`` w.r.t. ``params``.

    The paper's implicit-gradient step: the HVP is recomputed from scratch on every iteration,
    and ``v`` and every HVP are averaged over torch.distributed ranks when a group is initialized.
    ``method="cg"`` (the paper's; ``layerwise`` as in :func:`cg_solve`) or ``"minres"``
    (:func:`minres_solve`, which has no layerwise mode: ``layerwise`` is then ignored).
    """
    if method not in ("cg", "minres"):
        raise ValueError(f"method must be 'cg' or 'minres', got {method!r}")
    params = check_tensor_tuple("params", params)
    v = check_tensor_tuple("v", v, like=params)
    scale = 1.0 / check_positive("lam + damping", check_nonnegative("lam", lam) + check_nonnegative("damping", damping))
    v = average_over_ranks([t.detach() for t in v])

    def matvec(d: Tensors) -> Tensors:
        hd = average_over_ranks(hvp(loss_fn, params, d))
        return tuple(di + scale * hdi for di, hdi in zip(d, hd))

    if method == "minres":
        return minres_solve(matvec, v, iters=iters)
    return cg_solve(matvec, v, iters=iters, layerwise=layerwise)


__all__ = [
    "CG_EPS",
    "byol_loss",
    "cg_solve",
    "hvp",
    "implicit_grad",
    "minres_solve",
    "normalized_regression",
    "nt_xent",
    "positive_index",
]
