"""Registering the Python ops with ``torch.library`` and ``torch.compile`` without loading the
compiler stack on the eager path.

``torch.library.custom_op`` wraps every kernel in ``torch._disable_dynamo``, which imports
``torch._dynamo`` (with sympy and inductor: about 140 MB of RSS and 1-2 s) on the first call, and
``torch.compiler.assume_constant_result`` imports it when the decorated module loads. The helpers
here register the same things through the lower-level public ``torch.library`` API and dynamo's
marker attribute, so an eager program never loads it; the compile tests (``fullgraph=True``) and
``torch.library.opcheck`` check that nothing is lost for ``torch.compile``.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

Fn = TypeVar("Fn", bound=Callable)

_LIBRARIES: dict[str, torch.library.Library] = {}


def assume_constant_result(fn: Fn) -> Fn:
    """:func:`torch.compiler.assume_constant_result` without importing ``torch._dynamo``: under
    ``torch.compile`` ``fn`` runs once at trace time and its result is baked into the graph (for
    backend resolution, which probes the environment and cannot be traced). Dynamo reads this
    attribute when it meets the call; the decorator sets nothing else."""
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn


def _save_nothing(ctx, inputs, output) -> None:
    pass


def _no_autograd(qualname: str) -> Callable:
    def backward(ctx, *grads):
        raise RuntimeError(
            f"{qualname} has no autograd formula of its own; differentiate the autograd Function "
            "that calls it (the public loss functions do)"
        )

    return backward


def library(namespace: str) -> torch.library.Library:
    """The one ``FRAGMENT`` library of ``namespace`` this package registers through (kept alive here: a
    registration lives as long as its library object)."""
    if namespace not in _LIBRARIES:
        _LIBRARIES[namespace] = torch.library.Library(namespace, "FRAGMENT")
    return _LIBRARIES[namespace]


def define_op(
    qualname: str, fake: Callable, autograd_from_caller: bool = False
) -> Callable[[Callable], torch._ops.OpOverload]:
    """Decorator: ``torch.library.custom_op(qualname, mutates_args=())`` without the per-call
    ``torch._dynamo`` import. The schema is inferred from the kernel's type hints; the kernel
    serves every device; ``fake`` is its shape-only twin for FakeTensor tracing. Unless the caller
    registers a formula itself (``autograd_from_caller=True``, then with
    ``torch.library.register_autograd``), differentiating the op raises, as with ``custom_op``.
    Returns the ``OpOverload`` (call it like the function)."""
    namespace, name = qualname.split("::")

    def register(kernel: Callable) -> torch._ops.OpOverload:
        lib = library(namespace)
        lib.define(name + torch.library.infer_schema(kernel, mutates_args=()))
        lib.impl(name, kernel, "CompositeExplicitAutograd")
        torch.library.register_fake(qualname, fake, lib=lib)
        if not autograd_from_caller:
            torch.library.register_autograd(qualname, _no_autograd(qualname), setup_context=_save_nothing, lib=lib)
        return getattr(getattr(torch.ops, namespace), name).default

    return register
