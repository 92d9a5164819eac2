"""Choosing between an op's plain autograd Functions and their forward-mode twins."""
from __future__ import annotations

import torch


def transforms_active() -> bool:
    """True inside ``torch.func`` transforms (``jvp`` of ``grad``: the solver's "fwd-rev" products)."""
    return torch._C._are_functorch_transforms_active()


def for_transforms(plain: type, forward_ad: type) -> type:
    """``forward_ad`` under ``torch.func`` transforms, else ``plain``. Two classes because dynamo
    rejects autograd Functions that define ``jvp``, and the plain ones must stay traceable by
    ``torch.compile``."""
    return forward_ad if transforms_active() else plain
