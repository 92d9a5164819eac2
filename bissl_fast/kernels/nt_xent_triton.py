"""Triton kernels for the masked log-sum-exp term of NT-Xent (docs/design.md §2.1), flash-attention style.

For unit rows ``u`` (``[N, D]``), ``s_ij = u_i . u_j / tau`` with the diagonal excluded, and per-row
weights ``c`` (the incoming gradient of ``lse``), the three kernels compute

* forward:          ``lse_i = log sum_{j != i} exp(s_ij)`` (online log-sum-exp over column tiles);
* backward:         ``dU = (1/tau) (C P + P^T C) U`` with ``P_ij = exp(s_ij - lse_i)``, ``C = diag(c)``;
* double backward:  pass 1 ``r_i = sum_j P_ij Q_ij`` (``Q = W U^T + U W^T``), pass 2
  ``(1/tau) (C P + P^T C) W + (1/tau^2) (E + E^T) U`` with ``E_ij = c_i P_ij (Q_ij - r_i)``.

Every program owns a block of ``BLOCK_M`` rows and streams over all column tiles; since ``s`` is
symmetric, the transposed probabilities ``P_ji = exp(s_ij - lse_j)`` are available in the same tile,
so each output row block is written by exactly one program (no atomics, no ``N x N`` buffer).
Two kernel families: for ``D`` padded to a power of two ``<= 256`` the "resident" kernels hold a
program's ``[BLOCK_M, D]`` rows for the whole sweep and load each ``[BLOCK_N, D]`` column block
once for both the logits dot and the probability-value dot; wider rows use the K-loop kernels,
which read ``D`` in chunks of ``BLOCK_K`` and split outputs over a second grid axis in chunks of
``BLOCK_DO``. Accumulation is fp32;
fp32 dots use ``input_precision`` "ieee" or "tf32"; with fp16/bf16 inputs the logits dots run in
the input dtype and the probability-value dots in bf16 (see ``_pv_dot``).

This module imports triton, so it is only imported when a Triton launch is requested.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._alloc import empty_output
from .._backends import triton_interpret_mode

#: Running-max start value: finite so a tile whose entries are all masked (-inf) gives
#: exp(-inf - NEG_START) = 0 instead of exp(-inf + inf) = NaN.
_NEG_START = tl.constexpr(-1.0e30)


def _configs() -> list[triton.Config]:
    if triton_interpret_mode():
        # The interpreter runs each program in numpy: one small tile keeps the CPU tests fast
        # and makes every test shape span several row and column tiles.
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    # Tiles for A100 (sm_80) / H100 (sm_90); the autotuner keeps the fastest per (N, D, dtype).
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in (
            (64, 64, 4, 2),
            (64, 64, 4, 3),
            (64, 128, 4, 3),
            (128, 64, 4, 3),
            (128, 64, 8, 3),
            (128, 128, 8, 2),
            (128, 128, 8, 3),
            (64, 32, 4, 4),
            (64, 64, 8, 2),
            (64, 128, 8, 2),
        )
    ]


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation.

    ``UPCAST`` is set only under TRITON_INTERPRET=1 for bf16 operands: the interpreter multiplies
    the raw bf16 bit patterns in ``tl.dot`` (triton-lang/triton#11584), so there the already
    bf16-rounded operands are widened to fp32 first. Compiled kernels never take that branch.
    """
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _pv_dot(p, v, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr, PV_BF16: tl.constexpr):
    """``acc + p @ v`` for a probability-weight tile ``p`` (fp32) and a value tile ``v`` (rows of U or W).

    With 16-bit inputs ``p`` goes to the tensor cores in 16 bits. Its entries are ``c_i P_ij``, of
    order ``1/N^2`` for the loss (``c = 1/N``), far below fp16's smallest subnormal (6e-8) at
    large ``N``, so for fp16 and bf16 inputs the product runs in bf16 (fp32's exponent range).
    """
    if PV_BF16:
        return _dot(p.to(tl.bfloat16), v.to(tl.bfloat16), acc, PRECISION, UPCAST)
    return _dot(p.to(v.dtype), v, acc, PRECISION, UPCAST)


# ---- K-loop kernels (any D): dot products read D in BLOCK_K chunks and outputs are split over a
# second grid axis in BLOCK_DO chunks. Used for padded D > 256.


@triton.jit
def _scores(u_ptr, stride, rows, cols, row_ok, col_ok, D, inv_tau,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
            PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``[BLOCK_M, BLOCK_N]`` tile of ``u_rows . u_cols / tau`` in fp32."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        a = tl.load(u_ptr + rows[:, None] * stride + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(u_ptr + cols[:, None] * stride + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _dot(a, tl.trans(b), acc, PRECISION, UPCAST)
    return acc * inv_tau


@triton.jit
def _cross_scores(u_ptr, w_ptr, stride, rows, cols, row_ok, col_ok, D,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Tiles of ``s * tau = u_rows . u_cols`` and ``Q = w_rows . u_cols + u_rows . w_cols`` (fp32)."""
    s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    q = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        rmask = row_ok[:, None] & k_ok[None, :]
        cmask = col_ok[:, None] & k_ok[None, :]
        ua = tl.load(u_ptr + rows[:, None] * stride + ks[None, :], mask=rmask, other=0.0)
        ub = tl.load(u_ptr + cols[:, None] * stride + ks[None, :], mask=cmask, other=0.0)
        wa = tl.load(w_ptr + rows[:, None] * stride + ks[None, :], mask=rmask, other=0.0)
        wb = tl.load(w_ptr + cols[:, None] * stride + ks[None, :], mask=cmask, other=0.0)
        s = _dot(ua, tl.trans(ub), s, PRECISION, UPCAST)
        q = _dot(wa, tl.trans(ub), q, PRECISION, UPCAST)
        q = _dot(ua, tl.trans(wb), q, PRECISION, UPCAST)
    return s, q


@triton.autotune(configs=_configs(), key=["N", "D"])
@triton.jit
def _lse_fwd_kernel(u_ptr, lse_ptr, N, D, stride, inv_tau,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    m_i = tl.full((BLOCK_M,), _NEG_START, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        s = _scores(u_ptr, stride, rows, cols, row_ok, col_ok, D, inv_tau, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, UPCAST)
        valid = col_ok[None, :] & (rows[:, None] != cols[None, :])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m_i = m_new
    tl.store(lse_ptr + rows, m_i + tl.log(l_i), mask=row_ok)


@triton.jit
def _probabilities(s, rows, cols, row_ok, col_ok, lse_ptr, c_ptr):
    """Weighted row- and column-softmax tiles ``c_i P_ij`` and ``c_j P_ji`` (diagonal and padding 0)."""
    lse_r = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    lse_c = tl.load(lse_ptr + cols, mask=col_ok, other=0.0)
    c_r = tl.load(c_ptr + rows, mask=row_ok, other=0.0)
    c_c = tl.load(c_ptr + cols, mask=col_ok, other=0.0)
    valid = row_ok[:, None] & col_ok[None, :] & (rows[:, None] != cols[None, :])
    p_row = tl.where(valid, tl.exp(s - lse_r[:, None]), 0.0)
    p_col = tl.where(valid, tl.exp(s - lse_c[None, :]), 0.0)
    return p_row, p_col, c_r, c_c


@triton.autotune(configs=_configs(), key=["N", "D"])
@triton.jit
def _lse_bwd_kernel(u_ptr, lse_ptr, c_ptr, out_ptr, N, D, stride, inv_tau,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    BLOCK_DO: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                    PV_BF16: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    ds = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    d_ok = ds < D
    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        s = _scores(u_ptr, stride, rows, cols, row_ok, col_ok, D, inv_tau, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, UPCAST)
        p_row, p_col, c_r, c_c = _probabilities(s, rows, cols, row_ok, col_ok, lse_ptr, c_ptr)
        a = c_r[:, None] * p_row + c_c[None, :] * p_col
        u_cols = tl.load(u_ptr + cols[:, None] * stride + ds[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = _pv_dot(a, u_cols, acc, PRECISION, UPCAST, PV_BF16)
    out = acc * inv_tau
    tl.store(out_ptr + rows[:, None] * stride + ds[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


@triton.autotune(configs=_configs(), key=["N", "D"])
@triton.jit
def _lse_bwd_bwd_r_kernel(u_ptr, w_ptr, lse_ptr, r_ptr, N, D, stride, inv_tau,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    lse_r = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    r = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        s, q = _cross_scores(u_ptr, w_ptr, stride, rows, cols, row_ok, col_ok, D,
                             BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, UPCAST)
        valid = row_ok[:, None] & col_ok[None, :] & (rows[:, None] != cols[None, :])
        p_row = tl.where(valid, tl.exp(s * inv_tau - lse_r[:, None]), 0.0)
        r += tl.sum(p_row * q, axis=1)
    tl.store(r_ptr + rows, r, mask=row_ok)


@triton.autotune(configs=_configs(), key=["N", "D"])
@triton.jit
def _lse_bwd_bwd_kernel(u_ptr, w_ptr, lse_ptr, c_ptr, r_ptr, out_ptr, N, D, stride, inv_tau,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_DO: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                        PV_BF16: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    ds = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    d_ok = ds < D
    r_r = tl.load(r_ptr + rows, mask=row_ok, other=0.0)
    # One accumulator for both products (scales folded into the tiles) halves the registers.
    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        s, q = _cross_scores(u_ptr, w_ptr, stride, rows, cols, row_ok, col_ok, D,
                             BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, UPCAST)
        p_row, p_col, c_r, c_c = _probabilities(s * inv_tau, rows, cols, row_ok, col_ok, lse_ptr, c_ptr)
        r_c = tl.load(r_ptr + cols, mask=col_ok, other=0.0)
        wp_row = c_r[:, None] * p_row
        wp_col = c_c[None, :] * p_col
        # A = C P + P^T C multiplies W / tau; E + E^T (E_ij = c_i P_ij (Q_ij - r_i)) multiplies U / tau^2.
        a = (wp_row + wp_col) * inv_tau
        e = (wp_row * (q - r_r[:, None]) + wp_col * (q - r_c[None, :])) * (inv_tau * inv_tau)
        cmask = col_ok[:, None] & d_ok[None, :]
        w_cols = tl.load(w_ptr + cols[:, None] * stride + ds[None, :], mask=cmask, other=0.0)
        u_cols = tl.load(u_ptr + cols[:, None] * stride + ds[None, :], mask=cmask, other=0.0)
        acc = _pv_dot(a, w_cols, acc, PRECISION, UPCAST, PV_BF16)
        acc = _pv_dot(e, u_cols, acc, PRECISION, UPCAST, PV_BF16)
    tl.store(out_ptr + rows[:, None] * stride + ds[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


# ---- Resident-row kernels (padded D <= 256): each program loads its [BLOCK_M, D] rows once and
# every [BLOCK_N, D] column block once per tile, which serves both the logits dot and the
# probability-value dot. Compiled for sm_90 these kernels do not spill at D = 128 (the K-loop
# kernels above do), so they are used whenever D fits.


@triton.jit
def _load_rows(ptr, idx, ok, ds, d_ok, stride):
    return tl.load(ptr + idx[:, None] * stride + ds[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)


@triton.autotune(configs=_configs(), key=["N", "D"])
@triton.jit
def _lse_fwd_resident_kernel(u_ptr, lse_ptr, N, D, stride, inv_tau,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                             PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    ds = tl.arange(0, BLOCK_D)
    d_ok = ds < D
    u_rows = _load_rows(u_ptr, rows, row_ok, ds, d_ok, stride)
    m_i = tl.full((BLOCK_M,), _NEG_START, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        u_cols = _load_rows(u_ptr, cols, col_ok, ds, d_ok, stride)
        s = _dot(u_rows, tl.trans(u_cols), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), PRECISION, UPCAST)
        s = tl.where(col_ok[None, :] & (rows[:, None] != cols[None, :]), s * inv_tau, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m_i = m_new
    tl.store(lse_ptr + rows, m_i + tl.log(l_i), mask=row_ok)


@triton.autotune(configs=_configs(), key=["N", "D"])
@triton.jit
def _lse_bwd_resident_kernel(u_ptr, lse_ptr, c_ptr, out_ptr, N, D, stride, inv_tau,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                             PRECISION: tl.constexpr, UPCAST: tl.constexpr, PV_BF16: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    ds = tl.arange(0, BLOCK_D)
    d_ok = ds < D
    u_rows = _load_rows(u_ptr, rows, row_ok, ds, d_ok, stride)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        u_cols = _load_rows(u_ptr, cols, col_ok, ds, d_ok, stride)
        s = _dot(u_rows, tl.trans(u_cols), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), PRECISION, UPCAST)
        p_row, p_col, c_r, c_c = _probabilities(s * inv_tau, rows, cols, row_ok, col_ok, lse_ptr, c_ptr)
        acc = _pv_dot(c_r[:, None] * p_row + c_c[None, :] * p_col, u_cols, acc, PRECISION, UPCAST, PV_BF16)
    tl.store(out_ptr + rows[:, None] * stride + ds[None, :], (acc * inv_tau).to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


@triton.autotune(configs=_configs(), key=["N", "D"])
@triton.jit
def _lse_bwd_bwd_r_resident_kernel(u_ptr, w_ptr, lse_ptr, r_ptr, N, D, stride, inv_tau,
                                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                                   PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    ds = tl.arange(0, BLOCK_D)
    d_ok = ds < D
    u_rows = _load_rows(u_ptr, rows, row_ok, ds, d_ok, stride)
    w_rows = _load_rows(w_ptr, rows, row_ok, ds, d_ok, stride)
    lse_r = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    r = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        u_cols = _load_rows(u_ptr, cols, col_ok, ds, d_ok, stride)
        w_cols = _load_rows(w_ptr, cols, col_ok, ds, d_ok, stride)
        zero = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        s = _dot(u_rows, tl.trans(u_cols), zero, PRECISION, UPCAST)
        q = _dot(u_rows, tl.trans(w_cols), _dot(w_rows, tl.trans(u_cols), zero, PRECISION, UPCAST), PRECISION, UPCAST)
        valid = row_ok[:, None] & col_ok[None, :] & (rows[:, None] != cols[None, :])
        r += tl.sum(tl.where(valid, tl.exp(s * inv_tau - lse_r[:, None]), 0.0) * q, axis=1)
    tl.store(r_ptr + rows, r, mask=row_ok)


@triton.autotune(configs=_configs(), key=["N", "D"])
@triton.jit
def _lse_bwd_bwd_resident_kernel(u_ptr, w_ptr, lse_ptr, c_ptr, r_ptr, out_ptr, N, D, stride, inv_tau,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                                 PRECISION: tl.constexpr, UPCAST: tl.constexpr, PV_BF16: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    ds = tl.arange(0, BLOCK_D)
    d_ok = ds < D
    u_rows = _load_rows(u_ptr, rows, row_ok, ds, d_ok, stride)
    w_rows = _load_rows(w_ptr, rows, row_ok, ds, d_ok, stride)
    r_r = tl.load(r_ptr + rows, mask=row_ok, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        u_cols = _load_rows(u_ptr, cols, col_ok, ds, d_ok, stride)
        w_cols = _load_rows(w_ptr, cols, col_ok, ds, d_ok, stride)
        zero = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        s = _dot(u_rows, tl.trans(u_cols), zero, PRECISION, UPCAST)
        q = _dot(u_rows, tl.trans(w_cols), _dot(w_rows, tl.trans(u_cols), zero, PRECISION, UPCAST), PRECISION, UPCAST)
        p_row, p_col, c_r, c_c = _probabilities(s * inv_tau, rows, cols, row_ok, col_ok, lse_ptr, c_ptr)
        r_c = tl.load(r_ptr + cols, mask=col_ok, other=0.0)
        wp_row = c_r[:, None] * p_row
        wp_col = c_c[None, :] * p_col
        # A = C P + P^T C multiplies W / tau; E + E^T (E_ij = c_i P_ij (Q_ij - r_i)) multiplies U / tau^2.
        acc = _pv_dot((wp_row + wp_col) * inv_tau, w_cols, acc, PRECISION, UPCAST, PV_BF16)
        e = (wp_row * (q - r_r[:, None]) + wp_col * (q - r_c[None, :])) * (inv_tau * inv_tau)
        acc = _pv_dot(e, u_cols, acc, PRECISION, UPCAST, PV_BF16)
    tl.store(out_ptr + rows[:, None] * stride + ds[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


#: Widest padded D the resident kernels take; wider rows use the K-loop kernels.
_RESIDENT_MAX_D = 256


def _block_sizes(d: int) -> tuple[int, int]:
    """``(BLOCK_K, BLOCK_DO)``: D padded to a power of two >= 16 (tl.dot's minimum), capped."""
    padded = max(16, triton.next_power_of_2(d))
    return min(padded, 64), min(padded, 256)


def _dot_options(precision: str, dtype: torch.dtype, pv: bool = False) -> dict[str, object]:
    """Constexpr options of the dots; ``pv`` adds ``PV_BF16`` for kernels with probability-value products."""
    half = dtype in (torch.float16, torch.bfloat16)
    options: dict[str, object] = {
        # input_precision only changes fp32 dots; 16-bit inputs always use their tensor-core path.
        "PRECISION": precision if dtype == torch.float32 else "ieee",
        "UPCAST": triton_interpret_mode() and (dtype == torch.bfloat16 or (pv and half)),
    }
    if pv:
        options["PV_BF16"] = half
    return options


def _resident_block(d: int) -> int | None:
    """Padded D for the resident kernels (a power of two >= 16, tl.dot's minimum), or None if too wide."""
    padded = max(16, triton.next_power_of_2(d))
    return padded if padded <= _RESIDENT_MAX_D else None


def lse_forward(u: torch.Tensor, inv_tau: float, precision: str) -> torch.Tensor:
    """``lse [N]`` (fp32) of the masked logits of contiguous ``u [N, D]``."""
    n, d = u.shape
    lse = empty_output(n, dtype=torch.float32, device=u.device)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]),)
    block_d = _resident_block(d)
    if block_d is not None:
        _lse_fwd_resident_kernel[grid](u, lse, n, d, u.stride(0), inv_tau, BLOCK_D=block_d,
                                       **_dot_options(precision, u.dtype))
    else:
        _lse_fwd_kernel[grid](u, lse, n, d, u.stride(0), inv_tau, BLOCK_K=_block_sizes(d)[0],
                              **_dot_options(precision, u.dtype))
    return lse


def lse_backward(u: torch.Tensor, lse: torch.Tensor, c: torch.Tensor, inv_tau: float, precision: str) -> torch.Tensor:
    """``(1/tau) (C P + P^T C) U`` as ``[N, D]`` in ``u.dtype``; ``lse, c`` are fp32 ``[N]``."""
    n, d = u.shape
    out = empty_output(n, d, dtype=u.dtype, device=u.device)
    options = _dot_options(precision, u.dtype, pv=True)
    block_d = _resident_block(d)
    if block_d is not None:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]),)
        _lse_bwd_resident_kernel[grid](u, lse, c, out, n, d, u.stride(0), inv_tau, BLOCK_D=block_d, **options)
    else:
        block_k, block_do = _block_sizes(d)
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(d, block_do))
        _lse_bwd_kernel[grid](u, lse, c, out, n, d, u.stride(0), inv_tau, BLOCK_K=block_k, BLOCK_DO=block_do,
                              **options)
    return out


def lse_double_backward(
    u: torch.Tensor, lse: torch.Tensor, c: torch.Tensor, w: torch.Tensor, inv_tau: float, precision: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cotangent ``w [N, D]`` of the backward's output -> ``(grad_u [N, D] in u.dtype, r [N] fp32)``.

    ``grad_c = r / tau`` is formed by the caller. ``u`` and ``w`` share dtype and are contiguous.
    """
    n, d = u.shape
    r = empty_output(n, dtype=torch.float32, device=u.device)
    out = empty_output(n, d, dtype=u.dtype, device=u.device)
    grid_rows = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]),)
    block_d = _resident_block(d)
    if block_d is not None:
        _lse_bwd_bwd_r_resident_kernel[grid_rows](u, w, lse, r, n, d, u.stride(0), inv_tau, BLOCK_D=block_d,
                                                  **_dot_options(precision, u.dtype))
        _lse_bwd_bwd_resident_kernel[grid_rows](u, w, lse, c, r, out, n, d, u.stride(0), inv_tau, BLOCK_D=block_d,
                                                **_dot_options(precision, u.dtype, pv=True))
        return out, r
    block_k, block_do = _block_sizes(d)
    _lse_bwd_bwd_r_kernel[grid_rows](u, w, lse, r, n, d, u.stride(0), inv_tau, BLOCK_K=block_k,
                                     **_dot_options(precision, u.dtype))
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(d, block_do))
    _lse_bwd_bwd_kernel[grid](u, w, lse, c, r, out, n, d, u.stride(0), inv_tau, BLOCK_K=block_k,
                              BLOCK_DO=block_do, **_dot_options(precision, u.dtype, pv=True))
    return out, r
