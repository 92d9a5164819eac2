"""BYOL's target network: an exponential moving average (EMA) of online modules' parameters."""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from .._validation import check_nonnegative

#: The BYOL paper's (and BiSSL's) target decay.
BYOL_MOMENTUM = 0.9995


def _as_modules(name: str, modules: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    found = [modules] if isinstance(modules, nn.Module) else list(modules)
    if not found or not all(isinstance(m, nn.Module) for m in found):
        raise TypeError(f"{name} must be an nn.Module or a non-empty sequence of them")
    return found


class EMATarget:
    """Target modules whose parameters track the online ones: ``t <- m * t + (1 - m) * o``.

    Args:
        online: the online module(s) (e.g. ``[backbone, projector]``; BYOL's predictor has no target).
        target: module(s) of the same architectures; deep copies of ``online`` when omitted.
            Their parameters are set to ``requires_grad=False``.
        momentum: the decay ``m`` in ``[0, 1]`` (BYOL's and BiSSL's 0.9995 by default).

    Only parameters are averaged; buffers (BatchNorm running statistics) stay the target's own,
    updated by its forward passes in train mode. ``update()`` after every online optimizer step;
    ``modules`` are the targets to run forward (under ``torch.no_grad()``).
    """

    def __init__(
        self,
        online: nn.Module | Sequence[nn.Module],
        target: nn.Module | Sequence[nn.Module] | None = None,
        momentum: float = BYOL_MOMENTUM,
    ) -> None:
        self.online = _as_modules("online", online)
        self.modules = [copy.deepcopy(m) for m in self.online] if target is None else _as_modules("target", target)
        if len(self.modules) != len(self.online):
            raise ValueError(f"target has {len(self.modules)} modules, online {len(self.online)}")
        self.momentum = self._check_momentum(momentum)
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        for i, (t_mod, o_mod) in enumerate(zip(self.modules, self.online)):
            t_params, o_params = list(t_mod.parameters()), list(o_mod.parameters())
            if len(t_params) != len(o_params) or any(t.shape != o.shape for t, o in zip(t_params, o_params)):
                raise ValueError(f"target module {i} does not have the parameter shapes of online module {i}")
            self._pairs.extend(zip(t_params, o_params))
        for t, _ in self._pairs:
            t.requires_grad_(False)

    @staticmethod
    def _check_momentum(momentum: float) -> float:
        m = check_nonnegative("momentum", momentum)
        if m > 1:
            raise ValueError(f"momentum must be in [0, 1], got {m}")
        return m

    @torch.no_grad()
    def update(self, momentum: float | None = None) -> None:
        """One EMA step with ``momentum`` (default: ``self.momentum``; pass a scheduled value to vary it)."""
        m = self.momentum if momentum is None else self._check_momentum(momentum)
        for t, o in self._pairs:
            t.mul_(m).add_(o.detach(), alpha=1 - m)

    @torch.no_grad()
    def reset(self) -> None:
        """Copy the online parameters into the target (BiSSL re-initializes the target to the online network)."""
        for t, o in self._pairs:
            t.copy_(o.detach())

    def train(self, mode: bool = True) -> None:
        for m in self.modules:
            m.train(mode)


__all__ = ["BYOL_MOMENTUM", "EMATarget"]
