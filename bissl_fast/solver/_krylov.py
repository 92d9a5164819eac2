"""What the Krylov solvers (:mod:`.cg`, :mod:`.minres`) share: argument checks, the checked matvec,
the warm start's buffers and the final non-finite handling (docs/design.md §2.3)."""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch

from .._types import Tensors
from .._validation import check_int_at_least, check_positive, check_same_device, check_tensor_tuple


def check_solve_args(
    matvec: object, b: Sequence[torch.Tensor], iters: object, tol: float | None
) -> tuple[Tensors, int, float | None]:
    """``b`` detached and contiguous, ``iters >= 1``, ``tol`` positive or ``None``; one-line errors."""
    if not callable(matvec):
        raise TypeError(f"matvec must be callable, got {type(matvec).__name__}")
    b = tuple(t.detach().contiguous() for t in check_tensor_tuple("b", b))
    check_same_device(**{f"b[{i}]": t for i, t in enumerate(b)})
    iters = check_int_at_least("iters", iters, 1)
    if tol is not None:
        tol = check_positive("tol", tol)
    return b, iters, tol


def checked_matvec(matvec: Callable[[Tensors], Sequence[torch.Tensor]], b: Tensors) -> Callable[[Tensors, str], Tensors]:
    """``matvec`` whose output is checked to be shaped, typed and placed like ``b``, detached and contiguous."""

    def apply(v: Tensors, what: str) -> Tensors:
        out = check_tensor_tuple(f"matvec({what})", tuple(matvec(v)), like=b)
        for i, (o, t) in enumerate(zip(out, b)):
            if o.dtype != t.dtype or o.device != t.device:
                raise TypeError(f"matvec({what})[{i}] must be {t.dtype} on {t.device}, got {o.dtype} on {o.device}")
        return tuple(o.detach().contiguous() for o in out)

    return apply


def start(b: Tensors, x0: Sequence[torch.Tensor] | None, apply: Callable[[Tensors, str], Tensors]) -> tuple[Tensors, Tensors]:
    """Solver-owned contiguous ``x`` and ``r = b - A x`` (zeros and a copy of ``b`` without ``x0``).

    A warm start costs one matvec for ``r``.
    """
    if x0 is None:
        x = tuple(torch.zeros_like(t, memory_format=torch.contiguous_format) for t in b)
        return x, tuple(t.clone(memory_format=torch.contiguous_format) for t in b)
    x = tuple(t.detach().clone(memory_format=torch.contiguous_format) for t in check_tensor_tuple("x0", x0, like=b))
    for i, (xi, t) in enumerate(zip(x, b)):
        if xi.dtype != t.dtype or xi.device != t.device:
            raise TypeError(f"x0[{i}] must be {t.dtype} on {t.device}, got {xi.dtype} on {xi.device}")
    return x, tuple(torch.sub(t, ax).contiguous() for t, ax in zip(b, apply(x, "x0")))


def finish(x: Tensors, solver: str) -> tuple[Tensors, bool]:
    """``nan_to_num`` of ``x`` as in the paper, with a ``RuntimeWarning`` when it changed anything.

    Returns the cleaned tensors and whether ``x`` held NaN/inf.
    """
    nonfinite = not bool(torch.stack([torch.isfinite(t).all() for t in x]).all())
    if nonfinite:
        warnings.warn(
            f"{solver}: the solution contained NaN/inf (non-finite matvec products?); "
            "they were replaced by nan_to_num as in the paper",
            RuntimeWarning,
            stacklevel=3,
        )
    return tuple(torch.nan_to_num(t) for t in x), nonfinite
