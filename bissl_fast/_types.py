"""Type aliases shared by the ops and the solver."""
from __future__ import annotations

import torch

#: One tensor per parameter (or any fixed list of tensors), e.g. a CG vector or an HVP.
Tensors = tuple[torch.Tensor, ...]
