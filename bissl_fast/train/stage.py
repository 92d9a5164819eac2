"""Pieces of one BiSSL stage (docs/design.md §2.4): its log entry, the implicit-gradient solver of an
upper stage, and the guard that keeps the lower model's buffers unchanged during it."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from torch import nn

from .. import reference

if TYPE_CHECKING:
    from ..solver import SolveReport
    from .config import BiSSLConfig

Tensors = tuple[torch.Tensor, ...]


@dataclass
class StageLog:
    """Summary of one BiSSL stage (what :meth:`BiSSLTrainer.train_stage` returns and logs).

    ``lower_loss`` / ``upper_loss`` are means of the per-step ``lower_losses`` / ``upper_losses``
    (the upper one is ``L_D`` through the upper backbone; ``None`` for a level with 0 steps).
    ``hvp_per_s`` counts Hessian products per second of the upper stage (``hessian_products`` of
    them); ``lower_batch_size`` is per rank. Item access (``log["lower_loss"]``) and
    :meth:`as_dict` serve code that treats entries as dicts.

    Solve quality (docs/design.md §2.3; :class:`bissl_fast.solver.SolveReport` per upper step; empty
    lists and ``None`` for ``solver="recompute"``, whose reference loop reports nothing):
    ``solve_residuals`` holds ``||v - A x|| / ||v||`` of each upper step's implicit gradient
    (``A = I + H / (lam + damping)``) and ``no_solve_residuals`` that of ``x = v``;
    ``solves_worse`` counts the solves that ended further from solving the system than no solve;
    ``system_min_estimate`` is the smallest upper bound on ``lambda_min(A)`` the solves met (CG's
    curvature or MINRES's Ritz value): negative means ``A`` was indefinite (``indefinite``);
    ``damping`` is the damping used (``auto_damping`` raises it).
    """

    stage: int
    lower_loss: float | None
    lower_losses: list[float]
    upper_loss: float | None
    upper_losses: list[float]
    lower_time_s: float
    upper_time_s: float
    lower_steps_per_s: float
    upper_steps_per_s: float
    hvp_per_s: float
    lower_batch_size: int
    solve_method: str = ""
    solve_residuals: list[float] = field(default_factory=list)
    no_solve_residuals: list[float | None] = field(default_factory=list)
    solves_worse: int = 0
    system_min_estimate: float | None = None
    indefinite: bool | None = None
    damping: float | None = None
    hessian_products: int = 0

    def __getitem__(self, key: str) -> Any:
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def keys(self) -> list[str]:
        return [f.name for f in fields(self)]

    def items(self) -> list[tuple[str, Any]]:
        return [(k, getattr(self, k)) for k in self.keys()]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, entry: dict[str, Any]) -> StageLog:
        """An entry of :meth:`as_dict`; logs saved before solve quality was recorded held the CG
        recursion's residuals instead, which are dropped (they were not ``||v - A x||``)."""
        entry = {k: v for k, v in entry.items() if k != "cg_relative_residuals"}
        return cls(**entry)


def solve_method_name(config: BiSSLConfig) -> str:
    """``"cg-layerwise"``, ``"cg-global"`` or ``"minres"``."""
    if config.solve_method == "minres":
        return "minres"
    return "cg-layerwise" if config.cg_layerwise else "cg-global"


def solve_quality(reports: list[SolveReport], config: BiSSLConfig) -> dict[str, Any]:
    """The solve-quality fields of a :class:`StageLog` from the upper stage's solve reports."""
    products = sum(r.products for r in reports) if reports else config.upper_iters * config.cg_iters
    if not reports:
        return {"solve_method": solve_method_name(config), "hessian_products": products}
    estimates = [r.system_min_estimate for r in reports if r.system_min_estimate is not None]
    return {
        "solve_method": solve_method_name(config),
        "solve_residuals": [r.relative_residual for r in reports],
        "no_solve_residuals": [r.no_solve_relative_residual for r in reports],
        "solves_worse": sum(bool(r.worse_than_no_solve) for r in reports),
        "system_min_estimate": min(estimates) if estimates else None,
        "indefinite": any(r.indefinite for r in reports),
        "damping": reports[-1].damping,
        "hessian_products": products,
    }


@contextmanager
def implicit_solver(
    loss_fn: Callable[[], torch.Tensor], params: Tensors, config: BiSSLConfig, reports: list[SolveReport]
) -> Iterator[Callable[[Tensors], Tensors]]:
    """``solve(v)`` of the IJ system ``(I + H/(lam + damping)) x = v`` for one upper stage.

    ``"reuse"`` builds one :class:`~bissl_fast.solver.HessianOperator` for the whole stage, appends
    each solve's :class:`~bissl_fast.solver.SolveReport` to ``reports`` and releases the operator's
    graph on exit; ``"recompute"`` is the paper-style reference (no reports: it does not measure).
    """
    cfg = config
    if cfg.solver == "recompute" and not isinstance(cfg.lam, tuple):
        def solve_recompute(v: Tensors) -> Tensors:
            return reference.implicit_grad(
                loss_fn, params, v, cfg.lam, cfg.damping, cfg.cg_iters, cfg.cg_layerwise, cfg.solve_method
            )

        yield solve_recompute
        return
    if cfg.solver == "recompute":
        # The reference's recompute loop with one 1/(lam_t + damping) per tensor.
        scales = [1.0 / (lam + cfg.damping) for lam in cfg.lam]

        def solve_recompute_per_tensor(v: Tensors) -> Tensors:
            v = reference.average_over_ranks([t.detach() for t in v])

            def matvec(d: Tensors) -> Tensors:
                hd = reference.average_over_ranks(reference.hvp(loss_fn, params, d))
                return tuple(di + scale * hdi for di, hdi, scale in zip(d, hd, scales))

            if cfg.solve_method == "minres":
                return reference.minres_solve(matvec, v, iters=cfg.cg_iters)
            return reference.cg_solve(matvec, v, iters=cfg.cg_iters, layerwise=cfg.cg_layerwise)

        yield solve_recompute_per_tensor
        return

    from ..solver import HessianOperator, ImplicitGradient

    # Reverse-over-reverse on the retained graph: the fused losses are autograd.Functions
    # without torch.func support, which the operator's forward-over-reverse mode needs.
    op = HessianOperator(loss_fn, params, mode="rev-rev")
    ig = ImplicitGradient(
        params, lam=cfg.lam, damping=cfg.damping, iters=cfg.cg_iters, layerwise=cfg.layerwise,
        method=cfg.solve_method, measure_residual=cfg.measure_residual, auto_damping=cfg.auto_damping,
    )

    def solve_reuse(v: Tensors) -> Tensors:
        x = ig.solve(op, v)
        reports.append(ig.last_report)
        return x

    try:
        yield solve_reuse
    finally:
        op.release()


class FrozenBuffers:
    """Restores the buffers (BatchNorm running stats) of the given modules on exit.

    The upper stage runs the lower model (for ``v``, for every recomputed Hessian product) and the
    BYOL target (for the fixed batch's targets) forward, but must change neither: only lower
    steps do.
    """

    def __init__(self, *modules: nn.Module | None) -> None:
        self.modules = [m for m in modules if m is not None]

    def __enter__(self) -> None:
        self.saved = [(b, b.detach().clone()) for m in self.modules for b in m.buffers()]

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for b, saved in self.saved:
                b.copy_(saved)


__all__ = ["FrozenBuffers", "StageLog", "implicit_solver", "solve_method_name", "solve_quality"]
