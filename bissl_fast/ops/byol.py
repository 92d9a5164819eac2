"""Fused BYOL loss (docs/design.md §2.2): row-wise forward, backward and double backward.

Three row ops, each the vector-Jacobian product of the previous one, so the gradient of every op
is itself differentiable and Hessian-vector products through the loss are exact:

    byol_fwd(p, t)                        -> loss [B]          2 - 2 cos(p_b, t_b)
    byol_bwd(grad, p, t, t_grad)          -> (dp, dt)          vjp of byol_fwd
    byol_hvp(grad, p, t, wp, wt, t_grad)  -> (dgrad, dp, dt)   vjp of byol_bwd

``dt`` is an empty ``[0]`` tensor unless ``t_grad`` (targets are normally detached, and skipping
their gradient saves a ``[B, D]`` write). Backends:

- ``"cpp"``: ``torch.ops.bissl_fast.byol_*`` CPU kernels (``csrc/cpu/byol_cpu.cpp``);
- ``"cuda"``: the same ``torch.ops`` ops, CUDA kernels (``csrc/cuda/byol_cuda_kernels.cu``);
- ``"triton"``: ``torch.ops.bissl_fast.byol_*_triton`` custom ops (``bissl_fast/kernels/byol_triton.py``);
- ``"torch"``: plain autograd composition of ``F.normalize`` (the reference math).

All kernel backends share the row math of ``csrc/include/bissl_fast/byol_math.h``. Their autograd
formulas and fake (meta) kernels are registered with ``torch.library`` so they pass
``torch.library.opcheck`` and trace under ``torch.compile``. ``backend="auto"`` picks ``cuda``
then ``triton`` on CUDA tensors (a default awaiting GPU measurement in ``benchmarks/bench_byol.py``)
and ``cpp`` then ``torch`` on CPU tensors.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import reference
from .._backends import OP_BACKENDS, extension, resolve_backend
from .._validation import check_float_tensor, check_same_device, check_same_shape
from ._registration import assume_constant_result, define_op
from ._transforms import transforms_active
from .byol_batching import batched_hvp_fake, register_batched_hvp, register_batching_rules


@dataclass(frozen=True)
class _RowOps:
    fwd: Callable[..., Tensor]
    bwd: Callable[..., tuple[Tensor, Tensor]]
    hvp: Callable[..., tuple[Tensor, Tensor, Tensor]]


# ---------------------------------------------------------------------------------------------
# Shared autograd formulas and fake kernels (one definition for the C++/CUDA and Triton op sets)
# ---------------------------------------------------------------------------------------------


def _fake_fwd(p: Tensor, t: Tensor) -> Tensor:
    return p.new_empty(p.shape[0])


def _fake_bwd(grad: Tensor, p: Tensor, t: Tensor, t_grad: bool) -> tuple[Tensor, Tensor]:
    return torch.empty_like(p), (torch.empty_like(t) if t_grad else p.new_empty(0))


def _fake_hvp(
    grad: Tensor, p: Tensor, t: Tensor, wp: Tensor, wt: Tensor | None, t_grad: bool
) -> tuple[Tensor, Tensor, Tensor]:
    return p.new_empty(p.shape[0]), torch.empty_like(p), (torch.empty_like(t) if t_grad else p.new_empty(0))


def _bwd_vjp(ops: _RowOps, ctx, gdp: Tensor | None, gdt: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(dgrad, dp, dt)``: the VJP of ``byol_bwd`` (saved ``grad, p, t`` and ``ctx.t_grad``) via ``byol_hvp``."""
    grad, p, t = ctx.saved_tensors
    # Cotangents of outputs that did not reach the differentiated value arrive as None.
    wp = torch.zeros_like(p) if gdp is None else gdp.contiguous()
    wt = gdt.contiguous() if (ctx.t_grad and gdt is not None and gdt.numel() > 0) else None
    t_grad = ctx.needs_input_grad[2]
    dgrad, dp, dt = ops.hvp(grad, p, t, wp, wt, t_grad)
    return dgrad, dp, (dt if t_grad else None)


def _register_autograd(name: str, ops: _RowOps) -> None:
    """Autograd of ``bissl_fast::{name}_fwd/bwd/hvp``: fwd's backward is bwd, bwd's backward is hvp."""

    def fwd_setup(ctx, inputs, output):
        p, t = inputs
        ctx.save_for_backward(p, t)

    def fwd_backward(ctx, grad):
        p, t = ctx.saved_tensors
        t_grad = ctx.needs_input_grad[1]
        dp, dt = ops.bwd(grad.contiguous(), p, t, t_grad)
        return dp, (dt if t_grad else None)

    def bwd_setup(ctx, inputs, output):
        grad, p, t, t_grad = inputs
        ctx.save_for_backward(grad, p, t)
        ctx.t_grad = t_grad

    def bwd_backward(ctx, gdp, gdt):
        return (*_bwd_vjp(ops, ctx, gdp, gdt), None)

    def hvp_setup(ctx, inputs, output):
        pass

    def hvp_backward(ctx, *grads):
        raise NotImplementedError(
            f"{name}_hvp is not differentiable: third derivatives of the BYOL loss are not implemented "
            "(use backend='torch' for them)"
        )

    torch.library.register_autograd(f"bissl_fast::{name}_fwd", fwd_backward, setup_context=fwd_setup)
    torch.library.register_autograd(f"bissl_fast::{name}_bwd", bwd_backward, setup_context=bwd_setup)
    torch.library.register_autograd(f"bissl_fast::{name}_hvp", hvp_backward, setup_context=hvp_setup)


# ---------------------------------------------------------------------------------------------
# C++ / CUDA op set: schemas and kernels live in the extension; fake + autograd registered here
# ---------------------------------------------------------------------------------------------

_lock = threading.Lock()
_extension_ops: _RowOps | None = None


def extension_ops() -> _RowOps:
    """The extension's ``torch.ops.bissl_fast.byol_{fwd,bwd,hvp}`` (CPU kernels for ``"cpp"``, CUDA
    kernels for ``"cuda"``, dispatched by device), with fake and autograd kernels registered."""
    global _extension_ops
    if _extension_ops is None:
        with _lock:
            if _extension_ops is None:
                extension()
                ns = torch.ops.bissl_fast
                torch.library.register_fake("bissl_fast::byol_fwd", _fake_fwd)
                torch.library.register_fake("bissl_fast::byol_bwd", _fake_bwd)
                torch.library.register_fake("bissl_fast::byol_hvp", _fake_hvp)
                ops = _RowOps(ns.byol_fwd.default, ns.byol_bwd.default, ns.byol_hvp.default)
                _register_autograd("byol", ops)
                register_batched_hvp("bissl_fast::byol_hvp_batched")
                register_batching_rules("byol", ops.fwd, ops.bwd, ops.hvp, ns.byol_hvp_batched.default)
                _extension_ops = ops
    return _extension_ops


# ---------------------------------------------------------------------------------------------
# Triton op set: Python custom ops (triton is imported only when a kernel launches)
# ---------------------------------------------------------------------------------------------


def _triton_kernels():
    from ..kernels import byol_triton

    return byol_triton


@define_op("bissl_fast::byol_triton_fwd", fake=_fake_fwd, autograd_from_caller=True)
def _triton_fwd(p: Tensor, t: Tensor) -> Tensor:
    return _triton_kernels().fwd(p.contiguous(), t.contiguous())


@define_op("bissl_fast::byol_triton_bwd", fake=_fake_bwd, autograd_from_caller=True)
def _triton_bwd(grad: Tensor, p: Tensor, t: Tensor, t_grad: bool) -> tuple[Tensor, Tensor]:
    return _triton_kernels().bwd(grad.contiguous(), p.contiguous(), t.contiguous(), t_grad)


@define_op("bissl_fast::byol_triton_hvp", fake=_fake_hvp, autograd_from_caller=True)
def _triton_hvp(
    grad: Tensor, p: Tensor, t: Tensor, wp: Tensor, wt: Tensor | None, t_grad: bool
) -> tuple[Tensor, Tensor, Tensor]:
    return _triton_kernels().hvp(
        grad.contiguous(), p.contiguous(), t.contiguous(), wp.contiguous(),
        None if wt is None else wt.contiguous(), t_grad,
    )


@define_op("bissl_fast::byol_triton_hvp_batched", fake=batched_hvp_fake)
def _triton_hvp_batched(
    grad: Tensor, p: Tensor, t: Tensor, wp: Tensor, wt: Tensor | None, t_grad: bool
) -> tuple[Tensor, Tensor, Tensor]:
    return _triton_kernels().hvp_batched(
        grad.contiguous(), p.contiguous(), t.contiguous(), wp.contiguous(),
        None if wt is None else wt.contiguous(), t_grad,
    )


TRITON_OPS = _RowOps(_triton_fwd, _triton_bwd, _triton_hvp)
_register_autograd("byol_triton", TRITON_OPS)
register_batching_rules("byol_triton", TRITON_OPS.fwd, TRITON_OPS.bwd, TRITON_OPS.hvp, _triton_hvp_batched)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def _check_pairs(**tensors: Tensor) -> torch.device:
    for name, t in tensors.items():
        check_float_tensor(name, t, ndim=2)
    check_same_shape(**tensors)
    device = check_same_device(**tensors)
    dtypes = {name: t.dtype for name, t in tensors.items()}
    if len(set(dtypes.values())) != 1:
        raise TypeError(f"all inputs must share one dtype, got {dtypes}")
    return device


@assume_constant_result
def _resolve(backend: str, device: torch.device) -> str:
    """The backend name for ``device``; registers the C++ ops' fake/autograd kernels on first use.

    Evaluated once at trace time under ``torch.compile`` (it probes the environment, which dynamo
    must not trace).
    """
    name = resolve_backend(backend, device, "byol")
    if name in ("cpp", "cuda"):
        extension_ops()
    return name


def _row_ops(name: str) -> _RowOps:
    if name == "triton":
        return TRITON_OPS
    # _resolve registered them already on the public paths; BYOLLossFunction.apply may come first.
    return _extension_ops if _extension_ops is not None else extension_ops()


class BYOLLossFunction(torch.autograd.Function):
    """Symmetric BYOL loss on the fused row ops, one autograd node for both pairs.

    ``BYOLLossFunction.apply(p1, p2, t1, t2, backend)`` with ``backend`` in ``{"cpp", "cuda", "triton"}``
    (already resolved; :func:`byol_loss` validates and resolves). Inputs ``[B, D]``, returns a scalar.
    The backward calls ``byol_bwd``, whose registered autograd is ``byol_hvp``, so double backward
    (``create_graph=True``) works, including the cross terms when a target requires grad.
    """

    # Under torch.func.vmap the forward and backward run on batched tensors and the ops' batching rules apply.
    generate_vmap_rule = True

    @staticmethod
    def forward(p1: Tensor, p2: Tensor, t1: Tensor, t2: Tensor, backend: str) -> Tensor:
        return _symmetric_mean(backend, p1, p2, t1, t2)

    @staticmethod
    def setup_context(ctx, inputs, output):
        *tensors, ctx.backend = inputs
        ctx.save_for_backward(*tensors)
        ctx.save_for_forward(*tensors)

    @staticmethod
    def backward(ctx, grad: Tensor):
        p1, p2, t1, t2 = ctx.saved_tensors
        g = _row_weights(grad, p1)
        need_t1, need_t2 = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        dp1, dt2 = _row_backward(g, p1, t2, need_t2, ctx.backend)
        dp2, dt1 = _row_backward(g, p2, t1, need_t1, ctx.backend)
        return dp1, dp2, (dt1 if need_t1 else None), (dt2 if need_t2 else None), None


class _RowBackwardForwardAD(torch.autograd.Function):
    """``byol_bwd`` as an autograd Function with a forward-mode rule, for ``torch.func`` transforms.

    ``(g, p, t) -> (dp, dt)`` is the gradient of ``sum_b g_b (2 - 2 cos(p_b, t_b))``, so its Jacobian
    in ``(p, t)`` is that function's Hessian: symmetric, hence the JVP with tangents ``(wp, wt)`` is
    the ``byol_hvp`` VJP with cotangents ``(wp, wt)``; ``g`` enters linearly (another ``byol_bwd``).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(g: Tensor, p: Tensor, t: Tensor, t_grad: bool, backend: str):
        return _row_ops(backend).bwd(g, p, t, t_grad)

    @staticmethod
    def setup_context(ctx, inputs, output):
        g, p, t, t_grad, backend = inputs
        ctx.save_for_backward(g, p, t)
        ctx.save_for_forward(g, p, t)
        ctx.t_grad, ctx.backend = t_grad, backend

    @staticmethod
    def backward(ctx, gdp, gdt):
        return (*_bwd_vjp(_row_ops(ctx.backend), ctx, gdp, gdt), None, None)

    @staticmethod
    def jvp(ctx, dg, wp, wt, *_):
        g, p, t = ctx.saved_tensors
        ops = _row_ops(ctx.backend)
        wp = torch.zeros_like(p) if wp is None else wp.contiguous()
        _, hp, ht = ops.hvp(g, p, t, wp, None if wt is None else wt.contiguous(), ctx.t_grad)
        if dg is not None:
            bp, bt = ops.bwd(dg.contiguous(), p, t, ctx.t_grad)
            hp, ht = hp + bp, ht + bt
        return hp, ht


def _row_backward(g: Tensor, p: Tensor, t: Tensor, t_grad: bool, backend: str) -> tuple[Tensor, Tensor]:
    """``byol_bwd``: the registered op, or under ``torch.func`` transforms its forward-mode twin."""
    if transforms_active():
        return _RowBackwardForwardAD.apply(g, p, t, t_grad, backend)
    return _row_ops(backend).bwd(g, p, t, t_grad)


class _BYOLLossForwardAD(BYOLLossFunction):
    """:class:`BYOLLossFunction` with a forward-mode rule, used under ``torch.func`` transforms
    (see :func:`~bissl_fast.ops._transforms.for_transforms`)."""

    @staticmethod
    def jvp(ctx, wp1, wp2, wt1, wt2, _):
        """The directional derivative ``<grad, tangents>`` of the loss."""
        p1, p2, t1, t2 = ctx.saved_tensors
        ops = _row_ops(ctx.backend)
        g = _row_weights(torch.ones((), dtype=p1.dtype, device=p1.device), p1)
        total = torch.zeros((), dtype=p1.dtype, device=p1.device)
        for p, t, wp, wt in ((p1, t2, wp1, wt2), (p2, t1, wp2, wt1)):
            dp, dt = ops.bwd(g, p, t, wt is not None)
            if wp is not None:
                total = total + (dp * wp).sum()
            if wt is not None:
                total = total + (dt * wt).sum()
        return total


def _row_weights(grad: Tensor, p: Tensor) -> Tensor:
    """``[B]`` row weights of the mean: ``grad / B`` for every row."""
    b = p.shape[0]
    return (grad / b).to(p.dtype).expand(b).contiguous()


def normalized_regression(p: Tensor, t: Tensor, backend: str = "auto") -> Tensor:
    """Per-row BYOL regression loss ``2 - 2 cos(p_b, t_b)``.

    Args:
        p: predictions ``[B, D]`` (float32/float64/bfloat16/float16).
        t: targets ``[B, D]``, same dtype and device; gets a gradient only if it requires grad.
        backend: ``"auto" | "torch" | "cpp" | "cuda" | "triton"``.

    Returns:
        ``[B]`` per-row losses, dtype of ``p``. Differentiable twice on every backend.
    """
    device = _check_pairs(p=p, t=t)
    name = _resolve(backend, device)
    if name == "torch":
        return reference.normalized_regression(p, t)
    return _row_ops(name).fwd(p, t)


def byol_loss(p1: Tensor, p2: Tensor, t1: Tensor, t2: Tensor, backend: str = "auto") -> Tensor:
    """Symmetric BYOL loss ``mean_b[(2 - 2 cos(p1_b, t2_b)) + (2 - 2 cos(p2_b, t1_b))]``.

    Args:
        p1, p2: online predictions of the two views, ``[B, D]``.
        t1, t2: target projections of the two views, ``[B, D]``; normally detached, a target that
            requires grad receives the symmetric gradient.
        backend: ``"auto" | "torch" | "cpp" | "cuda" | "triton"``.

    Returns:
        A scalar of the inputs' dtype; supports backward and double backward.
    """
    device = _check_pairs(p1=p1, p2=p2, t1=t1, t2=t2)
    name = _resolve(backend, device)
    if name == "torch":
        return reference.byol_loss(p1, p2, t1, t2)
    if transforms_active():
        return _BYOLLossForwardAD.apply(p1, p2, t1, t2, name)
    # The row ops' own autograd (fwd -> bwd -> hvp) rather than BYOLLossFunction: under torch.compile each op
    # stays an opaque call whose backward runs eagerly, so a double backward through a graph compiled with
    # backend="eager" is exact (dynamo traces an autograd Function's backward with detached saved tensors).
    return _symmetric_mean(name, p1, p2, t1, t2)


def _symmetric_mean(backend: str, p1: Tensor, p2: Tensor, t1: Tensor, t2: Tensor) -> Tensor:
    """The loss from the row op ``byol_fwd`` of a resolved fused backend (design §2.2)."""
    ops = _row_ops(backend)
    return (ops.fwd(p1, t2) + ops.fwd(p2, t1)).mean()


class BYOLLoss(nn.Module):
    """``nn.Module`` drop-in for :func:`byol_loss`: ``BYOLLoss(backend)(p1, p2, t1, t2) -> scalar``."""

    def __init__(self, backend: str = "auto") -> None:
        super().__init__()
        if backend != "auto" and backend not in OP_BACKENDS["byol"].supported:
            raise ValueError(f"backend must be 'auto' or one of {OP_BACKENDS['byol'].supported}, got {backend!r}")
        self.backend = backend

    def forward(self, p1: Tensor, p2: Tensor, t1: Tensor, t2: Tensor) -> Tensor:
        return byol_loss(p1, p2, t1, t2, backend=self.backend)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


__all__ = ["BYOLLoss", "BYOLLossFunction", "byol_loss", "extension_ops", "normalized_regression"]
