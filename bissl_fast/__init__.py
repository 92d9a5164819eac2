"""bissl_fast: fused losses, Hessian-vector products and CG solves for bilevel self-supervised learning.

Importing the package is cheap and never probes CUDA, triton or the C++ extension: the public
names below are loaded from their modules on first access.
"""
from __future__ import annotations

import importlib
from typing import Any

from . import reference
from ._backends import BackendUnavailableError, backend_reasons, backends

__version__ = "0.1.0"

_LAZY = {  # public name -> module under bissl_fast
    "NTXentFunction": "ops.nt_xent",
    "NTXentLoss": "ops.nt_xent",
    "nt_xent": "ops.nt_xent",
    "BYOLLossFunction": "ops.byol",
    "BYOLLoss": "ops.byol",
    "byol_loss": "ops.byol",
    "normalized_regression": "ops.byol",
    "batch_norm": "ops.batch_norm",
    "convert_batchnorm": "nn",
    "BatchNorm1d": "nn",
    "BatchNorm2d": "nn",
    "HessianOperator": "solver",
    "ImplicitGradient": "solver",
    "CGInfo": "solver",
    "DampingReport": "solver",
    "check_damping": "solver",
    "cg_solve": "solver",
    "top_eigenvalues": "solver",
    "BiSSLTrainer": "train.trainer",
    "BiSSLConfig": "train.config",
}

# Subpackages and modules reachable as attributes (``bissl_fast.train.backbones`` after ``import bissl_fast``).
_SUBMODULES = ("bench", "cli", "data", "experiments", "kernels", "nn", "ops", "solver", "train")

__all__ = ["BackendUnavailableError", "backend_reasons", "backends", "reference", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bissl_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))
