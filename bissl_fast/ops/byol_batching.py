"""Batching rules of the BYOL row ops, for batched Hessian-vector products (docs/design.md §2.2, §2.3).

The rows of the BYOL ops are independent, so ``k`` batched calls are one call on ``k*B`` rows: that is
the rule whenever the rows themselves differ between the vectors (e.g. ``torch.func.vmap`` over the
loss of ``k`` batches), with the results bit for bit those of ``k`` calls. In a batched product only the
cotangents ``wp, wt`` of the double backward carry the ``k`` vectors while ``grad, p, t`` stay the same;
there ``byol_hvp`` goes to a batched kernel that reduces each row's norms once for all ``k``.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._batching import batched, broadcast, register_batching_rule


def _rows(t: Tensor, dim: int | None, k: int) -> Tensor:
    """``[k * B, *rest]``: the ``k`` vectors' rows one after another (an unbatched ``t`` repeated)."""
    full = broadcast(t, dim, k)
    return full.reshape(-1, *full.shape[2:])


def _unrows(out: Tensor, k: int) -> tuple[Tensor, int | None]:
    """An output on ``k * B`` rows as ``[k, B, *rest]`` (out dim 0); the empty ``dt`` stays unbatched."""
    if out.numel() == 0 and out.dim() == 1:
        return out, None
    return out.view(k, -1, *out.shape[1:]), 0


def _on_rows(op: Callable[..., Any], k: int, in_dims, args) -> tuple[Any, Any]:
    """``op`` once on the ``k * B`` rows of every tensor argument; non-tensor arguments pass through."""
    flat = [_rows(a, d, k) if isinstance(a, Tensor) else a for a, d in zip(args, in_dims)]
    result = op(*flat)
    if isinstance(result, Tensor):
        return _unrows(result, k)
    outputs, dims = zip(*(_unrows(o, k) for o in result))
    return tuple(outputs), tuple(dims)


def register_batching_rules(name: str, fwd: Callable, bwd: Callable, hvp: Callable, hvp_batched: Callable) -> None:
    """Rules of ``bissl_fast::{name}_fwd/bwd/hvp``; ``hvp_batched(grad, p, t, wp [k,B,D], wt?, t_grad)`` is the
    op that shares the row norms."""

    def fwd_rule(k, in_dims, p, t):
        return _on_rows(fwd, k, in_dims, (p, t))

    def bwd_rule(k, in_dims, grad, p, t, t_grad):
        return _on_rows(bwd, k, in_dims, (grad, p, t, t_grad))

    def hvp_rule(k, in_dims, grad, p, t, wp, wt, t_grad):
        if batched(in_dims, 0, 1, 2):
            return _on_rows(hvp, k, in_dims, (grad, p, t, wp, wt, t_grad))
        wp = broadcast(wp, in_dims[3], k).contiguous()
        wt = None if wt is None else broadcast(wt, in_dims[4], k).contiguous()
        dgrad, dp, dt = hvp_batched(grad, p, t, wp, wt, t_grad)
        return (dgrad, dp, dt), (0, 0, 0 if t_grad else None)

    register_batching_rule(f"bissl_fast::{name}_fwd", fwd_rule)
    register_batching_rule(f"bissl_fast::{name}_bwd", bwd_rule)
    register_batching_rule(f"bissl_fast::{name}_hvp", hvp_rule)


def batched_hvp_fake(grad: Tensor, p: Tensor, t: Tensor, wp: Tensor, wt: Tensor | None,
                     t_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Shapes of ``byol_hvp_batched``: ``([k, B], [k, B, D], [k, B, D] or [0])``."""
    k = wp.shape[0]
    return p.new_empty(k, p.shape[0]), wp.new_empty(wp.shape), (wp.new_empty(wp.shape) if t_grad else p.new_empty(0))


def register_batched_hvp(qualname: str) -> None:
    """Fake kernel and autograd of the extension's ``byol_hvp_batched`` (a batching rule's kernel; like
    ``byol_hvp``, it is not differentiable)."""

    def backward(ctx, *grads):
        raise NotImplementedError(f"{qualname} is not differentiable (third derivatives of the BYOL loss)")

    torch.library.register_fake(qualname, batched_hvp_fake)
    torch.library.register_autograd(qualname, backward, setup_context=lambda ctx, inputs, output: None)
