"""Pieces of one BiSSL stage (docs/design.md §2.4): its log entry, the implicit-gradient solver of an
upper stage, and the guard that keeps the lower model's buffers unchanged during it."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from torch import nn

from .. import reference

if TYPE_CHECKING:
    from .config import BiSSLConfig

Tensors = tuple[torch.Tensor, ...]


@dataclass
class StageLog:
    """Summary of one BiSSL stage (what :meth:`BiSSLTrainer.train_stage` returns and logs).

    ``lower_loss`` / ``upper_loss`` are means of the per-step ``lower_losses`` / ``upper_losses``
    (the upper one is ``L_D`` through the upper backbone; ``None`` for a level with 0 steps).
    ``cg_relative_residuals`` holds the final ``||r|| / ||v||`` of each upper step's CG (empty for
    ``solver="recompute"``, whose reference does not report it). ``hvp_per_s`` counts Hessian
    products per second of the upper stage; ``lower_batch_size`` is per rank. Item access
    (``log["lower_loss"]``) and :meth:`as_dict` serve code that treats entries as dicts.
    """

    stage: int
    lower_loss: float | None
    lower_losses: list[float]
    upper_loss: float | None
    upper_losses: list[float]
    cg_relative_residuals: list[float]
    lower_time_s: float
    upper_time_s: float
    lower_steps_per_s: float
    upper_steps_per_s: float
    hvp_per_s: float
    lower_batch_size: int

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


@contextmanager
def implicit_solver(
    loss_fn: Callable[[], torch.Tensor], params: Tensors, config: BiSSLConfig, residuals: list[float]
) -> Iterator[Callable[[Tensors], Tensors]]:
    """``solve(v)`` of the IJ system ``(I + H/(lam + damping)) x = v`` for one upper stage.

    ``"reuse"`` builds one :class:`~bissl_fast.solver.HessianOperator` for the whole stage, appends
    each solve's final relative CG residual to ``residuals`` and releases the operator's graph on
    exit; ``"recompute"`` is the paper-style reference (no residuals: it does not report them).
    """
    cfg = config
    if cfg.solver == "recompute" and not isinstance(cfg.lam, tuple):
        def solve_recompute(v: Tensors) -> Tensors:
            return reference.implicit_grad(loss_fn, params, v, cfg.lam, cfg.damping, cfg.cg_iters, cfg.layerwise)

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

            return reference.cg_solve(matvec, v, iters=cfg.cg_iters, layerwise=cfg.layerwise)

        yield solve_recompute_per_tensor
        return

    from ..solver import HessianOperator, ImplicitGradient

    # Reverse-over-reverse on the retained graph: the fused losses are autograd.Functions
    # without torch.func support, which the operator's forward-over-reverse mode needs.
    op = HessianOperator(loss_fn, params, mode="rev-rev")
    ig = ImplicitGradient(params, lam=cfg.lam, damping=cfg.damping, iters=cfg.cg_iters, layerwise=cfg.layerwise)

    def solve_reuse(v: Tensors) -> Tensors:
        x, info = ig.solve(op, v, return_info=True)
        residuals.append(info.relative_residuals[-1])
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


__all__ = ["FrozenBuffers", "StageLog", "implicit_solver"]
