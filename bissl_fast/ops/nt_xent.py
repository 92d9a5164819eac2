"""Fused NT-Xent (SimCLR) loss with exact first and second derivatives in O(N*D) memory.

The loss of docs/design.md §2.1 is split into two terms::

    loss = (1/N) sum_i lse_i  -  1/(tau N (m-1)) sum_i sum_{p in P(i)} u_i . u_p

The positive term is O(N*D) (m-1 row-wise dot products) and plain autograd differentiates it any
number of times. The masked log-sum-exp term ``lse_i = log sum_{j != i} exp(u_i . u_j / tau)`` is
the part that would need the ``N x N`` logits; it is computed by :class:`NTXentFunction`, whose
forward, backward and double backward all stream over row blocks of the logits (Triton kernels on
GPU, ``kernels/nt_xent_triton.py``; chunked PyTorch on CPU, ``kernels/nt_xent_torch.py``; the two
modules share entry-point names and signatures). The Triton kernels never hold an ``N x N``
buffer; the torch path treats logits of up to 16 MiB (``N <= 2048`` in fp32) as one block, which
skips recomputations, and streams over row blocks beyond that, so memory is O(N*D) plus at most a
few such blocks. The backward of :class:`NTXentFunction` is itself an autograd Function, so
``torch.autograd.grad(..., create_graph=True)`` followed by a second ``grad`` (a Hessian-vector
product) is exact; third derivatives raise an error instead of returning a silently wrong value.

Normalization ``u = z / max(||z||, 1e-12)`` is done with ``F.normalize`` around the kernels, so its
chain rule (first and second order) comes from autograd.

The three kernels are registered as ``torch.library`` custom ops (``torch.ops.bissl_fast.nt_xent_lse``,
``..._backward``, ``..._double_backward``) with fake implementations, so ``torch.compile`` traces
``nt_xent`` without graph breaks. Outside ``torch.func`` transforms :func:`nt_xent` calls the lse op, whose
autograd formula is registered on the op, so a double backward through a graph compiled with
``backend="eager"`` runs the backward eagerly and is exact (docs/design.md §2.1, "Custom ops").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._backends import resolve_backend
from .._dist import gather_views
from .._validation import check_finite as _check_finite
from .._validation import (
    check_float_tensor,
    check_int_at_least,
    check_positive,
    parse_nt_xent_args,
)
from ..kernels import nt_xent_torch
from ..kernels.nt_xent_torch import accumulation_dtype
from ..reference import NORMALIZE_EPS
from ._registration import assume_constant_result, define_op
from ._transforms import for_transforms, transforms_active
from .nt_xent_batching import register_batching_rules

__all__ = ["NTXentFunction", "NTXentLoss", "nt_xent"]

_PRECISIONS = ("ieee", "tf32")
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------------
# torch.library custom ops: opaque to torch.compile, dispatching to Triton or the chunked path.
# --------------------------------------------------------------------------------------------


def _kernels(backend: str):
    """The module holding ``backend``'s three entry points (same names and signatures in both)."""
    if backend == "triton":
        from ..kernels import nt_xent_triton  # imports triton: only when a Triton launch is requested

        return nt_xent_triton
    return nt_xent_torch


def _lse_fake(u: torch.Tensor, inv_tau: float, backend: str, precision: str) -> torch.Tensor:
    return u.new_empty(u.shape[0], dtype=accumulation_dtype(u.dtype))


@define_op("bissl_fast::nt_xent_lse", fake=_lse_fake, autograd_from_caller=True)
def _lse_op(u: torch.Tensor, inv_tau: float, backend: str, precision: str) -> torch.Tensor:
    """``lse [N]`` (fp32, fp64 for fp64 ``u``) of the diagonal-masked logits ``u u^T * inv_tau``."""
    return _kernels(backend).lse_forward(u, inv_tau, precision)


def _lse_backward_fake(u, lse, c, inv_tau, backend, precision):
    return torch.empty_like(u)


@define_op("bissl_fast::nt_xent_lse_backward", fake=_lse_backward_fake)
def _lse_backward_op(
    u: torch.Tensor, lse: torch.Tensor, c: torch.Tensor, inv_tau: float, backend: str, precision: str
) -> torch.Tensor:
    """``d(sum_i c_i lse_i)/du = inv_tau (C P + P^T C) u``, ``[N, D]`` in ``u.dtype``."""
    return _kernels(backend).lse_backward(u, lse, c, inv_tau, precision)


def _lse_double_backward_fake(u, lse, c, w, inv_tau, backend, precision):
    return torch.empty_like(u), u.new_empty(u.shape[0], dtype=accumulation_dtype(u.dtype))


@define_op("bissl_fast::nt_xent_lse_double_backward", fake=_lse_double_backward_fake)
def _lse_double_backward_op(
    u: torch.Tensor, lse: torch.Tensor, c: torch.Tensor, w: torch.Tensor, inv_tau: float, backend: str, precision: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """For cotangent ``w`` of the backward's output: ``(d<w, dU>/du [N, D], r [N])``; ``d<w, dU>/dc = r * inv_tau``."""
    return _kernels(backend).lse_double_backward(u, lse, c, w, inv_tau, precision)


register_batching_rules(_kernels)


def _lse_setup(ctx, inputs, output):
    u, ctx.inv_tau, ctx.backend, ctx.precision = inputs
    ctx.save_for_backward(u, output)


def _lse_backward(ctx, grad_lse):
    u, lse = ctx.saved_tensors
    return _lse_vjp(u, lse, grad_lse, ctx.inv_tau, ctx.backend, ctx.precision), None, None, None


# What `nt_xent` differentiates outside torch.func transforms: an opaque op's backward runs eagerly, so a double
# backward through torch.compile(backend="eager") is exact (dynamo traces a Function's backward: docs/design.md §2.1).
torch.library.register_autograd("bissl_fast::nt_xent_lse", _lse_backward, setup_context=_lse_setup)


# --------------------------------------------------------------------------------------------
# Autograd layer.
# --------------------------------------------------------------------------------------------


class _NTXentLseDoubleBackward(torch.autograd.Function):
    """``(u, lse, c, w) -> (d<w, dU>/du, d<w, dU>/dc)``: the backward of :class:`_NTXentLseBackward`.

    Differentiating it again (a third derivative) raises. It is an autograd Function rather than
    an ``@once_differentiable`` backward on purpose: ``once_differentiable`` hangs its error node on
    detached copies of the outputs, so a later ``grad`` w.r.t. the real inputs never reaches it and
    silently drops this term instead of raising.
    """

    # Under torch.func.vmap the forward runs on batched tensors and the op's batching rule applies.
    generate_vmap_rule = True

    @staticmethod
    def forward(u, lse, c, w, inv_tau, backend, precision):
        grad_u, r = torch.ops.bissl_fast.nt_xent_lse_double_backward(u, lse, c, w, inv_tau, backend, precision)
        return grad_u, r.mul_(inv_tau)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            "third-order derivatives of nt_xent are not implemented (its gradient is differentiable "
            "once, for Hessian-vector products); use bissl_fast.reference.nt_xent for higher orders"
        )


class _NTXentLseBackward(torch.autograd.Function):
    """``(u, lse, c) -> dU = (1/tau) (C P + P^T C) u``: the backward of :class:`NTXentFunction`.

    Its own backward is the two-pass double backward of docs/design.md §2.1 (with ``g/N`` generalized to the
    per-row weights ``c``), so HVPs through the loss are exact. ``lse`` is the detached forward
    value: the gradient with respect to ``u`` already includes the dependence of ``lse`` on ``u``
    (the ``-r_i`` term), so no gradient flows to ``lse``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(u, lse, c, inv_tau, backend, precision):
        return torch.ops.bissl_fast.nt_xent_lse_backward(u, lse, c, inv_tau, backend, precision)

    @staticmethod
    def setup_context(ctx, inputs, output):
        u, lse, c, inv_tau, backend, precision = inputs
        ctx.save_for_backward(u, lse, c)
        ctx.save_for_forward(u, lse, c)
        ctx.inv_tau, ctx.backend, ctx.precision = inv_tau, backend, precision

    @staticmethod
    def backward(ctx, w):
        u, lse, c = ctx.saved_tensors
        grad_u, grad_c = _NTXentLseDoubleBackward.apply(
            u, lse, c, w.to(u.dtype).contiguous(), ctx.inv_tau, ctx.backend, ctx.precision
        )
        return grad_u, None, grad_c if ctx.needs_input_grad[2] else None, None, None, None


class _NTXentLseBackwardForwardAD(_NTXentLseBackward):
    """:class:`_NTXentLseBackward` with a forward-mode rule, used under ``torch.func`` transforms
    (see :func:`~bissl_fast.ops._transforms.for_transforms`)."""

    @staticmethod
    def jvp(ctx, du, dlse, dc, *_):
        """Forward mode (``torch.func.jvp`` of a gradient: the solver's "fwd-rev" HVP). The map is the
        gradient of ``sum_i c_i lse_i``, so its Jacobian in ``u`` is that function's Hessian: symmetric,
        hence equal to the double backward applied to the tangent. ``lse`` is a detached input (its
        dependence on ``u`` is inside that Hessian), so ``dlse`` is ignored."""
        u, lse, c = ctx.saved_tensors
        out = torch.zeros_like(u)
        if du is not None:
            out = out + torch.ops.bissl_fast.nt_xent_lse_double_backward(
                u, lse, c, du.to(u.dtype).contiguous(), ctx.inv_tau, ctx.backend, ctx.precision
            )[0]
        if dc is not None:
            out = out + torch.ops.bissl_fast.nt_xent_lse_backward(
                u, lse, dc.to(lse.dtype).contiguous(), ctx.inv_tau, ctx.backend, ctx.precision
            )
        return out


class NTXentFunction(torch.autograd.Function):
    """Masked log-sum-exp term of NT-Xent: ``u [N, D] -> lse [N]``, ``lse_i = log sum_{j != i} exp(u_i . u_j / tau)``.

    This is the only part of the loss that needs the ``N x N`` logits; :func:`nt_xent` adds the
    normalization and the positive term around it with plain autograd ops. Call as
    ``NTXentFunction.apply(u, temperature, backend, precision)`` with

    * ``u``: ``[N, D]`` rows (normally unit rows), ``N >= 2``; fp32/fp64/bf16/fp16 on
      ``backend="torch"`` (computed in fp32, fp64 for fp64), fp32/bf16/fp16 on ``backend="triton"``
      (16-bit dots on tensor cores, fp32 accumulation);
    * ``temperature``: float > 0; ``backend``: ``"auto"``, ``"torch"`` or ``"triton"`` (as in
      :func:`nt_xent`); ``precision``: ``"ieee"`` or ``"tf32"`` (fp32 dots on the Triton path).

    Returns ``lse`` of shape ``[N]`` in fp32 (fp64 for fp64 ``u``). Its gradient is differentiable
    once more (``create_graph=True`` then a second ``grad``); memory stays O(N*D) plus a few
    bounded logits blocks throughout. :func:`nt_xent` calls the op itself (same derivatives) outside
    ``torch.func`` transforms.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(u, temperature, backend="auto", precision="ieee"):
        inv_tau, backend, precision = _lse_settings(u, temperature, backend, precision)
        return torch.ops.bissl_fast.nt_xent_lse(u.contiguous(), inv_tau, backend, precision)

    @staticmethod
    def setup_context(ctx, inputs, output):
        u, temperature, backend, precision = (*inputs, "auto", "ieee")[:4]
        ctx.inv_tau, ctx.backend, ctx.precision = _lse_settings(u, temperature, backend, precision)
        ctx.save_for_backward(u, output)
        ctx.save_for_forward(u, output)

    @staticmethod
    def backward(ctx, grad_lse):
        u, lse = ctx.saved_tensors
        return _lse_vjp(u, lse, grad_lse, ctx.inv_tau, ctx.backend, ctx.precision), None, None, None


def _lse_vjp(
    u: torch.Tensor, lse: torch.Tensor, grad_lse: torch.Tensor, inv_tau: float, backend: str, precision: str
) -> torch.Tensor:
    """``d(sum_i grad_lse_i lse_i)/du [N, D]``, itself differentiable once (the double backward)."""
    c = grad_lse.to(lse.dtype).contiguous()
    return for_transforms(_NTXentLseBackward, _NTXentLseBackwardForwardAD).apply(
        u.contiguous(), lse.detach(), c, inv_tau, backend, precision
    )


class _NTXentFunctionForwardAD(NTXentFunction):
    """:class:`NTXentFunction` with a forward-mode rule, used under ``torch.func`` transforms
    (``torch.func.jvp`` of ``torch.func.grad``: the solver's "fwd-rev" products)."""

    @staticmethod
    def jvp(ctx, du, *_):
        """Forward mode: ``d lse_i = (1/tau) sum_j P_ij (du_i . u_j + u_i . du_j)``, the ``r`` pass of
        the double backward (which does not depend on its weights ``c``)."""
        u, lse = ctx.saved_tensors
        u = u.contiguous()
        _, r = torch.ops.bissl_fast.nt_xent_lse_double_backward(
            u, lse, torch.zeros_like(lse), du.to(u.dtype).contiguous(), ctx.inv_tau, ctx.backend, ctx.precision
        )
        return r * ctx.inv_tau


def _lse_settings(u: torch.Tensor, temperature: float, backend: str, precision: str) -> tuple[float, str, str]:
    """Validated ``(1/tau, resolved backend, precision)`` of an :class:`NTXentFunction` call."""
    check_float_tensor("u", u, ndim=2)
    if u.shape[0] < 2:
        raise ValueError(f"u needs at least 2 rows (the diagonal is excluded), got shape {tuple(u.shape)}")
    inv_tau = 1.0 / check_positive("temperature", temperature)
    return inv_tau, _resolve_for(backend, u.device.type, u.dtype), _check_precision(precision)


# --------------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------------


def _check_precision(precision: object) -> str:
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {_PRECISIONS}, got {precision!r}")
    return precision  # type: ignore[return-value]


@assume_constant_result
def _resolve_for(backend: str, device_type: str, dtype: torch.dtype) -> str:
    # A constant under torch.compile: it probes triton/the extension once, outside the traced graph.
    name = resolve_backend(backend, torch.device(device_type), "nt_xent")
    if name == "triton" and dtype not in _TRITON_DTYPES:
        if backend == "auto":
            return "torch"
        raise TypeError(f"backend='triton' supports z of dtype {_TRITON_DTYPES}, got {dtype}; use backend='torch'")
    return name


def _resolve(backend: str, z: torch.Tensor) -> str:
    return _resolve_for(backend, z.device.type, z.dtype)


def _loss(z: torch.Tensor, tau: float, views: int, backend: str, precision: str) -> torch.Tensor:
    n = z.shape[0]
    b = n // views
    u = F.normalize(z.to(accumulation_dtype(z.dtype)), dim=1, eps=NORMALIZE_EPS)
    # Triton takes 16-bit rows as they are (tensor-core dots, fp32 accumulation); the chunked path
    # computes in fp32 (fp64 for fp64 input).
    u_lse = (u.to(z.dtype) if backend == "triton" else u).contiguous()
    if transforms_active():
        lse = _NTXentFunctionForwardAD.apply(u_lse, tau, backend, precision)
    else:
        inv_tau, backend, precision = _lse_settings(u_lse, tau, backend, precision)
        lse = torch.ops.bissl_fast.nt_xent_lse(u_lse, inv_tau, backend, precision)
    positives = sum((u * u.roll(-k * b, dims=0)).sum() for k in range(1, views))
    return lse.mean() - positives / (tau * n * (views - 1))


def nt_xent(
    z: torch.Tensor,
    *rest: torch.Tensor | float,
    temperature: float | None = None,
    views: int = 2,
    backend: str = "auto",
    gather: bool = False,
    precision: str = "ieee",
    check_finite: bool = False,
) -> torch.Tensor:
    """NT-Xent (SimCLR) loss, docs/design.md §2.1, in O(N*D) memory with exact first and second derivatives.

    Call forms:

    * ``nt_xent(z, temperature=0.5, views=2)``: ``z`` is ``[N, D]``, ``N = views * B``, rows
      view-major (rows ``k*B .. (k+1)*B - 1`` are view ``k`` of samples ``0..B-1``);
    * ``nt_xent(z0, z1, temperature)``: ``z0, z1`` are ``[B, D]``, same as ``cat([z0, z1])`` with 2 views.

    Returns a scalar ``1/(N(m-1)) sum_i sum_{p in P(i)} (lse_i - s_ip)`` with
    ``s_ij = u_i . u_j / tau``, ``u = z / max(||z||, 1e-12)``, the diagonal excluded from every
    softmax and ``P(i) = {(i + k*B) mod N, k = 1..m-1}``. The loss is fp32 for fp32/bf16/fp16 input
    (accumulated in fp32) and fp64 for fp64 input; gradients come back in ``z``'s dtype.

    Args:
        temperature: ``tau > 0`` (default 0.5), a runtime scalar (no recompilation per value).
        views: ``m >= 2`` views per sample.
        backend: ``"auto"`` (CUDA -> ``"triton"`` if available, else ``"torch"``; CPU -> ``"torch"``),
            ``"triton"`` (tiled kernels; CPU tensors only under ``TRITON_INTERPRET=1``) or
            ``"torch"`` (PyTorch over row blocks of the logits, one block up to ``N = 2048`` in
            fp32; fp64 supported). An explicit
            backend that cannot run raises :class:`~bissl_fast.BackendUnavailableError`.
        gather: all-gather ``z`` over ``torch.distributed`` ranks first (no-op without an
            initialized process group or with one rank). Every rank must pass the same shape. The
            global batch is view-major: view ``k`` of it is ``[rank0 view k; rank1 view k; ...]``,
            so the loss equals the single-process loss on that concatenation. Gradients flow back to
            each rank's own rows as all-reduce-sum then own slice (as in lightly / solo-learn): rank
            ``r`` gets ``world_size * dL/dz_r``, which DDP's gradient averaging turns into exactly
            the single-process gradient; the same holds for HVPs (the gather is differentiable twice).
        precision: ``"ieee"`` (default) or ``"tf32"``: the fp32 dot products of the Triton kernels.
            The default is exact fp32 (rel. error < 1e-5 vs fp64); ``"tf32"`` (~3e-4) is a speed
            option for A100/H100 that has not been measured on a GPU in this repository. 16-bit
            inputs always use their own tensor-core dots; the torch path ignores it (it follows
            ``torch.backends.cuda.matmul.allow_tf32``).
        check_finite: if True, raise ``ValueError`` when ``z`` contains NaN or inf (costs one
            reduction and a host sync, and a graph break under ``torch.compile``; off by default).

    Drop-in mapping:

    * lightly ``NTXentLoss(temperature, gather_distributed=g)(out0, out1)`` is
      ``nt_xent(out0, out1, temperature=temperature, gather=g)`` (same value on one process), or
      :class:`NTXentLoss` with lightly's own arguments.
    * solo-learn ``simclr_loss_func(z, indexes, temperature)`` with ``z = cat(views)`` and
      ``indexes = arange(B).repeat(m)`` is ``nt_xent(z, temperature=temperature, views=m,
      gather=True)`` for ``m = 2``. For ``m > 2`` solo-learn puts the sum over positives inside the
      log; this loss (docs/design.md §2.1) averages the log-probabilities of the positives.

    Raises:
        TypeError: non-tensor or non-floating ``z``, non-real temperature, non-int views.
        ValueError: ``z`` not 2-D or empty, ``N`` not divisible by ``views``, ``temperature <= 0``,
            mismatched ``z0``/``z1``, bad ``precision``, non-finite values with ``check_finite=True``.
    """
    z, tau, m = parse_nt_xent_args(z, rest, temperature, views)
    precision = _check_precision(precision)
    if check_finite:
        _check_finite("z", z)
    name = _resolve(backend, z)
    if gather:
        z = gather_views(z, m)
    return _loss(z, tau, m, name, precision)


class NTXentLoss(nn.Module):
    """Drop-in ``nn.Module`` for lightly's ``NTXentLoss`` on :func:`nt_xent`.

    ``NTXentLoss(temperature=0.5, memory_bank_size=0, gather_distributed=False)`` takes lightly's
    arguments, in lightly's order, so replacing the import is the whole change; ``views``,
    ``backend``, ``precision`` and ``check_finite`` (keyword-only) are :func:`nt_xent`'s.
    ``forward(out0, out1)`` with ``[B, D]`` each, or ``forward(z)`` with view-major
    ``z [views*B, D]``; returns the scalar loss (lightly's value).

    ``memory_bank_size`` must be 0 (or a ``(0, dim)`` tuple, lightly's other spelling of "no memory
    bank"): MoCo-style negatives kept from earlier batches are not implemented. With
    ``gather_distributed=True`` every rank's rows are all-gathered and each rank returns the loss of
    the global batch; lightly returns its own rows' share, whose average over ranks is that value,
    and the gradients that reach each rank are the same (see ``gather`` in :func:`nt_xent`).
    """

    def __init__(
        self,
        temperature: float = 0.5,
        memory_bank_size: int | tuple[int, int] = 0,
        gather_distributed: bool = False,
        *,
        views: int = 2,
        backend: str = "auto",
        precision: str = "ieee",
        check_finite: bool = False,
    ) -> None:
        super().__init__()
        self.temperature = check_positive("temperature", temperature)
        bank = memory_bank_size if isinstance(memory_bank_size, (tuple, list)) else (memory_bank_size,)
        if not bank or not isinstance(bank[0], int) or isinstance(bank[0], bool) or bank[0] != 0:
            raise ValueError(f"memory_bank_size must be 0 (no memory bank), got {memory_bank_size!r}: "
                             "bissl_fast's NTXentLoss has no MoCo-style memory bank of earlier batches' negatives")
        self.views = check_int_at_least("views", views, 2)
        self.backend = backend
        self.gather_distributed = bool(gather_distributed)
        self.precision = _check_precision(precision)
        self.check_finite = bool(check_finite)

    def forward(self, z: torch.Tensor, z1: torch.Tensor | None = None) -> torch.Tensor:
        tensors = (z,) if z1 is None else (z, z1)
        return nt_xent(
            *tensors,
            temperature=self.temperature,
            views=self.views,
            backend=self.backend,
            gather=self.gather_distributed,
            precision=self.precision,
            check_finite=self.check_finite,
        )

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, views={self.views}, backend={self.backend!r}, "
                f"gather_distributed={self.gather_distributed}")
