"""MINRES (Paige-Saunders) for symmetric, possibly indefinite systems, with fused multi-tensor vector updates."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch

from .._types import Tensors
from ..reference import MINRES_EPS
from ._krylov import check_solve_args, checked_matvec, finish, start
from .cg_vector_ops import vector_ops


@dataclasses.dataclass
class MINRESInfo:
    """What a :func:`minres_solve` run did.

    Attributes:
        iterations: MINRES iterations run (one matvec each; a warm start spends one more).
        residual_norms: ``||b - A x_k||``, ``k = 0 .. iterations``, from MINRES's own recurrence
            (exact in exact arithmetic; no extra matvec), over the concatenated vector.
        b_norm: ``||b||``.
        converged: ``tol`` was reached, or the Krylov space became invariant (``x`` then solves
            the system).
        backend: the vector backend that ran (``"torch"``, ``"cpp"`` or ``"cuda"``).
        ritz_values: eigenvalues of the Lanczos tridiagonal matrix of the run, ascending. They
            lie inside ``A``'s spectrum, so a negative one proves ``A`` indefinite, and the
            smallest is an upper bound on ``A``'s smallest eigenvalue (empty after non-finite
            products).
        nonfinite: the solution contained NaN/inf before ``nan_to_num``.
    """

    iterations: int
    residual_norms: list[float]
    b_norm: float
    converged: bool
    backend: str
    ritz_values: list[float]
    nonfinite: bool = False

    @property
    def relative_residuals(self) -> list[float]:
        """``||r_k|| / ||b||`` (``inf`` entries when ``b == 0``)."""
        return [r / self.b_norm if self.b_norm > 0 else math.inf for r in self.residual_norms]

    @property
    def indefinite(self) -> bool:
        """A Ritz value is negative: ``A`` has a negative eigenvalue."""
        return bool(self.ritz_values) and self.ritz_values[0] < 0


def _ritz_values(alfas: list[float], betas: list[float]) -> list[float]:
    """Eigenvalues (ascending) of the tridiagonal matrix with diagonal ``alfas`` and off-diagonal ``betas``
    (none when a coefficient is not finite)."""
    if not alfas or not all(math.isfinite(c) for c in alfas + betas):
        return []
    t = torch.diag(torch.tensor(alfas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas, dtype=torch.float64)
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigvalsh(t).tolist()


def minres_solve(
    matvec: Callable[[Tensors], Sequence[torch.Tensor]],
    b: Sequence[torch.Tensor],
    iters: int = 5,
    x0: Sequence[torch.Tensor] | None = None,
    tol: float | None = None,
    return_info: bool = False,
    backend: str = "auto",
) -> Tensors | tuple[Tensors, MINRESInfo]:
    """Solve a symmetric ``A x = b`` by MINRES (docs/design.md §2.3); same convention as :func:`cg_solve`.

    Iterate ``k`` minimizes ``||b - A x||`` over ``x0 + K_k(A, r0)``, so the residual never grows,
    also when ``A`` is indefinite (where CG's can). The recurrences are SciPy's
    ``scipy.sparse.linalg.minres`` without preconditioner (tested against its iterates).

    Args:
        matvec: maps a tuple shaped like ``b`` to ``A`` applied to it (``A`` symmetric). It must
            not modify its argument (a solver-owned buffer that is updated in place afterwards).
        b: tuple of ``T`` tensors (e.g. one per parameter, any shapes, one device).
        iters: maximum number of iterations (one matvec each), ``>= 1``.
        x0: warm start shaped like ``b`` (costs one extra matvec for ``r0 = b - A x0``);
            ``None`` starts from zero without a matvec.
        tol: stop once ``||r|| / ||b|| <= tol``. ``None`` never stops early, except on an
            invariant Krylov space (then ``x`` solves the system).
        return_info: also return a :class:`MINRESInfo`.
        backend: vector-update backend, ``"auto" | "torch" | "cpp" | "cuda"`` (see
            ``bissl_fast.solver.cg_vector_ops``): three fused passes per iteration.

    The scalars (the Lanczos coefficients and the Givens rotations) are float64 numbers on the
    host: each iteration synchronizes with the device twice (after ``v . A v`` and after the new
    Lanczos norm), which is small beside the matvec it follows. The result is detached and goes
    through ``nan_to_num`` (with a ``RuntimeWarning`` when it contained NaN/inf), like CG's.

    Returns:
        ``x`` (tuple shaped like ``b``), or ``(x, info)`` with ``return_info=True``.
    """
    b, iters, tol = check_solve_args(matvec, b, iters, tol)
    ops = vector_ops(backend, b)
    apply = checked_matvec(matvec, b)
    x, r1 = start(b, x0, apply)
    b_norm = math.sqrt(float(ops.dot(b, b).sum()))
    beta1 = b_norm if x0 is None else math.sqrt(float(ops.dot(r1, r1).sum()))
    norms = [beta1]
    alfas: list[float] = []
    betas: list[float] = []
    done = 0
    converged = beta1 == 0.0 or (tol is not None and beta1 <= tol * b_norm)
    if not converged:
        # Solver-owned buffers, all updated in place: r1, r2 (the last two unnormalized Lanczos
        # vectors), v (the normalized one), wa, wb (the search directions w_{k-2}, w_{k-1}).
        r2 = tuple(t.clone() for t in r1)
        v = tuple(torch._foreach_mul(list(r1), 1.0 / beta1))
        wa = tuple(torch.zeros_like(t) for t in b)
        wb = tuple(torch.zeros_like(t) for t in b)
        oldb, beta, dbar, epsln, phibar, cs, sn = 0.0, beta1, 0.0, 0.0, beta1, -1.0, 0.0
        while done < iters and not converged:
            av = apply(v, "v")
            c1 = beta / oldb if done > 0 else 0.0
            v_av, v_r1 = ops.dot_pair(v, av, r1).sum(dim=1).tolist()
            alfa = v_av - c1 * v_r1  # = v . (A v - c1 r1)
            yy = ops.lanczos(r1, av, r2, c1, alfa / beta)  # the new Lanczos vector, written over r1
            r1, r2 = r2, r1
            oldb, beta = beta, math.sqrt(float(yy.sum()))
            alfas.append(alfa)
            betas.append(beta)
            # Apply the previous rotation, then the new one that annihilates beta.
            oldeps = epsln
            delta = cs * dbar + sn * alfa
            gbar = sn * dbar - cs * alfa
            epsln = sn * beta
            dbar = -cs * beta
            gamma = max(math.hypot(gbar, beta), MINRES_EPS)
            cs, sn = gbar / gamma, beta / gamma
            phi, phibar = cs * phibar, sn * phibar
            invariant = beta <= 10 * MINRES_EPS * beta1
            ops.minres_update(wa, x, v, wb, r2, oldeps, delta, 1.0 / gamma, phi, 0.0 if invariant else 1.0 / beta)
            wa, wb = wb, wa
            done += 1
            norms.append(phibar)
            converged = invariant or (tol is not None and phibar <= tol * b_norm)
    x, nonfinite = finish(x, "minres_solve")
    if not return_info:
        return x
    info = MINRESInfo(done, norms, b_norm, converged, ops.name, _ritz_values(alfas, betas[:-1]), nonfinite)
    return x, info
