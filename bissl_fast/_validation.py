"""Input checks shared by every public function: clear errors that name the argument."""
from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch


def check_float_tensor(name: str, t: object, ndim: int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype (float32/float64/bfloat16/float16), got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
    return t


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        raise ValueError(f"all tensors must be on one device, got {devices}")
    return first


def check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"shapes must match, got {shapes}")


def check_positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def check_nonnegative(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def check_int_at_least(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_finite(name: str, t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf values")


def check_tensor_tuple(name: str, ts: object, like: Sequence[torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
    """A non-empty tuple/list of floating tensors, shaped like ``like`` when given."""
    if isinstance(ts, torch.Tensor) or not isinstance(ts, (tuple, list)):
        raise TypeError(f"{name} must be a tuple or list of tensors, got {type(ts).__name__}")
    if len(ts) == 0:
        raise ValueError(f"{name} must not be empty")
    for i, t in enumerate(ts):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name}[{i}] must have a floating dtype, got {t.dtype}")
    if like is not None:
        if len(ts) != len(like):
            raise ValueError(f"{name} must have {len(like)} tensors (one per parameter), got {len(ts)}")
        for i, (t, p) in enumerate(zip(ts, like)):
            if t.shape != p.shape:
                raise ValueError(f"{name}[{i}] must have shape {tuple(p.shape)}, got {tuple(t.shape)}")
    return tuple(ts)


def parse_nt_xent_args(
    z: object, rest: tuple, temperature: float | None, views: int
) -> tuple[torch.Tensor, float, int]:
    """Normalize the two call forms of NT-Xent to ``(z [N, D], temperature, views)``.

    ``nt_xent(z, temperature, views=m)`` with ``z`` view-major ``[m*B, D]``, or
    ``nt_xent(z0, z1, temperature)`` with ``z0, z1`` of shape ``[B, D]`` (same as ``cat([z0, z1])``, m=2).
    """
    if len(rest) > 2:
        raise TypeError(f"nt_xent takes at most 3 positional arguments, got {1 + len(rest)}")
    if rest and isinstance(rest[0], torch.Tensor):
        z0 = check_float_tensor("z0", z, ndim=2)
        z1 = check_float_tensor("z1", rest[0], ndim=2)
        check_same_shape(z0=z0, z1=z1)
        check_same_device(z0=z0, z1=z1)
        if z0.dtype != z1.dtype:
            raise TypeError(f"z0 and z1 must share a dtype, got {z0.dtype} and {z1.dtype}")
        if views != 2:
            raise ValueError(f"the two-tensor form is 2 views; got views={views}")
        if len(rest) == 2:
            if temperature is not None:
                raise TypeError("temperature given both positionally and by keyword")
            temperature = rest[1]
        z = torch.cat([z0, z1])
    else:
        z = check_float_tensor("z", z, ndim=2)
        if rest:
            if len(rest) == 2:
                raise TypeError("nt_xent(z, temperature) takes views by keyword")
            if temperature is not None:
                raise TypeError("temperature given both positionally and by keyword")
            temperature = rest[0]
    tau = check_positive("temperature", 0.5 if temperature is None else temperature)
    m = check_int_at_least("views", views, 2)
    if z.shape[0] % m != 0:
        raise ValueError(f"z has N={z.shape[0]} rows, which is not divisible by views={m} (N = views * B)")
    return z, tau, m


def check_size_pair(size: object) -> tuple[int, int]:
    """An image size ``(height, width)`` from an int or a pair of ints, each >= 1."""
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if not isinstance(size, (tuple, list)) or len(size) != 2:
        raise ValueError(f"size must be an int or a (height, width) pair, got {size!r}")
    return check_int_at_least("size[0]", size[0], 1), check_int_at_least("size[1]", size[1], 1)
