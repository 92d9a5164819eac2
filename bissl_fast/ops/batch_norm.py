"""Fused BatchNorm (docs/design.md §2.3): forward, backward and double backward as three ops.

Every Hessian-vector product through a ResNet is a double backward through each of its BatchNorm
layers; PyTorch computes that double backward as a long composite of elementwise ops and
reductions, each a full pass over the activation. Here each op reads its inputs once for the
per-channel sums and once more to write its outputs:

    batch_norm_fwd(input, weight?, bias?, running_mean?, running_var?, training, momentum, eps)
        -> (out, save_mean, save_invstd, new_running_mean, new_running_var)
    batch_norm_bwd(grad_out, input, weight?, save_mean, save_invstd, training, output_mask)
        -> (grad_input, grad_weight, grad_bias)                       vjp of batch_norm_fwd
    batch_norm_dbwd(ggI?, ggW?, ggB?, grad_out, input, weight?, save_mean, save_invstd, training, output_mask)
        -> (grad_input, grad_grad_out, grad_weight)                   vjp of batch_norm_bwd

The forward is functional (it returns the updated running statistics and :func:`batch_norm`
copies them into the buffers, once per forward), so all three ops carry ``torch.library``
autograd formulas and fake kernels and pass ``torch.library.opcheck``. The chain is
differentiable twice; differentiating ``batch_norm_dbwd`` raises. Backends:

- ``"cpp"``: ``torch.ops.bissl_fast.batch_norm_*`` CPU kernels (``csrc/cpu/batch_norm_cpu.cpp``);
- ``"cuda"``: the same ops, CUDA kernels (``csrc/cuda/batch_norm_cuda_kernels.cu``);
- ``"torch"``: ``torch.nn.functional.batch_norm`` (PyTorch's own).

``backend="auto"`` picks ``cpp`` on CPU tensors and PyTorch's own kernels on CUDA tensors (the CUDA
kernels are opt-in, ``backend="cuda"``, until they are measured on a GPU).
Under ``torch.func`` transforms (the solver's ``fwd-rev`` products) the fused ops have no
forward-mode rule, so :func:`batch_norm` computes with PyTorch's ``batch_norm`` there: the same
function, evaluated by PyTorch.
"""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import Tensor

from .._backends import OP_BACKENDS, extension, resolve_backend
from .._validation import check_float_tensor
from ._registration import assume_constant_result
from .batch_norm_batching import register_batched_ops, register_batching_rules

SUPPORTED_BACKENDS = OP_BACKENDS["batch_norm"].supported

_OPS = ("batch_norm_fwd", "batch_norm_bwd", "batch_norm_dbwd")


def _acc_dtype(input: Tensor) -> torch.dtype:
    return torch.float64 if input.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Fake kernels (shapes and dtypes of the C++/CUDA ops)
# ---------------------------------------------------------------------------------------------


def _fake_fwd(input, weight, bias, running_mean, running_var, training, momentum, eps):
    c = input.shape[1]
    acc = _acc_dtype(input)
    update = training and running_mean is not None
    running_dtype = running_mean.dtype if running_mean is not None else acc
    running_shape = (c,) if update else (0,)
    return (
        torch.empty_like(input, memory_format=torch.contiguous_format),
        input.new_empty(c, dtype=acc),
        input.new_empty(c, dtype=acc),
        input.new_empty(running_shape, dtype=running_dtype),
        input.new_empty(running_shape, dtype=running_dtype),
    )


def _param_dtype(input: Tensor, weight: Tensor | None) -> torch.dtype:
    return weight.dtype if weight is not None else input.dtype


def _fake_bwd(grad_out, input, weight, save_mean, save_invstd, training, output_mask):
    c = input.shape[1]
    pd = _param_dtype(input, weight)
    return (
        torch.empty_like(input, memory_format=torch.contiguous_format) if output_mask[0] else input.new_empty(0),
        input.new_empty(c if output_mask[1] else 0, dtype=pd),
        input.new_empty(c if output_mask[2] else 0, dtype=pd),
    )


def _fake_dbwd(ggI, ggW, ggB, grad_out, input, weight, save_mean, save_invstd, training, output_mask):
    c = input.shape[1]
    full = lambda wanted: (  # noqa: E731
        torch.empty_like(input, memory_format=torch.contiguous_format) if wanted else input.new_empty(0)
    )
    return full(output_mask[0]), full(output_mask[1]), input.new_empty(c if output_mask[2] else 0, dtype=_param_dtype(input, weight))


# ---------------------------------------------------------------------------------------------
# Autograd: fwd's backward is bwd, bwd's backward is dbwd, dbwd's backward raises
# ---------------------------------------------------------------------------------------------


def _fwd_setup(ctx, inputs, output):
    input, weight, _bias, _rm, _rv, training, _momentum, _eps = inputs
    _out, save_mean, save_invstd, new_rm, new_rv = output
    # The statistics are by-products for the backward and the buffers, not differentiable outputs.
    ctx.mark_non_differentiable(save_mean, save_invstd, new_rm, new_rv)
    ctx.save_for_backward(input, weight, save_mean, save_invstd)
    ctx.training = training


def _fwd_backward(ctx, grad_out, *_stat_grads):
    input, weight, save_mean, save_invstd = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
    gx, gw, gb = torch.ops.bissl_fast.batch_norm_bwd(
        grad_out, input, weight, save_mean, save_invstd, ctx.training, mask
    )
    return (gx if mask[0] else None), (gw if mask[1] else None), (gb if mask[2] else None), None, None, None, None, None


def _bwd_setup(ctx, inputs, output):
    grad_out, input, weight, save_mean, save_invstd, training, output_mask = inputs
    ctx.save_for_backward(grad_out, input, weight, save_mean, save_invstd)
    ctx.training = training
    ctx.output_mask = tuple(output_mask)


def _cotangent(grad: Tensor | None, produced: bool) -> Tensor | None:
    """A cotangent of a ``batch_norm_bwd`` output, or None for an output that was masked out or unused."""
    if grad is None or not produced or grad.numel() == 0:
        return None
    return grad


def _bwd_backward(ctx, ggI, ggW, ggB):
    grad_out, input, weight, save_mean, save_invstd = ctx.saved_tensors
    produced = ctx.output_mask
    ggI, ggW, ggB = _cotangent(ggI, produced[0]), _cotangent(ggW, produced[1]), _cotangent(ggB, produced[2])
    need_input, need_grad_out = ctx.needs_input_grad[1], ctx.needs_input_grad[0]
    need_weight = ctx.needs_input_grad[2]
    if ggI is None and ggW is None and ggB is None:
        return None, None, None, None, None, None, None
    gi, gg, gw = torch.ops.bissl_fast.batch_norm_dbwd(
        ggI, ggW, ggB, grad_out, input, weight, save_mean, save_invstd, ctx.training,
        [need_input, need_grad_out, need_weight],
    )
    return (
        gg if need_grad_out else None,
        gi if need_input else None,
        gw if need_weight else None,
        None, None, None, None,
    )


def _dbwd_setup(ctx, inputs, output):
    pass


def _dbwd_backward(ctx, *grads):
    raise NotImplementedError(
        "batch_norm_dbwd is not differentiable: third derivatives of the fused BatchNorm are not implemented "
        "(use backend='torch' for them)"
    )


# ---------------------------------------------------------------------------------------------
# Registration (once, on first use of the C++/CUDA backend)
# ---------------------------------------------------------------------------------------------

_lock = threading.Lock()
_registered = False


def extension_ops() -> None:
    """Load the extension's ``torch.ops.bissl_fast.batch_norm_*`` and register their fake and autograd kernels
    and batching rules."""
    global _registered
    if _registered:
        return
    with _lock:
        if _registered:
            return
        extension()
        for name, fake in zip(_OPS, (_fake_fwd, _fake_bwd, _fake_dbwd)):
            torch.library.register_fake(f"bissl_fast::{name}", fake)
        torch.library.register_autograd("bissl_fast::batch_norm_fwd", _fwd_backward, setup_context=_fwd_setup)
        torch.library.register_autograd("bissl_fast::batch_norm_bwd", _bwd_backward, setup_context=_bwd_setup)
        torch.library.register_autograd("bissl_fast::batch_norm_dbwd", _dbwd_backward, setup_context=_dbwd_setup)
        register_batched_ops()
        register_batching_rules()
        _registered = True


@assume_constant_result
def _resolve(backend: str, device: torch.device) -> str:
    """The backend name for ``device``; registers the ops' fake/autograd kernels on first use."""
    name = resolve_backend(backend, device, "batch_norm")
    if name in ("cpp", "cuda"):
        extension_ops()
    return name


def _check_channel(name: str, t: Tensor | None, input: Tensor) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    c = input.shape[1]
    if t.shape != (c,):
        raise ValueError(f"{name} must have shape [C] = [{c}], got {tuple(t.shape)}")
    if t.device != input.device:
        raise ValueError(f"{name} must be on {input.device}, got {t.device}")
    allowed = {input.dtype, _acc_dtype(input)}
    if t.dtype not in allowed:
        raise TypeError(f"{name} must have dtype {input.dtype} or {_acc_dtype(input)}, got {t.dtype}")


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    backend: str = "auto",
) -> Tensor:
    """Batch normalization with the semantics and signature of ``torch.nn.functional.batch_norm``.

    Args:
        input: ``[N, C]``, ``[N, C, L]``, ``[N, C, H, W]`` (any ``[N, C, *]``), float32/float64/bfloat16/float16.
        running_mean, running_var: ``[C]`` buffers or None. In training they are updated in place, once,
            with ``momentum`` (the variance with the unbiased batch variance); in eval they normalize.
        weight, bias: ``[C]`` affine parameters or None.
        training: normalize with the batch statistics (biased variance) and update the buffers.
        momentum: the weight of the new batch statistic in the running average.
        eps: added to the variance before the square root.
        backend: ``"auto" | "torch" | "cpp" | "cuda"``.

    Per-channel tensors have the input's dtype, or float32 for a bfloat16/float16 input.

    Returns:
        The normalized ``input`` (same shape and dtype; contiguous on the fused backends).
        Differentiable twice w.r.t. ``input``, ``weight`` and ``bias``.
    """
    check_float_tensor("input", input)
    if input.dim() < 2:
        raise ValueError(f"input must be [N, C, *], got shape {tuple(input.shape)}")
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        _check_channel(name, t, input)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (both tensors or both None)")
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    if not training and running_mean is None:
        raise ValueError("eval mode (training=False) needs running_mean and running_var")
    if training and input.numel() // input.shape[1] == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(input.shape)}")
    if eps < 0 or (training and eps == 0):
        raise ValueError(f"eps must be positive in training and non-negative in eval, got {eps}")
    name = _resolve(backend, input.device)
    if name == "torch" or torch._C._are_functorch_transforms_active():
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    out, _mean, _invstd, new_rm, new_rv = torch.ops.bissl_fast.batch_norm_fwd(
        input, weight, bias, running_mean, running_var, training, float(momentum), float(eps)
    )
    if training and running_mean is not None:
        with torch.no_grad():
            running_mean.copy_(new_rm)
            running_var.copy_(new_rv)
    return out


__all__ = ["SUPPORTED_BACKENDS", "batch_norm", "extension_ops"]
