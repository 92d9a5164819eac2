"""Drop-in BatchNorm modules on the fused ops, and :func:`convert_batchnorm` for whole models.

:class:`BatchNorm1d` and :class:`BatchNorm2d` subclass ``torch.nn.BatchNorm1d/2d``: same
constructor (plus ``backend``), parameters, buffers, ``state_dict`` keys, ``load_state_dict``,
``repr`` and ``reset_*`` methods; only ``forward`` runs :func:`bissl_fast.ops.batch_norm.batch_norm`
(fused forward, backward and double backward; see docs/design.md §2.3).
"""
from __future__ import annotations

import warnings

from torch import Tensor, nn

from .ops.batch_norm import SUPPORTED_BACKENDS, batch_norm


def _check_backend(backend: str) -> str:
    if backend != "auto" and backend not in SUPPORTED_BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {SUPPORTED_BACKENDS}, got {backend!r}")
    return backend


class _FusedForward:
    """``torch.nn.modules.batchnorm._BatchNorm.forward`` with the fused ``batch_norm``."""

    backend: str

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        exponential_average_factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                exponential_average_factor = 1.0 / float(self.num_batches_tracked)
        # Batch statistics in training, and in eval when there are no buffers to normalize with.
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        # Buffers are passed only when they normalize (eval) or are tracked (training).
        use_buffers = not self.training or self.track_running_stats
        return batch_norm(
            input,
            self.running_mean if use_buffers else None,
            self.running_var if use_buffers else None,
            self.weight,
            self.bias,
            bn_training,
            exponential_average_factor,
            self.eps,
            backend=self.backend,
        )


class BatchNorm1d(_FusedForward, nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` on ``[N, C]`` or ``[N, C, L]`` inputs, with the fused kernels.

    Args: those of ``torch.nn.BatchNorm1d``, plus ``backend`` (``"auto" | "torch" | "cpp" | "cuda"``).
    """

    def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.backend = _check_backend(backend)


class BatchNorm2d(_FusedForward, nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` on ``[N, C, H, W]`` inputs, with the fused kernels.

    Args: those of ``torch.nn.BatchNorm2d``, plus ``backend`` (``"auto" | "torch" | "cpp" | "cuda"``).
    """

    def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.backend = _check_backend(backend)


_FUSED = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d}


def _convert_one(module: nn.Module, backend: str) -> None:
    # Swapping the class keeps the object, so parameters, buffers, hooks, the training flag and every
    # reference to the module stay as they are; only forward changes.
    module.__class__ = _FUSED[type(module)]
    module.backend = backend


def convert_batchnorm(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Make every ``nn.BatchNorm1d``/``nn.BatchNorm2d`` in ``model`` (``model`` included) run the fused kernels.

    Converts in place and returns ``model``. Parameters, buffers and ``state_dict`` keys are kept, so
    outputs, gradients and Hessian-vector products equal the PyTorch ones to rounding. Only modules of
    exactly those two classes are converted: subclasses with their own ``forward`` (e.g. timm's
    ``BatchNormAct2d``) and ``nn.SyncBatchNorm`` (its statistics are reduced across processes, which
    the fused kernels do not do) are left as they are, the latter with a warning.

    Args:
        model: any ``nn.Module`` (torchvision/timm ResNets, :class:`bissl_fast.train.models.SmallResNet`, ...).
        backend: ``"auto" | "torch" | "cpp" | "cuda"`` for the converted layers.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_backend(backend)
    sync = [name or "<model>" for name, m in model.named_modules() if isinstance(m, nn.SyncBatchNorm)]
    if sync:
        warnings.warn(
            f"convert_batchnorm leaves {len(sync)} SyncBatchNorm layer(s) unchanged ({', '.join(sync[:4])}"
            f"{', ...' if len(sync) > 4 else ''}): their statistics are reduced across processes, which the "
            "fused BatchNorm does not do",
            stacklevel=2,
        )
    for m in model.modules():
        if type(m) in _FUSED:
            _convert_one(m, backend)
        elif isinstance(m, _FusedForward):
            m.backend = backend
    return model


__all__ = ["BatchNorm1d", "BatchNorm2d", "convert_batchnorm"]
