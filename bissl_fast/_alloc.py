"""Output allocation for kernels, with an optional NaN poison so tests catch unwritten elements."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

_poison = False


@contextlib.contextmanager
def poison_outputs(enabled: bool = True) -> Iterator[None]:
    """Within the block, every kernel output starts as NaN instead of uninitialized memory."""
    global _poison
    previous, _poison = _poison, enabled
    try:
        yield
    finally:
        _poison = previous


def empty_output(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty`` for kernel outputs; NaN-filled inside :func:`poison_outputs`."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if _poison and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def empty_output_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return empty_output(*t.shape, dtype=dtype or t.dtype, device=t.device)
