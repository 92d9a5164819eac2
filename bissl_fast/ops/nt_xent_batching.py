"""Batching rules of the NT-Xent ops, for batched Hessian-vector products (docs/design.md §2.1, §2.3).

In a batched product the ``k`` vectors enter the double backward as cotangents ``w [k, N, D]`` (or, in
forward mode, as tangents of ``u``) while ``u`` and ``lse`` stay the same, so the rules hand all ``k`` to
one ``*_batched`` op that computes the softmax once. When ``u`` itself is batched (``torch.func.vmap``
over the loss of ``k`` separate batches) every vector has its own softmax and nothing is shared: the
rules then run the op once per vector.

The ``*_batched`` ops are custom ops of their own (fake kernels for tracing; differentiating them raises,
as differentiating the double backward does), so a rule never exposes kernel internals to autograd.
"""
from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch

from ._batching import batched, broadcast, leading, per_vector, register_batching_rule
from ._registration import define_op


def _accumulation_dtype(u: torch.Tensor) -> torch.dtype:
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _backward_batched_fake(u, lse, c, inv_tau, backend, precision):
    return u.new_empty(c.shape[0], *u.shape)


def _double_backward_batched_fake(u, lse, c, w, inv_tau, backend, precision):
    return torch.empty_like(w), u.new_empty(w.shape[:2], dtype=_accumulation_dtype(u))


def register_batching_rules(kernels: Callable[[str], ModuleType]) -> None:
    """Define the ``*_batched`` ops and register the rules of ``bissl_fast::nt_xent_lse{,_backward,
    _double_backward}``; ``kernels(backend)`` is the module holding a backend's entry points."""

    @define_op("bissl_fast::nt_xent_lse_backward_batched", fake=_backward_batched_fake)
    def _backward_batched(
        u: torch.Tensor, lse: torch.Tensor, c: torch.Tensor, inv_tau: float, backend: str, precision: str
    ) -> torch.Tensor:
        """``nt_xent_lse_backward`` for ``k`` weight vectors ``c [k, N]``: ``[k, N, D]``."""
        return kernels(backend).lse_backward_batched(u, lse, c, inv_tau, precision)

    @define_op("bissl_fast::nt_xent_lse_double_backward_batched", fake=_double_backward_batched_fake)
    def _double_backward_batched(
        u: torch.Tensor, lse: torch.Tensor, c: torch.Tensor, w: torch.Tensor, inv_tau: float, backend: str,
        precision: str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``nt_xent_lse_double_backward`` for ``k`` cotangents ``w [k, N, D]``, weights ``c [N]`` or ``[k, N]``:
        ``(grad_u [k, N, D], r [k, N])``."""
        return kernels(backend).lse_double_backward_batched(u, lse, c, w, inv_tau, precision)

    ops = torch.ops.bissl_fast

    def lse_rule(batch_size, in_dims, u, inv_tau, backend, precision):
        return per_vector(ops.nt_xent_lse.default, batch_size, in_dims, (u, inv_tau, backend, precision))

    def backward_rule(batch_size, in_dims, u, lse, c, inv_tau, backend, precision):
        args = (u, lse, c, inv_tau, backend, precision)
        if batched(in_dims, 0, 1):
            return per_vector(ops.nt_xent_lse_backward.default, batch_size, in_dims, args)
        c = leading(c, in_dims[2]).contiguous()
        return _backward_batched(u, lse, c, inv_tau, backend, precision), 0

    def double_backward_rule(batch_size, in_dims, u, lse, c, w, inv_tau, backend, precision):
        args = (u, lse, c, w, inv_tau, backend, precision)
        if batched(in_dims, 0, 1):
            return per_vector(ops.nt_xent_lse_double_backward.default, batch_size, in_dims, args)
        c = leading(c, in_dims[2]).contiguous()
        w = broadcast(w, in_dims[3], batch_size).contiguous()
        return _double_backward_batched(u, lse, c, w, inv_tau, backend, precision), (0, 0)

    register_batching_rule("bissl_fast::nt_xent_lse", lse_rule)
    register_batching_rule("bissl_fast::nt_xent_lse_backward", backward_rule)
    register_batching_rule("bissl_fast::nt_xent_lse_double_backward", double_backward_rule)
