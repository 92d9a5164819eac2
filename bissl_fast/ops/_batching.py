"""Batching rules of the custom ops: one rule per op serves ``torch.func.vmap`` and ``is_grads_batched``.

A batched Hessian-vector product (``HessianOperator.matmat``, ``torch.autograd.grad(...,
is_grads_batched=True)``, ``torch.func.vmap`` of a ``jvp``) runs every op of the double backward under
a vmap. An op without a batching rule is then run once per vector by PyTorch's fallback (silently, unless
``torch._C._debug_only_display_vmap_fallback_warnings(True)``), so the fused ops' per-tangent-independent
work (softmax tiles, per-channel sums, row norms) would be redone ``k`` times (docs/design.md §2.3).

PyTorch has two vmaps: ``torch.func.vmap`` (functorch, the ``FuncTorchBatched`` dispatch key; what
``torch.library.register_vmap`` registers for) and the older prototype behind
``torch.autograd.grad(..., is_grads_batched=True)`` and ``gradcheck(check_batched_grad=True)`` (the
``Batched`` key). :func:`register_batching_rule` installs one rule for both.

A rule has ``torch.library.register_vmap``'s calling convention with the batch size in place of ``info``:
``rule(batch_size, in_dims, *args) -> (outputs, out_dims)``, where ``in_dims[i]`` is the batched
dimension of ``args[i]`` (None: not batched) and ``out_dims`` gives the same for each output.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ._registration import library

Rule = Callable[..., tuple[Any, Any]]


def register_batching_rule(qualname: str, rule: Rule) -> None:
    """Register ``rule`` as the batching rule of ``qualname`` under both vmaps."""
    namespace, name = qualname.split("::")
    lib = library(namespace)
    torch.library.register_vmap(qualname, lambda info, in_dims, *args: rule(info.batch_size, in_dims, *args), lib=lib)
    lib.impl(name, _prototype_vmap_kernel(qualname, rule), "Batched")


def _current_prototype_level() -> int:
    # The prototype vmap keeps only a nesting counter; incrementing it returns the new level.
    level = torch._C._vmapmode_increment_nesting() - 1
    torch._C._vmapmode_decrement_nesting()
    return level


def _prototype_vmap_kernel(qualname: str, rule: Rule) -> Callable[..., Any]:
    """The ``Batched``-key kernel: unwraps the arguments batched at the innermost level, runs ``rule`` one
    level out (so a nested vmap unwraps its own level the same way), and wraps the outputs again."""

    def kernel(*args: Any) -> Any:
        level = _current_prototype_level()
        physical, in_dims, batch_size = [], [], None
        for arg in args:
            if isinstance(arg, Tensor) and torch._C._functorch.is_legacy_batchedtensor(arg):
                # Batch size 0 marks a tensor that is not batched at this level (it is then expanded to size 0).
                unwrapped = torch._remove_batch_dim(arg, level, 0, 0)
                if unwrapped.shape[0] > 0:
                    physical.append(unwrapped)
                    in_dims.append(0)
                    batch_size = unwrapped.shape[0]
                    continue
            physical.append(arg)
            in_dims.append(None)
        if batch_size is None:
            raise RuntimeError(f"{qualname}: the batched kernel was called without a batched argument")
        torch._C._vmapmode_decrement_nesting()
        try:
            outputs, out_dims = rule(batch_size, tuple(in_dims), *physical)
        finally:
            torch._C._vmapmode_increment_nesting()
        if isinstance(outputs, Tensor):
            return _wrap(outputs, out_dims, level)
        return tuple(_wrap(o, d, level) for o, d in zip(outputs, out_dims))

    return kernel


def _wrap(output: Tensor, out_dim: int | None, level: int) -> Tensor:
    return output if out_dim is None else torch._add_batch_dim(output, out_dim, level)


# ------------------------------------------------------------------------------ helpers for rules


def leading(t: Tensor | None, dim: int | None) -> Tensor | None:
    """``t`` with its batched dimension moved to the front (unbatched tensors and None unchanged)."""
    return t if t is None or dim is None else t.movedim(dim, 0)


def broadcast(t: Tensor, dim: int | None, batch_size: int) -> Tensor:
    """``t`` as ``[batch_size, *shape]``: the batched dimension first, or an unbatched tensor expanded."""
    return t.movedim(dim, 0) if dim is not None else t.expand(batch_size, *t.shape)


def batched(in_dims: Sequence[int | None], *positions: int) -> bool:
    """Whether any argument at ``positions`` is batched."""
    return any(in_dims[i] is not None for i in positions)


def per_vector(op: Callable[..., Any], batch_size: int, in_dims: Sequence[int | None], args: Sequence[Any]) -> tuple:
    """``op`` once per vector, outputs stacked along dimension 0: for arguments that share no work across
    the vectors (e.g. every vector has its own embeddings, so its own softmax); each call is one kernel."""
    results = []
    for j in range(batch_size):
        results.append(op(*(a if d is None else a.select(d, j) for a, d in zip(args, in_dims))))
    if isinstance(results[0], Tensor):
        return torch.stack(results), 0
    outputs = tuple(torch.stack(parts) for parts in zip(*results))
    return outputs, (0,) * len(outputs)
