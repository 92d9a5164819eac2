"""The BiSSL implicit gradient: solve ``(I + H / (lam + damping)) x = v`` by CG or MINRES (docs/design.md §2.3)."""
from __future__ import annotations

import dataclasses
import math
import numbers
import weakref
from collections.abc import Sequence

import torch

from .._dist import bucketed_mean, is_distributed
from .._types import Tensors
from .._validation import (
    check_int_at_least,
    check_nonnegative,
    check_positive,
    check_tensor_tuple,
)
from .cg import CGInfo, cg_solve
from .hessian import HessianOperator
from .minres import MINRESInfo, minres_solve
from .spectrum import lanczos_ritz_values

METHODS = ("cg", "minres")
#: ``auto_damping`` keeps the smallest eigenvalue of ``I + H / (lam + damping)``, as estimated by
#: Lanczos, at least this large.
AUTO_DAMPING_MARGIN = 0.5


@dataclasses.dataclass
class SolveReport:
    """How well one implicit-gradient solve did (docs/design.md §2.3). ``A = I + H / (lam + damping)``.

    Attributes:
        method: ``"cg-layerwise"`` (the paper's), ``"cg-global"`` or ``"minres"``.
        iterations: solver iterations (one Hessian product each).
        products: Hessian products of this solve: the iterations, plus one for a warm start, plus
            one when the residual was measured, plus the auto-damping estimate's.
        relative_residual: ``||v - A x|| / ||v||`` of the returned ``x``.
        residual_measured: ``relative_residual`` comes from one more product ``A x``; otherwise it
            is the solver's own recurrence, which equals it in exact arithmetic for global CG and
            MINRES (layerwise CG's recursive residual is not ``v - A x``, so it is always measured
            unless turned off, and then reported as ``nan``).
        no_solve_relative_residual: ``||v - A v|| / ||v||``, the residual of ``x = v`` (no solve),
            from the first product (free); ``None`` with a warm start or ``v = 0``.
        system_min_estimate: an upper bound on the smallest eigenvalue of ``A`` that the solve
            found for free: the smallest Rayleigh quotient ``d . A d / d . d`` of CG's directions,
            or MINRES's smallest Ritz value. Negative: ``A`` is indefinite.
        damping: the damping the system used (raised by ``auto_damping``).
        damping_products: Hessian products spent estimating the damping (on the first solve with
            an operator; included in ``products``).
        nonfinite: the solution contained NaN/inf before ``nan_to_num``.
    """

    method: str
    iterations: int
    products: int
    relative_residual: float
    residual_measured: bool
    no_solve_relative_residual: float | None
    system_min_estimate: float | None
    damping: float
    damping_products: int
    nonfinite: bool

    @property
    def worse_than_no_solve(self) -> bool | None:
        """The solve ended further from solving the system than ``x = v`` (``None`` when unknown)."""
        if self.no_solve_relative_residual is None or math.isnan(self.relative_residual):
            return None
        return self.relative_residual > self.no_solve_relative_residual

    @property
    def indefinite(self) -> bool:
        """The solve met a negative curvature or Ritz value: ``A`` is indefinite."""
        return self.system_min_estimate is not None and self.system_min_estimate < 0


def _norm(ts: Sequence[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().square().sum()) for t in ts))


class ImplicitGradient:
    """Implicit-gradient solver for the upper level of BiSSL.

    Args:
        params: the lower backbone parameters ``theta_P`` (tuple of ``T`` tensors); fixes the
            shapes ``v`` must have.
        lam: the lower-level proximal weight; a scalar, or one value per tensor of ``params``.
        damping: added to ``lam``; the system is ``(I + H / (lam_t + damping)) x = v``. With
            ``auto_damping`` it is the floor.
        iters, tol, backend: as in :func:`bissl_fast.solver.cg_solve`.
        method: ``"cg"`` (the paper's) or ``"minres"`` (:func:`bissl_fast.solver.minres_solve`:
            the residual never exceeds that of ``x = 0``, also for an indefinite system).
        layerwise: CG's per-tensor scalars (``None``, the default, means ``True`` for CG: the
            paper's) or global ones; MINRES has only global scalars (``True`` raises).
        measure_residual: spend one more product per solve on the true ``||v - A x||``; ``None``
            (default) does so only for layerwise CG, whose own recursion is not that residual.
        auto_damping: raise ``damping`` per operator until ``I + H / (lam + damping)`` has smallest
            eigenvalue >= ``AUTO_DAMPING_MARGIN`` by a Lanczos estimate of ``lambda_min(H)``
            (``auto_damping_iters`` products on the first solve with each operator). Lanczos
            estimates lie inside the spectrum, so the margin absorbs their error.

    ``solve(op, v)`` averages ``v`` over torch.distributed ranks (one bucketed all-reduce) when a
    multi-rank group is initialized; the operator averages its own products. With the defaults it
    equals :func:`bissl_fast.reference.implicit_grad` (which recomputes every product). Each solve's
    :class:`SolveReport` is kept in ``last_report``, the solver's own info in ``last_info``.
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        lam: float | Sequence[float] = 0.001,
        damping: float = 10.0,
        iters: int = 5,
        layerwise: bool | None = None,
        tol: float | None = None,
        backend: str = "auto",
        method: str = "cg",
        measure_residual: bool | None = None,
        auto_damping: bool = False,
        auto_damping_iters: int = 10,
    ) -> None:
        self.params = check_tensor_tuple("params", params)
        self.damping = check_nonnegative("damping", damping)
        if isinstance(lam, numbers.Real) and not isinstance(lam, bool):
            self.lams = [check_nonnegative("lam", lam)] * len(self.params)
        elif isinstance(lam, (tuple, list)):
            if len(lam) != len(self.params):
                raise ValueError(f"lam must be a scalar or have one value per parameter ({len(self.params)}), got {len(lam)}")
            self.lams = [check_nonnegative(f"lam[{i}]", value) for i, value in enumerate(lam)]
        else:
            raise TypeError(f"lam must be a real number or a sequence of them, got {type(lam).__name__}")
        #: 1 / (lam_t + damping) per tensor (at the configured damping).
        self.scales = tuple(1.0 / check_positive(f"lam[{i}] + damping", l + self.damping) for i, l in enumerate(self.lams))
        self.iters = check_int_at_least("iters", iters, 1)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.method = method
        if layerwise is not None and not isinstance(layerwise, bool):
            raise TypeError(f"layerwise must be a bool or None, got {type(layerwise).__name__}")
        if method == "minres" and layerwise:
            raise ValueError("layerwise applies to CG only: MINRES has one set of scalars for the whole vector")
        self.layerwise = (layerwise is not False) if method == "cg" else False
        if measure_residual is not None and not isinstance(measure_residual, bool):
            raise TypeError(f"measure_residual must be a bool or None, got {type(measure_residual).__name__}")
        self.measure_residual = self.layerwise if measure_residual is None else measure_residual
        if not isinstance(auto_damping, bool):
            raise TypeError(f"auto_damping must be a bool, got {type(auto_damping).__name__}")
        self.auto_damping = auto_damping
        self.auto_damping_iters = check_int_at_least("auto_damping_iters", auto_damping_iters, 2)
        self.tol = None if tol is None else check_positive("tol", tol)
        self.backend = backend
        self.last_info: CGInfo | MINRESInfo | None = None
        self.last_report: SolveReport | None = None
        self._auto: tuple[weakref.ref, float] | None = None

    @property
    def method_name(self) -> str:
        """``"cg-layerwise"``, ``"cg-global"`` or ``"minres"``."""
        if self.method == "minres":
            return "minres"
        return "cg-layerwise" if self.layerwise else "cg-global"

    def _damping_for(self, op: HessianOperator) -> tuple[float, int]:
        """The damping to use with ``op`` and the products spent finding it now (0 when cached)."""
        if not self.auto_damping:
            return self.damping, 0
        if self._auto is not None and self._auto[0]() is op:
            return self._auto[1], 0
        lambda_min = float(lanczos_ritz_values(op, self.auto_damping_iters)[0])
        # 1 + lambda_min / (lam_t + damping) >= margin for every tensor t.
        needed = max(-lambda_min / (1.0 - AUTO_DAMPING_MARGIN) - lam for lam in self.lams)
        damping = max(self.damping, needed)
        self._auto = (weakref.ref(op), damping)
        return damping, self.auto_damping_iters

    def solve(
        self,
        op: HessianOperator,
        v: Sequence[torch.Tensor],
        x0: Sequence[torch.Tensor] | None = None,
        return_info: bool = False,
    ) -> Tensors | tuple[Tensors, CGInfo | MINRESInfo]:
        """``x`` with ``(I + H / (lam + damping)) x = v`` after ``iters`` iterations of the method.

        ``op`` is a :class:`HessianOperator` over the same parameters (or any object with a
        ``matvec`` shaped like ``params``); ``v`` is one tensor per parameter. Returns detached
        tensors shaped like ``params`` (and the solver's :class:`CGInfo` / :class:`MINRESInfo`
        with ``return_info=True``; the latest one is also kept in ``self.last_info``, the
        :class:`SolveReport` in ``self.last_report``).
        """
        if not callable(getattr(op, "matvec", None)):
            raise TypeError(f"op must be a HessianOperator (anything with .matvec), got {type(op).__name__}")
        op_params = getattr(op, "params", None)
        if op_params is not None and (
            len(op_params) != len(self.params) or any(a.shape != b.shape for a, b in zip(op_params, self.params))
        ):
            raise ValueError("op was built for parameters of other shapes than this ImplicitGradient's params")
        v = tuple(t.detach() for t in check_tensor_tuple("v", v, like=self.params))
        if is_distributed():
            v = bucketed_mean(v)
        damping, damping_products = self._damping_for(op)
        scales = tuple(1.0 / (lam + damping) for lam in self.lams)
        no_solve: list[float | None] = []

        def matvec(d: Tensors) -> Tensors:
            hd = op.matvec(d)
            if not no_solve:
                # Without a warm start the first direction is parallel to v, so the residual of
                # x = v, ||v - A v|| / ||v|| = ||H v / c|| / ||v||, comes with this product.
                d_norm = _norm(d) if x0 is None else 0.0
                no_solve.append(_norm([s * h for s, h in zip(scales, hd)]) / d_norm if d_norm > 0 else None)
            return tuple(torch.add(di, hdi, alpha=s) for di, hdi, s in zip(d, hd, scales))

        if self.method == "minres":
            x, info = minres_solve(matvec, v, iters=self.iters, x0=x0, tol=self.tol, return_info=True, backend=self.backend)
            estimate = info.ritz_values[0] if info.ritz_values else None
        else:
            x, info = cg_solve(
                matvec, v, iters=self.iters, layerwise=self.layerwise, x0=x0, tol=self.tol, return_info=True,
                backend=self.backend,
            )
            estimate = min(info.curvatures) if info.curvatures else None
        products = info.iterations + (x0 is not None) + damping_products
        if self.measure_residual:
            ax = matvec(x)
            residual = _norm([vi - a for vi, a in zip(v, ax)]) / info.b_norm if info.b_norm > 0 else 0.0
            products += 1
        elif self.method == "cg" and self.layerwise:
            residual = math.nan
        else:
            residual = info.relative_residuals[-1]
        self.last_info = info
        self.last_report = SolveReport(
            self.method_name, info.iterations, products, residual, self.measure_residual,
            no_solve[0] if no_solve else None, estimate, damping, damping_products, info.nonfinite,
        )
        return (x, info) if return_info else x
