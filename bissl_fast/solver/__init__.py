"""Hessian operator, fused conjugate gradient, implicit gradient and spectrum estimates (docs/design.md §2.3).

- :class:`HessianOperator`: ``H`` of a pretext loss on a fixed batch as a reusable linear
  operator (graph built once, ``matvec``/``matmat``; paper-style recompute; forward-over-reverse).
- :func:`cg_solve` / :class:`CGInfo`: CG with the paper's numerics, warm start, tolerance, and
  fused multi-tensor vector updates (C++ on CPU, one CUDA launch per vector op on GPU).
- :class:`ImplicitGradient`: ``(I + H / (lam + damping)) x = v`` for the BiSSL upper level.
- :func:`top_eigenvalues` / :func:`check_damping`: Lanczos / power-iteration estimates.
"""
from .cg import CGInfo, cg_solve
from .hessian import HessianOperator
from .implicit import ImplicitGradient
from .spectrum import DampingReport, check_damping, top_eigenvalues

__all__ = [
    "CGInfo",
    "DampingReport",
    "HessianOperator",
    "ImplicitGradient",
    "cg_solve",
    "check_damping",
    "top_eigenvalues",
]
