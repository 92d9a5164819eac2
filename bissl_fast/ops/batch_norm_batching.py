"""Batching rules of the fused BatchNorm ops, for batched Hessian-vector products (docs/design.md §2.3).

In a batched product the ``k`` vectors reach a BatchNorm layer as ``grad_out`` of ``batch_norm_bwd`` (the
forward's backward) and as the cotangents ``ggI, ggW, ggB`` of ``batch_norm_dbwd``, while the input, the
weight and the statistics stay the same: those calls go to the ``*_batched`` kernels, which finish each
channel block for every vector while its input is in cache and reduce the cotangent-free sums of the
double backward once. Otherwise (the input itself batched: ``k`` separate normalizations) the vectors
become ``k`` times the channels of one call, ``[N, k*C, *]``, whose outputs are views of the result.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._batching import batched, broadcast, register_batching_rule


def _fold(t: Tensor | None, dim: int | None, k: int) -> Tensor | None:
    """``[N, C, *]`` batched over ``k`` as ``[N, k*C, *]`` (vector-major channels); ``[C]`` as ``[k*C]``."""
    if t is None:
        return None
    full = broadcast(t, dim, k)
    if full.dim() == 2:
        return full.reshape(-1)
    return full.movedim(0, 1).reshape(full.shape[1], -1, *full.shape[3:])


def _unfold(out: Tensor, k: int) -> tuple[Tensor, int | None]:
    """The inverse of :func:`_fold` on an output, as a view with its out dim; empty outputs stay unbatched."""
    if out.numel() == 0 and out.dim() == 1:
        return out, None
    if out.dim() == 1:
        return out.view(k, -1), 0
    return out.view(out.shape[0], k, -1, *out.shape[2:]), 1


def _folded(op, k: int, in_dims, args) -> tuple[tuple, tuple]:
    result = op(*(_fold(a, d, k) if isinstance(a, Tensor) else a for a, d in zip(args, in_dims)))
    outputs, dims = zip(*(_unfold(o, k) for o in result))
    return tuple(outputs), tuple(dims)


def _leading(outputs: tuple[Tensor, ...]) -> tuple[tuple[Tensor, ...], tuple[int | None, ...]]:
    """Out dims of a batched kernel's outputs: 0, or None for an output left out by ``output_mask``."""
    return outputs, tuple(None if o.numel() == 0 and o.dim() == 1 else 0 for o in outputs)


def register_batching_rules() -> None:
    """Rules of ``bissl_fast::batch_norm_{fwd,bwd,dbwd}`` (the extension must be loaded)."""
    ops = torch.ops.bissl_fast

    def fwd_rule(k, in_dims, input, weight, bias, running_mean, running_var, training, momentum, eps):
        args = (input, weight, bias, running_mean, running_var, training, momentum, eps)
        return _folded(ops.batch_norm_fwd.default, k, in_dims, args)

    def bwd_rule(k, in_dims, grad_out, input, weight, save_mean, save_invstd, training, output_mask):
        args = (grad_out, input, weight, save_mean, save_invstd, training, output_mask)
        if batched(in_dims, 1, 2, 3, 4):
            return _folded(ops.batch_norm_bwd.default, k, in_dims, args)
        grad_out = broadcast(grad_out, in_dims[0], k)
        return _leading(ops.batch_norm_bwd_batched.default(grad_out, *args[1:]))

    def dbwd_rule(k, in_dims, ggi, ggw, ggb, grad_out, input, weight, save_mean, save_invstd, training, output_mask):
        args = (ggi, ggw, ggb, grad_out, input, weight, save_mean, save_invstd, training, output_mask)
        if batched(in_dims, 3, 4, 5, 6, 7):
            return _folded(ops.batch_norm_dbwd.default, k, in_dims, args)
        cotangents = (None if t is None else broadcast(t, d, k) for t, d in zip(args[:3], in_dims[:3]))
        return _leading(ops.batch_norm_dbwd_batched.default(*cotangents, *args[3:]))

    register_batching_rule("bissl_fast::batch_norm_fwd", fwd_rule)
    register_batching_rule("bissl_fast::batch_norm_bwd", bwd_rule)
    register_batching_rule("bissl_fast::batch_norm_dbwd", dbwd_rule)


def _param_dtype(input: Tensor, weight: Tensor | None) -> torch.dtype:
    return weight.dtype if weight is not None else input.dtype


def _acc_dtype(input: Tensor) -> torch.dtype:
    return torch.float64 if input.dtype == torch.float64 else torch.float32


def _batch_like(wanted: bool, k: int, input: Tensor) -> Tensor:
    return input.new_empty(k, *input.shape) if wanted else input.new_empty(0)


def _fake_bwd_batched(grad_out, input, weight, save_mean, save_invstd, training, output_mask):
    k, c, pd = grad_out.shape[0], input.shape[1], _param_dtype(input, weight)
    return (
        _batch_like(output_mask[0], k, input),
        input.new_empty((k, c) if output_mask[1] else (0,), dtype=pd),
        input.new_empty((k, c) if output_mask[2] else (0,), dtype=pd),
    )


def _fake_dbwd_batched(ggi, ggw, ggb, grad_out, input, weight, save_mean, save_invstd, training, output_mask):
    k = next(t.shape[0] for t in (ggi, ggw, ggb) if t is not None)
    c, pd = input.shape[1], _param_dtype(input, weight)
    return (
        _batch_like(output_mask[0], k, input),
        _batch_like(output_mask[1], k, input),
        input.new_empty((k, c) if output_mask[2] else (0,), dtype=pd),
    )


def register_batched_ops() -> None:
    """Fake kernels and autograd of the extension's ``batch_norm_{bwd,dbwd}_batched`` (kernels of the batching
    rules; not differentiable: a batched product differentiates twice, they are its second derivative)."""
    for name, fake in (("batch_norm_bwd_batched", _fake_bwd_batched), ("batch_norm_dbwd_batched", _fake_dbwd_batched)):
        qualname = f"bissl_fast::{name}"

        def backward(ctx, *grads, qualname=qualname):
            raise NotImplementedError(f"{qualname} is not differentiable (a batching rule's kernel)")

        torch.library.register_fake(qualname, fake)
        torch.library.register_autograd(qualname, backward, setup_context=lambda ctx, inputs, output: None)
