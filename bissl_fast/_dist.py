"""torch.distributed helpers shared by the losses, the solver and the trainer.

Every function here is a no-op (or returns the single-process answer) when no process group is
initialized, so single-process code calls them unconditionally.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a process group with more than one rank is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Ranks in the initialized process group, 1 without one."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank, 0 without a process group."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def bucketed_mean(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Mean over ranks of every tensor, with ONE all-reduce for the whole list.

    The tensors are flattened into a single buffer per dtype (``torch.cat``, one copy), reduced,
    divided by the world size and split back into new tensors shaped like the inputs. The
    inputs are not modified. Without an initialized multi-rank group the inputs are returned.
    """
    tensors = tuple(tensors)
    if not is_distributed() or not tensors:
        return tensors
    world = dist.get_world_size()
    out: list[torch.Tensor | None] = [None] * len(tensors)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    # One bucket per dtype; parameters of one model share a dtype, so this is one all-reduce.
    for idx in by_dtype.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in idx])
        dist.all_reduce(flat)
        flat.div_(world)
        for i, piece in zip(idx, flat.split([tensors[i].numel() for i in idx])):
            out[i] = piece.view(tensors[i].shape)
    return tuple(out)  # type: ignore[arg-type]


class _GatherViews(torch.autograd.Function):
    """Local view-major ``[m*b, D]`` -> global view-major ``[m*W*b, D]``: view ``k`` of the result
    is ``[rank0 view k; rank1 view k; ...]``, so positives ``(i + k*W*b) mod N`` stay aligned.

    The adjoint is "all-reduce-sum, then take this rank's rows" (:class:`_ReduceOwnRows`), and the
    adjoint of that is this gather again, so the pair is differentiable to any order (HVPs).
    """

    @staticmethod
    def forward(ctx, z, views):
        world = world_size()
        ctx.views = views
        parts = [torch.empty_like(z) for _ in range(world)]
        dist.all_gather(parts, z.contiguous())
        b = z.shape[0] // views
        stacked = torch.stack(parts).view(world, views, b, z.shape[1])
        return stacked.transpose(0, 1).reshape(views * world * b, z.shape[1])

    @staticmethod
    def backward(ctx, grad):
        return _ReduceOwnRows.apply(grad, ctx.views), None


class _ReduceOwnRows(torch.autograd.Function):
    """Global ``[m*W*b, D]`` -> sum over ranks, then this rank's rows of every view: ``[m*b, D]``."""

    @staticmethod
    def forward(ctx, grad, views):
        world = world_size()
        ctx.views = views
        total = grad.contiguous().clone()
        dist.all_reduce(total)
        b = grad.shape[0] // (views * world)
        return total.view(views, world, b, grad.shape[1])[:, rank()].reshape(views * b, grad.shape[1])

    @staticmethod
    def backward(ctx, grad):
        return _GatherViews.apply(grad, ctx.views), None


def gather_views(z: torch.Tensor, views: int) -> torch.Tensor:
    """All-gather view-major rows ``z [m*b, D]`` into the global view-major ``[m*W*b, D]``.

    Differentiable to any order; the gradient reaching ``z`` is the all-reduce-sum of the global
    gradient restricted to this rank's rows. Every rank must pass the same shape (checked with one
    small all-gather). Returns ``z`` itself without a multi-rank process group.
    """
    world = world_size()
    if world == 1:
        return z
    shape = torch.tensor(z.shape, device=z.device)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    if any(not torch.equal(s, shape) for s in shapes):
        raise ValueError(
            "gather=True needs the same z shape on every rank, got "
            f"{[tuple(s.tolist()) for s in shapes]}"
        )
    return _GatherViews.apply(z, views)
