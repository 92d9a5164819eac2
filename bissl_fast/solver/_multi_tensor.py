"""The three vector operations of a CG iteration, over a list of tensors, per backend.

Every backend implements, for lists ``x, r, d, ad`` of same-shaped tensors (one per parameter)
and per-tensor scalars held in float64 device tensors of shape ``[T]``:

- ``dot(a, b) -> [T]``: per-tensor dot products ``a_t . b_t``;
- ``update(x, r, d, ad, alpha) -> [T]``: ``x_t += alpha_t d_t``, ``r_t -= alpha_t ad_t`` in place,
  returning the new ``r_t . r_t`` (computed in the same pass by the fused kernels);
- ``direction(d, r, beta)``: ``d_t = r_t + beta_t d_t`` in place.

``x``, ``r`` and ``d`` are buffers owned by the solver (created by it, never seen by autograd),
which is why the kernels may write them in place.

Backends:
- ``"torch"``: ``torch._foreach_*`` ops; dots are ``(a * b).sum()`` per tensor, the reference's
  expression, so this path reproduces :func:`bissl_fast.reference.cg_solve` to the last bit up to
  the float64 arithmetic of the scalars.
- ``"cpp"`` / ``"cuda"``: the fused kernels ``torch.ops.bissl_fast.cg_dot / cg_update /
  cg_direction`` (``csrc/cpu/cg_cpu.cpp``, ``csrc/cuda/cg_cuda_kernels.cu``), one call each over all
  tensors. They accumulate dot products in float64 in fixed-size chunks (summation order differs
  from torch's, the results are deterministic and at least as accurate); the element updates are
  the same expressions (on CUDA the compiler may contract ``x + a*d`` into one FMA, a difference of
  at most one rounding per element). Against the float32 reference loop this stays far inside
  the 1e-5 relative tolerance over the paper's 5 iterations.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from .._backends import BackendUnavailableError, extension, resolve_backend

Tensors = Sequence[torch.Tensor]

SUPPORTED = ("torch", "cpp", "cuda")
# cpp: one C++ call instead of ~6T small torch ops per iteration (measured in bench_solver.py).
AUTO_ORDER = {"cuda": ("cuda", "torch"), "cpu": ("cpp", "torch")}
_KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class VectorOps(Protocol):
    name: str

    def dot(self, a: Tensors, b: Tensors) -> torch.Tensor: ...

    def update(self, x: Tensors, r: Tensors, d: Tensors, ad: Tensors, alpha: torch.Tensor) -> torch.Tensor: ...

    def direction(self, d: Tensors, r: Tensors, beta: torch.Tensor) -> None: ...


def _scalars_like(s: torch.Tensor, ts: Tensors) -> list[torch.Tensor]:
    """Per-tensor 0-d scalars in each tensor's dtype (one cast when the dtypes agree)."""
    dtypes = {t.dtype for t in ts}
    if len(dtypes) == 1:
        return list(s.to(ts[0].dtype).unbind())
    return [si.to(t.dtype) for si, t in zip(s.unbind(), ts)]


class TorchOps:
    name = "torch"

    def dot(self, a: Tensors, b: Tensors) -> torch.Tensor:
        return torch.stack([(ai * bi).sum().to(torch.float64) for ai, bi in zip(a, b)])

    def update(self, x: Tensors, r: Tensors, d: Tensors, ad: Tensors, alpha: torch.Tensor) -> torch.Tensor:
        a = _scalars_like(alpha, d)
        torch._foreach_add_(list(x), torch._foreach_mul(list(d), a))
        torch._foreach_sub_(list(r), torch._foreach_mul(list(ad), a))
        return self.dot(r, r)

    def direction(self, d: Tensors, r: Tensors, beta: torch.Tensor) -> None:
        torch._foreach_mul_(list(d), _scalars_like(beta, d))
        torch._foreach_add_(list(d), list(r))


_fakes_registered = False


def _register_fakes() -> None:
    """Shape-only implementations, so the ops trace under torch.compile / FakeTensor mode."""
    global _fakes_registered
    if _fakes_registered:
        return

    @torch.library.register_fake("bissl_fast::cg_dot")
    def _dot_fake(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
        return a[0].new_empty((len(a),), dtype=torch.float64)

    @torch.library.register_fake("bissl_fast::cg_update")
    def _update_fake(x: list[torch.Tensor], r: list[torch.Tensor], d: list[torch.Tensor], ad: list[torch.Tensor],
                     alpha: torch.Tensor) -> torch.Tensor:
        return x[0].new_empty((len(x),), dtype=torch.float64)

    @torch.library.register_fake("bissl_fast::cg_direction")
    def _direction_fake(d: list[torch.Tensor], r: list[torch.Tensor], beta: torch.Tensor) -> None:
        return None

    _fakes_registered = True


class FusedOps:
    """The compiled multi-tensor kernels (CPU: C++ loop over chunks; CUDA: one launch per op)."""

    def __init__(self, name: str) -> None:
        self.name = name
        extension()
        _register_fakes()
        self._ops = torch.ops.bissl_fast

    def dot(self, a: Tensors, b: Tensors) -> torch.Tensor:
        return self._ops.cg_dot(list(a), list(b))

    def update(self, x: Tensors, r: Tensors, d: Tensors, ad: Tensors, alpha: torch.Tensor) -> torch.Tensor:
        return self._ops.cg_update(list(x), list(r), list(d), list(ad), alpha)

    def direction(self, d: Tensors, r: Tensors, beta: torch.Tensor) -> None:
        self._ops.cg_direction(list(d), list(r), beta)


def vector_ops(backend: str, tensors: Tensors) -> VectorOps:
    """Resolve ``backend`` for CG vectors shaped like ``tensors`` (one device)."""
    device = tensors[0].device
    fused_ok = len({t.dtype for t in tensors}) == 1 and tensors[0].dtype in _KERNEL_DTYPES
    if backend == "auto":
        name = resolve_backend("auto", device, SUPPORTED if fused_ok else ("torch",), AUTO_ORDER)
    else:
        name = resolve_backend(backend, device, SUPPORTED, AUTO_ORDER)
        if name == "cpp" and device.type != "cpu":
            raise BackendUnavailableError(f"backend 'cpp' runs on CPU tensors, got {device.type}; use 'cuda' or 'torch'")
        if name != "torch" and not fused_ok:
            raise TypeError(
                f"backend {name!r} needs all CG tensors in one dtype among {_KERNEL_DTYPES}, "
                f"got {sorted({str(t.dtype) for t in tensors})}; use backend='torch'"
            )
    return TorchOps() if name == "torch" else FusedOps(name)
