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


def _products(op: HessianOperator, q: torch.Tensor) -> torch.Tensor:
    """``H q`` for the columns of ``q [n, b]`` (flattened float64), one batched product (``matmat``)."""
    return _flat(op.matmat(_unflat(q.T.contiguous(), op.params, batched=True)), batched=True).T


def _power(op: HessianOperator, k: int, iters: int, gen: torch.Generator) -> torch.Tensor:
    """Block power (subspace) iteration with ``k`` vectors per batched product, Rayleigh-Ritz at the end."""
    params = op.params
    n = sum(p.numel() for p in params)
    if k > n:
        raise ValueError(f"k={k} exceeds the number of parameters ({n})")
    q = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64).to(params[0].device))[0]
    for _ in range(iters):
        q = torch.linalg.qr(_products(op, q))[0]
    hq = _products(op, q)
    ritz = torch.linalg.eigvalsh(0.5 * (q.T @ hq + hq.T @ q))
    # Power iteration converges to the largest |eigenvalue|; order by magnitude, largest first.
    return ritz[ritz.abs().argsort(descending=True)]


def _orthonormal_columns(w: torch.Tensor, scale: float) -> torch.Tensor:
    """An orthonormal basis of the columns of ``w`` without the directions below ``1e-10 * scale`` (a block
    that the Krylov space already (almost) contains shrinks instead of adding noise)."""
    evals, evecs = torch.linalg.eigh(w.T @ w)
    keep = evals > (1e-10 * max(scale, 1.0)) ** 2
    return (w @ evecs[:, keep]) / evals[keep].sqrt()


def _block_lanczos(op: HessianOperator, block: int, products: int, gen: torch.Generator) -> torch.Tensor:
    """Block Lanczos with full reorthogonalization: one batched product of ``block`` vectors per step until
    ``products`` products (rounded up to whole blocks) or the whole space; returns the Ritz values
    (ascending) of the Krylov space built. ``block = 1`` is Lanczos."""
    params = op.params
    n = sum(p.numel() for p in params)
    q = torch.linalg.qr(torch.randn(n, min(block, n), generator=gen, dtype=torch.float64).to(params[0].device))[0]
    basis = q[:, :0]
    columns = []  # (first column, basis^T H q) of every block: the upper block triangle of basis^T H basis
    while q.shape[1] > 0 and basis.shape[1] < min(products, n):
        w = _products(op, q)
        first = basis.shape[1]
        basis = torch.cat([basis, q], dim=1)
        projection = basis.T @ w
        columns.append((first, projection))
        w = w - basis @ projection  # full reorthogonalization (twice is enough)
        w = w - basis @ (basis.T @ w)
        q = _orthonormal_columns(w, float(projection.abs().max()))
    size = basis.shape[1]
    t = torch.zeros(size, size, dtype=torch.float64, device=basis.device)
    for first, projection in columns:
        t[: projection.shape[0], first: first + projection.shape[1]] = projection
    return torch.linalg.eigvalsh(torch.triu(t) + torch.triu(t, 1).T)


def lanczos_ritz_values(op: HessianOperator, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """Ritz values of ``H`` (float64 ``[<= iters]``, ascending) from ``iters`` Lanczos steps (one ``matvec`` each).

    They lie inside the spectrum of ``H``: the first is an upper bound on ``lambda_min(H)``, the
    last a lower bound on ``lambda_max(H)``. The start vector is drawn from a CPU generator seeded
    with ``seed``, so every rank of a distributed run draws the same one.
    """
    iters = check_int_at_least("iters", iters, 1)
    return _block_lanczos(op, 1, iters, torch.Generator().manual_seed(seed))


def top_eigenvalues(
    op: HessianOperator, k: int = 1, iters: int = 20, method: str = "lanczos", seed: int = 0, block_size: int = 1
) -> torch.Tensor:
    """Estimates of the ``k`` largest eigenvalues of ``H`` (float64 tensor ``[k]``, largest first).

    ``method="lanczos"``: about ``iters`` products by (block) Lanczos with full reorthogonalization,
    ``block_size`` vectors per batched product (``op.matmat``; 1: plain Lanczos, one ``matvec`` per step;
    memory ``iters`` flattened copies of the parameters); returns the ``k`` largest Ritz values
    (algebraically largest). ``method="power"``: block power iteration with ``k`` vectors per
    batched product, ``iters + 1`` batched products, returns the ``k`` eigenvalues of largest
    magnitude (power iteration finds those; for a Hessian with a large negative direction this can
    differ from the algebraically largest).
    Estimates, not bounds: Ritz values lie inside the spectrum, so the true top eigenvalue is
    at least the first entry.
    """
    k = check_int_at_least("k", k, 1)
    iters = check_int_at_least("iters", iters, 1)
    block_size = check_int_at_least("block_size", block_size, 1)
    gen = torch.Generator().manual_seed(seed)
    if method == "power":
        return _power(op, k, iters, gen)[:k]
    if method != "lanczos":
        raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")
    if k > iters:
        raise ValueError(f"Lanczos with iters={iters} gives at most {iters} eigenvalues; k={k}")
    ritz = _block_lanczos(op, block_size, iters, gen)
    return ritz.flip(0)[:k]


@dataclasses.dataclass
class DampingReport:
    """Spectrum of ``H`` and of the CG system ``I + H / (lam + damping)``.

    ``lambda_max`` / ``lambda_min``: (block) Lanczos estimates of the extreme eigenvalues of ``H``
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
    op: HessianOperator, lam: float = 0.001, damping: float = 10.0, iters: int = 20, seed: int = 0,
    block_size: int = 4,
) -> DampingReport:
    """Estimate whether ``I + H / (lam + damping)`` is positive definite: block Lanczos with about ``iters``
    products, ``block_size`` vectors per batched product (``op.matmat``; 1 is plain Lanczos).

    ``I + H/c`` is positive definite exactly when ``lambda_min(H) > -c``, ``c = lam + damping``.
    """
    c = check_nonnegative("lam", lam) + check_nonnegative("damping", damping)
    if c <= 0:
        raise ValueError("lam + damping must be > 0")
    iters = check_int_at_least("iters", iters, 2)
    block_size = check_int_at_least("block_size", block_size, 1)
    ritz = _block_lanczos(op, block_size, iters, torch.Generator().manual_seed(seed))
    lmin, lmax = float(ritz[0]), float(ritz[-1])
    smin, smax = 1.0 + lmin / c, 1.0 + lmax / c
    return DampingReport(lmax, lmin, float(lam), float(damping), smin, smax, smin > 0)
