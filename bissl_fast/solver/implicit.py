"""The BiSSL implicit gradient: solve ``(I + H / (lam + damping)) x = v`` with CG (docs/design.md §2.3)."""
from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

from .._types import Tensors
from .._validation import (
    check_int_at_least,
    check_nonnegative,
    check_positive,
    check_tensor_tuple,
)
from .._dist import bucketed_mean, is_distributed
from .cg import CGInfo, cg_solve
from .hessian import HessianOperator


class ImplicitGradient:
    """Implicit-gradient solver for the upper level of BiSSL.

    Args:
        params: the lower backbone parameters ``theta_P`` (tuple of ``T`` tensors); fixes the
            shapes ``v`` must have.
        lam: the lower-level proximal weight; a scalar, or one value per tensor of ``params``.
        damping: added to ``lam``; the system is ``(I + H / (lam_t + damping)) x = v``.
        iters, layerwise, tol, backend: as in :func:`bissl_fast.solver.cg_solve`.

    ``solve(op, v)`` averages ``v`` over torch.distributed ranks (one bucketed all-reduce) when a
    multi-rank group is initialized; the operator averages its own products. With the defaults it
    equals :func:`bissl_fast.reference.implicit_grad` (which recomputes every product).
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        lam: float | Sequence[float] = 0.001,
        damping: float = 10.0,
        iters: int = 5,
        layerwise: bool = True,
        tol: float | None = None,
        backend: str = "auto",
    ) -> None:
        self.params = check_tensor_tuple("params", params)
        damping = check_nonnegative("damping", damping)
        if isinstance(lam, numbers.Real) and not isinstance(lam, bool):
            lams = [check_nonnegative("lam", lam)] * len(self.params)
        elif isinstance(lam, (tuple, list)):
            if len(lam) != len(self.params):
                raise ValueError(f"lam must be a scalar or have one value per parameter ({len(self.params)}), got {len(lam)}")
            lams = [check_nonnegative(f"lam[{i}]", value) for i, value in enumerate(lam)]
        else:
            raise TypeError(f"lam must be a real number or a sequence of them, got {type(lam).__name__}")
        #: 1 / (lam_t + damping) per tensor.
        self.scales = tuple(1.0 / check_positive(f"lam[{i}] + damping", l + damping) for i, l in enumerate(lams))
        self.iters = check_int_at_least("iters", iters, 1)
        if not isinstance(layerwise, bool):
            raise TypeError(f"layerwise must be a bool, got {type(layerwise).__name__}")
        self.layerwise = layerwise
        self.tol = None if tol is None else check_positive("tol", tol)
        self.backend = backend
        self.last_info: CGInfo | None = None

    def solve(
        self,
        op: HessianOperator,
        v: Sequence[torch.Tensor],
        x0: Sequence[torch.Tensor] | None = None,
        return_info: bool = False,
    ) -> Tensors | tuple[Tensors, CGInfo]:
        """``x`` with ``(I + H / (lam + damping)) x = v`` after ``iters`` CG iterations.

        ``op`` is a :class:`HessianOperator` over the same parameters (or any object with a
        ``matvec`` shaped like ``params``); ``v`` is one tensor per parameter. Returns detached
        tensors shaped like ``params`` (and the :class:`CGInfo` with ``return_info=True``; the
        latest one is also kept in ``self.last_info``).
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
        scales = self.scales

        def matvec(d: Tensors) -> Tensors:
            hd = op.matvec(d)
            return tuple(torch.add(di, hdi, alpha=s) for di, hdi, s in zip(d, hd, scales))

        x, info = cg_solve(
            matvec, v, iters=self.iters, layerwise=self.layerwise, x0=x0, tol=self.tol,
            return_info=True, backend=self.backend,
        )
        self.last_info = info
        return (x, info) if return_info else x
