"""Eigenvalue estimates of the Hessian operator, to choose the CG damping.

CG on ``(I + H / (lam + damping)) x = v`` is only guaranteed to behave when that matrix is
positive definite, i.e. ``lambda_min(H) > -(lam + damping)``; the pretext Hessian of a deep
network is indefinite, so this is worth checking when picking ``damping``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from .._types import Tensors
from .._validation import check_int_at_least, check_nonnegative
from .hessian import HessianOperator


def _flat(ts: Sequence[torch.Tensor], batched: bool = False) -> torch.Tensor:
    if batched:
        return torch.cat([t.reshape(t.shape[0], -1) for t in ts], dim=1).to(torch.float64)
    return torch.cat([t.reshape(-1) for t in ts]).to(torch.float64)


def _unflat(flat: torch.Tensor, like: Sequence[torch.Tensor], batched: bool = False) -> Tensors:
    out, offset = [], 0
    for p in like:
        n = p.numel()
        piece = flat[..., offset:offset + n]
        out.append(piece.reshape(*((flat.shape[0],) if batched else ()), *p.shape).to(p.dtype))
        offset += n
    return tuple(out)


def _power(op: HessianOperator, k: int, iters: int, gen: torch.Generator) -> torch.Tensor:
    """Block power (subspace) iteration with ``k`` vectors per batched product, Rayleigh-Ritz at the end."""
    params = op.params
    n = sum(p.numel() for p in params)
    if k > n:
        raise ValueError(f"k={k} exceeds the number of parameters ({n})")
    q = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64).to(params[0].device))[0]
    for _ in range(iters):
        hq = _flat(op.matmat(_unflat(q.T.contiguous(), params, batched=True)), batched=True).T
        q = torch.linalg.qr(hq)[0]
    hq = _flat(op.matmat(_unflat(q.T.contiguous(), params, batched=True)), batched=True).T
    ritz = torch.linalg.eigvalsh(0.5 * (q.T @ hq + hq.T @ q))
    # Power iteration converges to the largest |eigenvalue|; order by magnitude, largest first.
    return ritz[ritz.abs().argsort(descending=True)]


def _lanczos_tridiagonal(op: HessianOperator, iters: int, gen: torch.Generator) -> torch.Tensor:
    """Lanczos with full reorthogonalization; returns the Ritz values (ascending)."""
    params = op.params
    n = sum(p.numel() for p in params)
    m = min(iters, n)
    q = torch.randn(n, generator=gen, dtype=torch.float64).to(params[0].device)
    q = q / q.norm()
    basis = [q]
    alphas, betas = [], []
    for j in range(m):
        w = _flat(op.matvec(_unflat(basis[-1], params)))
        alpha = torch.dot(w, basis[-1])
        alphas.append(alpha)
        qs = torch.stack(basis)
        w = w - qs.T @ (qs @ w)  # full reorthogonalization (twice is enough)
        w = w - qs.T @ (qs @ w)
        beta = w.norm()
        if j == m - 1 or float(beta) <= 1e-10 * max(1.0, float(alpha.abs())):
            break
        betas.append(beta)
        basis.append(w / beta)
    t = torch.diag(torch.stack(alphas))
    if betas:
        off = torch.stack(betas)
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigvalsh(t)


def lanczos_ritz_values(op: HessianOperator, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """Ritz values of ``H`` (float64 ``[<= iters]``, ascending) from ``iters`` Lanczos steps (one ``matvec`` each).

    They lie inside the spectrum of ``H``: the first is an upper bound on ``lambda_min(H)``, the
    last a lower bound on ``lambda_max(H)``. The start vector is drawn from a CPU generator seeded
    with ``seed``, so every rank of a distributed run draws the same one.
    """
    iters = check_int_at_least("iters", iters, 1)
    return _lanczos_tridiagonal(op, iters, torch.Generator().manual_seed(seed))


def top_eigenvalues(
    op: HessianOperator, k: int = 1, iters: int = 20, method: str = "lanczos", seed: int = 0
) -> torch.Tensor:
    """Estimates of the ``k`` largest eigenvalues of ``H`` (float64 tensor ``[k]``, largest first).

    ``method="lanczos"``: ``iters`` Lanczos steps (one ``matvec`` each, full reorthogonalization,
    memory ``iters`` flattened copies of the parameters), returns the ``k`` largest Ritz values
    (algebraically largest). ``method="power"``: block power iteration with ``k`` vectors per
    batched product (``op.matmat``), ``iters + 1`` batched products, returns the ``k``
    eigenvalues of largest magnitude (power iteration finds those; for a Hessian with a large
    negative direction this can differ from the algebraically largest).
    Estimates, not bounds: Ritz values lie inside the spectrum, so the true top eigenvalue is
    at least the first entry.
    """
    k = check_int_at_least("k", k, 1)
    iters = check_int_at_least("iters", iters, 1)
    gen = torch.Generator().manual_seed(seed)
    if method == "power":
        return _power(op, k, iters, gen)[:k]
    if method != "lanczos":
        raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")
    if k > iters:
        raise ValueError(f"Lanczos with iters={iters} gives at most {iters} eigenvalues; k={k}")
    ritz = _lanczos_tridiagonal(op, iters, gen)
    return ritz.flip(0)[:k]


@dataclasses.dataclass
class DampingReport:
    """Spectrum of ``H`` and of the CG system ``I + H / (lam + damping)``.

    ``lambda_max`` / ``lambda_min``: Lanczos estimates of the extreme eigenvalues of ``H``
    (inner estimates: the true extremes are at least as far out). ``system_min`` /
    ``system_max``: the same for ``I + H / (lam + damping)``. ``positive_definite``: whether
    ``system_min > 0`` for the ESTIMATE; because ``lambda_min`` is only an upper bound on the
    true smallest eigenvalue, treat a small margin as "not safe" and raise ``damping``.
    """

    lambda_max: float
    lambda_min: float
    lam: float
    damping: float
    system_min: float
    system_max: float
    positive_definite: bool

    @property
    def condition_number(self) -> float:
        """``system_max / system_min`` (inf when not positive definite)."""
        return self.system_max / self.system_min if self.system_min > 0 else float("inf")


def check_damping(
    op: HessianOperator, lam: float = 0.001, damping: float = 10.0, iters: int = 20, seed: int = 0
) -> DampingReport:
    """Estimate whether ``I + H / (lam + damping)`` is positive definite (Lanczos, ``iters`` products).

    ``I + H/c`` is positive definite exactly when ``lambda_min(H) > -c``, ``c = lam + damping``.
    """
    c = check_nonnegative("lam", lam) + check_nonnegative("damping", damping)
    if c <= 0:
        raise ValueError("lam + damping must be > 0")
    iters = check_int_at_least("iters", iters, 2)
    ritz = _lanczos_tridiagonal(op, iters, torch.Generator().manual_seed(seed))
    lmin, lmax = float(ritz[0]), float(ritz[-1])
    smin, smax = 1.0 + lmin / c, 1.0 + lmax / c
    return DampingReport(lmax, lmin, float(lam), float(damping), smin, smax, smin > 0)
