"""Hessian operator, fused conjugate gradient, implicit gradient and spectrum estimates (docs/design.md §2.3).

- :class:`HessianOperator`: ``H`` of a pretext loss on a fixed batch as a reusable linear
  operator (graph built once, ``matvec``/``matmat``; paper-style recompute; forward-over-reverse).
- :func:`cg_solve` / :class:`CGInfo`: CG with the paper's numerics, warm start, tolerance, and
  fused multi-tensor vector updates (C++ on CPU, one CUDA launch per vector op on GPU).
- :func:`minres_solve` / :class:`MINRESInfo`: MINRES (symmetric, possibly indefinite systems; the
  residual never grows), same calling convention and fused vector updates.
- :class:`ImplicitGradient`: ``(I + H / (lam + damping)) x = v`` for the BiSSL upper level, by CG or
  MINRES, with a :class:`SolveReport` of each solve's quality.
- :func:`top_eigenvalues` / :func:`check_damping`: Lanczos / power-iteration estimates.
"""
from .cg import CGInfo, cg_solve
from .hessian import HessianOperator
from .implicit import ImplicitGradient, SolveReport
from .minres import MINRESInfo, minres_solve
from .spectrum import DampingReport, check_damping, top_eigenvalues

__all__ = [
    "CGInfo",
    "DampingReport",
    "HessianOperator",
    "ImplicitGradient",
    "MINRESInfo",
    "SolveReport",
    "cg_solve",
    "check_damping",
    "minres_solve",
    "top_eigenvalues",
]
