"""Attribute access to a package's submodules without importing them up front.

``import bissl_fast`` must stay cheap (no triton, no extension, no ``torch._dynamo``), yet
``bissl_fast.train.backbones`` should work after ``import bissl_fast`` like any attribute.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Callable, Iterable


def lazy_submodules(package: str, names: Iterable[str]) -> tuple[Callable[[str], ModuleType], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package`` that import the submodules ``names`` on first access."""
    known = frozenset(names)

    def __getattr__(name: str) -> ModuleType:
        if name not in known:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return importlib.import_module(f"{package}.{name}")

    def __dir__() -> list[str]:
        return sorted(set(importlib.import_module(package).__dict__) | known)

    return __getattr__, __dir__
