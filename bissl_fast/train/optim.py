"""The paper's optimizers and schedules (docs/design.md §2.5): LARS, linear warm-up + cosine to a floor.

:class:`LARS` is the variant the paper's scripts apply to every parameter (biases and BatchNorm
included): per tensor,

    d = grad + weight_decay * p
    d = d * (eta * ||p|| / ||d||)      (when both norms are > 0; else d unchanged)
    mu = momentum * mu + d
    p = p - lr * mu

:class:`WarmupCosine` is the multiplier of :func:`warmup_cosine_factor` for
``torch.optim.lr_scheduler.LambdaLR``, stepped once per optimizer step; :func:`warmup_cosine`
builds that scheduler.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

from .._validation import check_int_at_least, check_nonnegative, check_positive


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling with momentum, on every parameter (see the module docstring).

    Args:
        params: parameters or parameter groups.
        lr: learning rate (> 0). weight_decay: L2 coefficient added to the gradient (>= 0).
        momentum: heavy-ball coefficient in ``[0, 1)``. eta: trust coefficient (> 0).
    """

    def __init__(self, params: Iterable, lr: float, weight_decay: float = 0.0, momentum: float = 0.9, eta: float = 1e-3) -> None:
        check_positive("lr", lr)
        check_nonnegative("weight_decay", weight_decay)
        if not 0 <= check_nonnegative("momentum", momentum) < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        check_positive("eta", eta)
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] != 0 else p.grad.clone()
                p_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                trust = torch.where((p_norm > 0) & (d_norm > 0), group["eta"] * p_norm / d_norm, torch.ones_like(p_norm))
                d.mul_(trust)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                state["mu"].mul_(group["momentum"]).add_(d)
                p.add_(state["mu"], alpha=-group["lr"])
        return loss


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, floor: float = 1e-3) -> float:
    """LR multiplier for optimizer step ``step`` (0-based) of ``total_steps``.

    With ``s = step + 1``: ``s / warmup_steps`` while ``s < warmup_steps``, then
    ``floor + (1 - floor) * (1 + cos(pi * (s - warmup_steps) / (total_steps - warmup_steps))) / 2``,
    so the last step runs at ``floor`` times the base rate (the paper's schedule: its floor is
    ``0.001``). Progress past ``total_steps`` stays at ``floor``.
    """
    s = step + 1
    if s < warmup_steps:
        return s / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min(max((s - warmup_steps) / span, 0.0), 1.0)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class WarmupCosine:
    """Picklable ``LambdaLR`` multiplier: ``WarmupCosine(w, T, floor)(step) == warmup_cosine_factor(step, w, T, floor)``."""

    def __init__(self, warmup_steps: int, total_steps: int, floor: float = 1e-3) -> None:
        self.warmup_steps = check_int_at_least("warmup_steps", warmup_steps, 0)
        self.total_steps = check_int_at_least("total_steps", total_steps, 1)
        self.floor = check_nonnegative("floor", floor)
        if self.floor > 1:
            raise ValueError(f"floor is a fraction of the base lr in [0, 1], got {floor}")

    def __call__(self, step: int) -> float:
        return warmup_cosine_factor(step, self.warmup_steps, self.total_steps, self.floor)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, floor: float = 1e-3) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine to ``floor * lr`` over ``total_steps`` optimizer steps (call ``step()`` after each)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup_steps, total_steps, floor))


__all__ = ["LARS", "WarmupCosine", "warmup_cosine", "warmup_cosine_factor"]
