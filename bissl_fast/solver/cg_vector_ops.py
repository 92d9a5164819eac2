"""The vector operations of a CG or MINRES iteration, over a list of tensors, per backend.

Every backend implements, for lists of same-shaped tensors (one per parameter), per-tensor CG
scalars held in float64 device tensors of shape ``[T]`` and global MINRES scalars (Python floats):

- ``dot(a, b) -> [T]``: per-tensor dot products ``a_t . b_t``;
- ``dot_pair(a, b, c) -> [2, T]``: ``a_t . b_t`` and ``a_t . c_t`` in one pass over ``a``;
- ``update(x, r, d, ad, alpha) -> [T]``: ``x_t += alpha_t d_t``, ``r_t -= alpha_t ad_t`` in place,
  returning the new ``r_t . r_t`` (computed in the same pass by the fused kernels);
- ``direction(d, r, beta)``: ``d_t = r_t + beta_t d_t`` in place;
- ``lanczos(r1, av, r2, c1, c2) -> [T]``: ``r1_t = av_t - c1 r1_t - c2 r2_t`` in place (MINRES's
  next Lanczos vector), returning the new ``r1_t . r1_t``;
- ``minres_update(w1, x, v, w2, y, oldeps, delta, gamma_inv, phi, beta_inv)``: in place,
  ``w1_t = (v_t - oldeps w1_t - delta w2_t) gamma_inv``, ``x_t += phi w1_t``, ``v_t = y_t beta_inv``.

The tensors written in place are buffers owned by the solver (created by it, never seen by
autograd), which is why the kernels may write them.

Backends:
- ``"torch"``: ``torch._foreach_*`` ops; dots are ``(a * b).sum()`` per tensor, the reference's
  expression, so this path reproduces :func:`bissl_fast.reference.cg_solve` to the last bit up to
  the float64 arithmetic of the scalars.
- ``"cpp"`` / ``"cuda"``: the fused kernels ``torch.ops.bissl_fast.cg_dot / cg_dot_pair /
  cg_update / cg_direction / minres_lanczos / minres_update`` (``csrc/cpu/cg_cpu.cpp``,
  ``csrc/cuda/cg_cuda_kernels.cu``), one call each over all tensors. They accumulate dot products in float64 in fixed-size chunks (summation order differs
  from torch's, the results are deterministic and at least as accurate); the element updates are
  the same expressions (on CUDA the compiler may contract ``x + a*d`` into one FMA, a difference of
  at most one rounding per element). Against the float32 reference loop this stays far inside
  the 1e-5 relative tolerance over the paper's 5 iterations.
"""
from __future__ import annotations

from typing import Protocol

import torch

from .._backends import extension, resolve_backend
from .._types import Tensors

_KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class VectorOps(Protocol):
    name: str

    def dot(self, a: Tensors, b: Tensors) -> torch.Tensor: ...

    def update(self, x: Tensors, r: Tensors, d: Tensors, ad: Tensors, alpha: torch.Tensor) -> torch.Tensor: ...

    def direction(self, d: Tensors, r: Tensors, beta: torch.Tensor) -> None: ...

    def dot_pair(self, a: Tensors, b: Tensors, c: Tensors) -> torch.Tensor: ...

    def lanczos(self, r1: Tensors, av: Tensors, r2: Tensors, c1: float, c2: float) -> torch.Tensor: ...

    def minres_update(self, w1: Tensors, x: Tensors, v: Tensors, w2: Tensors, y: Tensors, oldeps: float,
                      delta: float, gamma_inv: float, phi: float, beta_inv: float) -> None: ...


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

    def dot_pair(self, a: Tensors, b: Tensors, c: Tensors) -> torch.Tensor:
        return torch.stack([self.dot(a, b), self.dot(a, c)])

    def lanczos(self, r1: Tensors, av: Tensors, r2: Tensors, c1: float, c2: float) -> torch.Tensor:
        # The reference's (av - c1 r1) - c2 r2, each product rounded to the storage type.
        y = torch._foreach_sub(list(av), torch._foreach_mul(list(r1), c1))
        torch._foreach_sub_(y, torch._foreach_mul(list(r2), c2))
        torch._foreach_copy_(list(r1), y)
        return self.dot(r1, r1)

    def minres_update(self, w1: Tensors, x: Tensors, v: Tensors, w2: Tensors, y: Tensors, oldeps: float,
                      delta: float, gamma_inv: float, phi: float, beta_inv: float) -> None:
        w = torch._foreach_sub(list(v), torch._foreach_mul(list(w1), oldeps))
        torch._foreach_sub_(w, torch._foreach_mul(list(w2), delta))
        torch._foreach_mul_(w, gamma_inv)
        torch._foreach_copy_(list(w1), w)
        torch._foreach_add_(list(x), torch._foreach_mul(list(w1), phi))
        torch._foreach_copy_(list(v), torch._foreach_mul(list(y), beta_inv))


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

    @torch.library.register_fake("bissl_fast::cg_dot_pair")
    def _dot_pair_fake(a: list[torch.Tensor], b: list[torch.Tensor], c: list[torch.Tensor]) -> torch.Tensor:
        return a[0].new_empty((2, len(a)), dtype=torch.float64)

    @torch.library.register_fake("bissl_fast::minres_lanczos")
    def _lanczos_fake(r1: list[torch.Tensor], av: list[torch.Tensor], r2: list[torch.Tensor], c1: float,
                      c2: float) -> torch.Tensor:
        return r1[0].new_empty((len(r1),), dtype=torch.float64)

    @torch.library.register_fake("bissl_fast::minres_update")
    def _minres_update_fake(w1: list[torch.Tensor], x: list[torch.Tensor], v: list[torch.Tensor],
                            w2: list[torch.Tensor], y: list[torch.Tensor], oldeps: float, delta: float,
                            gamma_inv: float, phi: float, beta_inv: float) -> None:
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

    def dot_pair(self, a: Tensors, b: Tensors, c: Tensors) -> torch.Tensor:
        return self._ops.cg_dot_pair(list(a), list(b), list(c))

    def lanczos(self, r1: Tensors, av: Tensors, r2: Tensors, c1: float, c2: float) -> torch.Tensor:
        return self._ops.minres_lanczos(list(r1), list(av), list(r2), c1, c2)

    def minres_update(self, w1: Tensors, x: Tensors, v: Tensors, w2: Tensors, y: Tensors, oldeps: float,
                      delta: float, gamma_inv: float, phi: float, beta_inv: float) -> None:
        self._ops.minres_update(list(w1), list(x), list(v), list(w2), list(y), oldeps, delta, gamma_inv, phi,
                                beta_inv)


def vector_ops(backend: str, tensors: Tensors) -> VectorOps:
    """Resolve ``backend`` for CG / MINRES vectors shaped like ``tensors`` (one device)."""
    fused_ok = len({t.dtype for t in tensors}) == 1 and tensors[0].dtype in _KERNEL_DTYPES
    if backend == "auto" and not fused_ok:
        return TorchOps()
    name = resolve_backend(backend, tensors[0].device, "cg")
    if name != "torch" and not fused_ok:
        raise TypeError(
            f"backend {name!r} needs all CG tensors in one dtype among {_KERNEL_DTYPES}, "
            f"got {sorted({str(t.dtype) for t in tensors})}; use backend='torch'"
        )
    return TorchOps() if name == "torch" else FusedOps(name)
