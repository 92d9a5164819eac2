"""Averaging over torch.distributed ranks with one bucketed all-reduce per call."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a process group with more than one rank is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def bucketed_mean(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Mean over ranks of every tensor, with ONE all-reduce for the whole list.

    The tensors are flattened into a single buffer per dtype (``torch.cat``, one copy), reduced,
    divided by the world size and split back into new tensors shaped like the inputs. The
    inputs are not modified. Without an initialized multi-rank group the inputs are returned.
    """
    tensors = tuple(tensors)
    if not is_distributed():
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
