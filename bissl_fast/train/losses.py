"""The pretext losses of the BiSSL trainer and the pipeline: the fused ops, gathered over ranks when distributed."""
from __future__ import annotations

import torch

from .._dist import is_distributed


def simclr_loss(z: torch.Tensor, temperature: float, views: int, backend: str) -> torch.Tensor:
    """Fused NT-Xent of view-major ``z`` ``[m*b, D]``; in distributed runs over the gathered global batch."""
    from ..ops.nt_xent import nt_xent

    return nt_xent(z, temperature=temperature, views=views, backend=backend, gather=is_distributed())


def byol_pair_loss(p1: torch.Tensor, p2: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor, backend: str) -> torch.Tensor:
    """Fused BYOL loss (docs/design.md §2.2) of the two symmetric view pairs."""
    from ..ops.byol import byol_loss

    return byol_loss(p1, p2, t1, t2, backend=backend)


__all__ = ["byol_pair_loss", "simclr_loss"]
