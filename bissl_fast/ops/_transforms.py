"""Choosing between an op's plain autograd Functions and their forward-mode twins."""
from __future__ import annotations

import torch


def for_transforms(plain: type, forward_ad: type) -> type:
    """``forward_ad`` under ``torch.func`` transforms (``jvp`` of ``grad``: the solver's "fwd-rev"
    products), else ``plain``. Two classes because dynamo rejects autograd Functions that define
    ``jvp``, and the plain ones must stay traceable by ``torch.compile``."""
    return forward_ad if torch._C._are_functorch_transforms_active() else plain
