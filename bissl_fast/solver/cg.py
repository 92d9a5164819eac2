"""Conjugate gradient with the paper's numerics and fused multi-tensor vector updates."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch

from .._types import Tensors
from ..reference import CG_EPS
from ._krylov import check_solve_args, checked_matvec, finish, start
from .cg_vector_ops import vector_ops


@dataclasses.dataclass
class CGInfo:
    """What a :func:`cg_solve` run did.

    Attributes:
        iterations: CG iterations run (matvecs spent on directions; a warm start spends one more).
        residual_norms: ``||r_k||`` over the concatenated vector, ``k = 0 .. iterations``.
        b_norm: ``||b||``.
        converged: ``tol`` was given and ``||r|| / ||b|| <= tol`` was reached.
        backend: the vector backend that ran (``"torch"``, ``"cpp"`` or ``"cuda"``).
        nonfinite: the solution contained NaN/inf before ``nan_to_num``.
        curvatures: ``d_k . A d_k / d_k . d_k`` of every direction, over the concatenated vector
            (a Rayleigh quotient of ``A``: never below its smallest eigenvalue, so a negative
            entry proves ``A`` indefinite).

    In layerwise mode ``residual_norms`` are those of the recursively updated ``r``, which is not
    ``b - A x`` there (per-tensor step sizes break the identity); global CG keeps it.
    """

    iterations: int
    residual_norms: list[float]
    b_norm: float
    converged: bool
    backend: str
    nonfinite: bool = False
    curvatures: list[float] = dataclasses.field(default_factory=list)

    @property
    def relative_residuals(self) -> list[float]:
        """``||r_k|| / ||b||`` (``inf`` entries when ``b == 0``)."""
        return [r / self.b_norm if self.b_norm > 0 else math.inf for r in self.residual_norms]

    @property
    def negative_curvature(self) -> bool:
        """Some direction had ``d . A d < 0``: ``A`` is indefinite (CG's convergence theory does not apply)."""
        return any(c < 0 for c in self.curvatures)


def _total(s: torch.Tensor) -> torch.Tensor:
    return s.sum().expand(s.shape[0])


def cg_solve(
    matvec: Callable[[Tensors], Sequence[torch.Tensor]],
    b: Sequence[torch.Tensor],
    iters: int = 5,
    layerwise: bool = True,
    x0: Sequence[torch.Tensor] | None = None,
    tol: float | None = None,
    return_info: bool = False,
    backend: str = "auto",
) -> Tensors | tuple[Tensors, CGInfo]:
    """Solve ``A x = b`` by conjugate gradient, the paper's numerics (docs/design.md §2.3).

    Args:
        matvec: maps a tuple shaped like ``b`` to ``A`` applied to it. It must not modify its
            argument (a solver-owned buffer that is updated in place afterwards).
        b: tuple of ``T`` tensors (e.g. one per parameter, any shapes, one device).
        iters: maximum number of CG iterations (one matvec each), ``>= 1``.
        layerwise: per-tensor ``alpha_t``, ``beta_t`` (default, the paper's); otherwise one pair
            for the concatenated vector.
        x0: warm start shaped like ``b`` (costs one extra matvec for ``r0 = b - A x0``);
            ``None`` starts from zero without a matvec.
        tol: stop once ``||r|| / ||b|| <= tol`` (global norm, in both modes). Checking it
            synchronizes with the device once per iteration; ``None`` never stops early.
        return_info: also return a :class:`CGInfo` (its curvature record costs ``d . d`` in the
            same pass as ``d . A d``, and one synchronization per iteration).
        backend: vector-update backend, ``"auto" | "torch" | "cpp" | "cuda"`` (see
            ``bissl_fast.solver.cg_vector_ops``).

    ``alpha = r.r / (d.Ad + 1e-12)``, ``beta = r'.r' / (r.r + 1e-12)`` per tensor (layerwise) or
    on the totals (global); scalars are float64 device tensors, so without ``tol`` /
    ``return_info`` the only host synchronization is the final non-finite check. The result is
    detached and goes through ``nan_to_num``; if it contained NaN/inf a ``RuntimeWarning`` is
    issued. CG is not differentiated through (``b`` and ``x0`` are detached).

    Returns:
        ``x`` (tuple shaped like ``b``), or ``(x, info)`` with ``return_info=True``.
    """
    b, iters, tol = check_solve_args(matvec, b, iters, tol)
    if not isinstance(layerwise, bool):
        raise TypeError(f"layerwise must be a bool, got {type(layerwise).__name__}")
    ops = vector_ops(backend, b)
    track = return_info or tol is not None
    apply = checked_matvec(matvec, b)
    # Solver-owned contiguous buffers: the fused kernels update x, r, d in place.
    x, r = start(b, x0, apply)
    d = tuple(t.clone() for t in r)
    rr = ops.dot(r, r)

    norms: list[float] = []
    curvatures: list[float] = []
    b_norm = 0.0
    converged = False
    if track:
        b_norm = math.sqrt(float(ops.dot(b, b).sum()))
        norms.append(math.sqrt(float(rr.sum())))
        converged = tol is not None and norms[-1] <= tol * b_norm
    done = 0
    while done < iters and not converged:
        ad = apply(d, "d")
        if track:
            dad, dd = ops.dot_pair(d, ad, d)
            curvatures.append(float(dad.sum()) / max(float(dd.sum()), 1e-300))
        else:
            dad = ops.dot(d, ad)
        alpha = rr / (dad + CG_EPS) if layerwise else _total(rr) / (_total(dad) + CG_EPS)
        rr_new = ops.update(x, r, d, ad, alpha)
        beta = rr_new / (rr + CG_EPS) if layerwise else _total(rr_new) / (_total(rr) + CG_EPS)
        ops.direction(d, r, beta)
        rr = rr_new
        done += 1
        if track:
            norms.append(math.sqrt(float(rr.sum())))
            converged = tol is not None and norms[-1] <= tol * b_norm

    x, nonfinite = finish(x, "cg_solve")
    if not return_info:
        return x
    return x, CGInfo(done, norms, b_norm, converged, ops.name, nonfinite, curvatures)
