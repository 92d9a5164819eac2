"""Triton kernels for the masked log-sum-exp term of NT-Xent (docs/design.md §2.1), flash-attention style.

For unit rows ``u`` (``[N, D]``), ``s_ij = u_i . u_j / tau`` with the diagonal excluded, and per-row
weights ``c`` (the incoming gradient of ``lse``), the kernels compute

* forward:          ``lse_i = log sum_{j != i} exp(s_ij)`` (online log-sum-exp over column tiles);
* backward:         ``dU = (1/tau) (C P + P^T C) U`` with ``P_ij = exp(s_ij - lse_i)``, ``C = diag(c)``;
* double backward:  pass 1 ``r_i = sum_j P_ij Q_ij`` (``Q = W U^T + U W^T``), pass 2
  ``(1/tau) (C P + P^T C) W + (1/tau^2) (E + E^T) U`` with ``E_ij = c_i P_ij (Q_ij - r_i)``.

Every program owns a block of ``BLOCK_M`` rows and streams over all column tiles of ``BLOCK_N``
columns; since ``s`` is symmetric, the transposed probabilities ``P_ji = exp(s_ij - lse_j)`` are
available in the same tile, so each output row block is written by exactly one program (no atomics,
no ``N x N`` buffer). Two kernel families: the "resident" kernels hold a program's ``[BLOCK_M, D]``
rows (``D`` padded to ``BLOCK_D``) for the whole sweep and load each ``[BLOCK_N, D]`` column block
once for both the logits dot and the probability-value dot; the K-loop kernels read ``D`` in chunks
of ``BLOCK_K`` and split outputs over a second grid axis in chunks of ``BLOCK_DO``. The backward and
double backward take ``k`` weight vectors / cotangents in one launch on a third grid axis (batched
Hessian-vector products; one vector when its size is 1): each vector's programs recompute their
logits and probability tiles (the tiles of different vectors share only the cache). Which family,
block widths and tiles a launch uses is decided in ``nt_xent_triton.py`` (the routes).
Accumulation is fp32; fp32 dots use ``input_precision`` "ieee" or "tf32"; with fp16/bf16 inputs the
logits dots run in the input dtype and the probability-value dots in bf16 (see ``_pv_dot``).

This module imports triton, so it is only imported when a Triton launch is requested.
"""
from __future__ import annotations

import triton
import triton.language as tl

#: The kernels the launchers call. They do not specialize on N, which only bounds loops and masks:
#: one compile per route serves every batch size (docs/design.md §2.1).
_launched = triton.jit(do_not_specialize=["N"])

#: Running-max start value: finite so a tile whose entries are all masked (-inf) gives
#: exp(-inf - NEG_START) = 0 instead of exp(-inf + inf) = NaN.
_NEG_START = tl.constexpr(-1.0e30)


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
# second grid axis in BLOCK_DO chunks. The routes use them for padded D > 256 and, at every D, for
# exact fp32 dots (FMA loops, whose operands ptxas must hold for a whole K chunk).


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


@_launched
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
def _tangent(ptr, batch_stride):
    """``ptr`` advanced to vector ``program_id(2)`` of a batched launch (``k`` weight vectors or cotangents
    at ``batch_stride`` elements apart; a stride of 0 for an argument all vectors share)."""
    return ptr + tl.program_id(2).to(tl.int64) * batch_stride


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


@_launched
def _lse_bwd_kernel(u_ptr, lse_ptr, c_ptr, out_ptr, N, D, stride, inv_tau, c_batch, out_batch,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    BLOCK_DO: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                    PV_BF16: tl.constexpr):
    c_ptr, out_ptr = _tangent(c_ptr, c_batch), _tangent(out_ptr, out_batch)
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


@_launched
def _lse_bwd_bwd_r_kernel(u_ptr, w_ptr, lse_ptr, r_ptr, N, D, stride, inv_tau, w_batch, r_batch,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    w_ptr, r_ptr = _tangent(w_ptr, w_batch), _tangent(r_ptr, r_batch)
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


@_launched
def _lse_bwd_bwd_kernel(u_ptr, w_ptr, lse_ptr, c_ptr, r_ptr, out_ptr, N, D, stride, inv_tau, w_batch, c_batch,
                        r_batch, out_batch,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_DO: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                        PV_BF16: tl.constexpr):
    w_ptr, c_ptr = _tangent(w_ptr, w_batch), _tangent(c_ptr, c_batch)
    r_ptr, out_ptr = _tangent(r_ptr, r_batch), _tangent(out_ptr, out_batch)
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


# ---- Resident-row kernels (padded D <= 256, tensor-core dots): each program loads its [BLOCK_M, D]
# rows once and every [BLOCK_N, D] column block once per tile, which serves both the logits dot and
# the probability-value dot.


@triton.jit
def _load_rows(ptr, idx, ok, ds, d_ok, stride):
    return tl.load(ptr + idx[:, None] * stride + ds[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)


@_launched
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


@_launched
def _lse_bwd_resident_kernel(u_ptr, lse_ptr, c_ptr, out_ptr, N, D, stride, inv_tau, c_batch, out_batch,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                             PRECISION: tl.constexpr, UPCAST: tl.constexpr, PV_BF16: tl.constexpr):
    c_ptr, out_ptr = _tangent(c_ptr, c_batch), _tangent(out_ptr, out_batch)
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


@_launched
def _lse_bwd_bwd_r_resident_kernel(u_ptr, w_ptr, lse_ptr, r_ptr, N, D, stride, inv_tau, w_batch, r_batch,
                                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                                   PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    w_ptr, r_ptr = _tangent(w_ptr, w_batch), _tangent(r_ptr, r_batch)
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


@_launched
def _lse_bwd_bwd_resident_kernel(u_ptr, w_ptr, lse_ptr, c_ptr, r_ptr, out_ptr, N, D, stride, inv_tau, w_batch,
                                 c_batch, r_batch, out_batch,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                                 PRECISION: tl.constexpr, UPCAST: tl.constexpr, PV_BF16: tl.constexpr):
    w_ptr, c_ptr = _tangent(w_ptr, w_batch), _tangent(c_ptr, c_batch)
    r_ptr, out_ptr = _tangent(r_ptr, r_batch), _tangent(out_ptr, out_batch)
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


