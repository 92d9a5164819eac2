"""Output allocation for kernels, with an optional NaN poison so tests catch unwritten elements."""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator

import torch

_poison = False


@contextlib.contextmanager
def poison_outputs(enabled: bool = True) -> Iterator[None]:
    """Within the block, every kernel output starts as NaN instead of uninitialized memory."""
    global _poison
    previous, _poison = _poison, enabled
    sync_extension()
    try:
        yield
    finally:
        _poison = previous
        sync_extension()


def sync_extension() -> None:
    """Mirror the poison flag into the C++ ops' allocator, if the extension is loaded."""
    ext = sys.modules.get("bissl_fast._C")
    if ext is not None:
        ext.set_poison_outputs(_poison)


def empty_output(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty`` for kernel outputs; NaN-filled inside :func:`poison_outputs`."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if _poison and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def empty_output_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return empty_output(*t.shape, dtype=dtype or t.dtype, device=t.device)
