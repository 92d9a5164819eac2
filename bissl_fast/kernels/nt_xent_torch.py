"""Chunked PyTorch kernels for the masked log-sum-exp term of NT-Xent (``backend="torch"``).

The same three entry points, with the same signatures, as :mod:`bissl_fast.kernels.nt_xent_triton`
(see its docstring for the formulas), so the op layer dispatches to either module alike:

* ``lse_forward(u, inv_tau, precision) -> lse [N]``;
* ``lse_backward(u, lse, c, inv_tau, precision) -> (1/tau) (C P + P^T C) U``;
* ``lse_double_backward(u, lse, c, w, inv_tau, precision) -> (grad_u, r)``;
* ``lse_backward_batched`` and ``lse_double_backward_batched``: the same for ``k`` weight vectors
  ``c [k, N]`` or ``k`` cotangents ``w [k, N, D]`` at once (the batching rules of the ops, for batched
  Hessian-vector products). The probabilities are computed once and shared by every vector.

Up to ``_SINGLE_BLOCK_BYTES`` of logits (``N <= 2048`` in fp32) the whole ``N x N`` matrix is
one block: by the symmetry of the logits, the transposed probabilities ``P^T`` and the cross
term ``Q = A + A^T`` (``A = W U^T``) are transposes of what is already there, so the backward
needs one exponential pass and the double backward 4 GEMMs (instead of 8 over two passes).
Larger ``N`` streams over row blocks of ``[rows, N]`` (about ``_CHUNK_ELEMENTS`` entries each,
never the whole matrix), so memory stays O(N*D) beyond a fixed few MiB. Both compute in fp32
(fp64 for fp64 ``u``; 16-bit rows are widened) and return ``lse`` and ``r`` in that dtype and
``grad_u`` in ``u.dtype``. ``precision`` is accepted for the common signature and ignored: the
matmuls follow ``torch.backends.cuda.matmul.allow_tf32``.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from .._alloc import empty_output, empty_output_like

#: Elements of one ``[rows, N]`` logits block: 4 MiB of fp32, so a handful of live blocks stays
#: far below one ``N x N`` matrix at the batch sizes where memory matters.
_CHUNK_ELEMENTS = 1 << 20

#: Largest ``N x N`` logits buffer handled as one block (16 MiB: N = 2048 in fp32). The single-block
#: kernels hold about five such buffers at once, the price of skipping the recomputations and
#: extra passes that row blocks need; beyond it memory matters more than those passes.
_SINGLE_BLOCK_BYTES = 16 << 20


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype these kernels compute in (and return ``lse``/``r`` in) for rows of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _single_block(u: torch.Tensor) -> bool:
    n = u.shape[0]
    return n * n * u.element_size() <= _SINGLE_BLOCK_BYTES


def _row_blocks(n: int) -> Iterator[tuple[int, int]]:
    """``(i0, i1)`` row ranges whose ``[i1 - i0, N]`` logits block has about ``_CHUNK_ELEMENTS`` entries."""
    rows = max(1, min(n, _CHUNK_ELEMENTS // n))
    for i0 in range(0, n, rows):
        yield i0, min(n, i0 + rows)


def _masked_logits(u: torch.Tensor, i0: int, i1: int, inv_tau: float) -> torch.Tensor:
    """Rows ``i0:i1`` of ``u u^T / tau`` with the diagonal set to -inf (excluded from every softmax)."""
    s = torch.mm(u[i0:i1] * inv_tau, u.T)  # scaling the [rows, D] operand saves a pass over [rows, N]
    s.diagonal(offset=i0).fill_(float("-inf"))
    return s


def _row_shift(lse: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lse - log|c|, sign(c))``, so that ``c_i P_ij = sign(c_i) exp(s_ij - shift_i)``.

    The weights' magnitudes ride in the exponent: each ``[rows, N]`` probability block costs a
    subtraction, an exp and a multiplication by the signs. A zero weight gives ``shift = +inf`` and
    a zero block row, never NaN (``s_ij`` is finite or ``-inf``). No branch on the values of ``c``,
    so ``torch.compile`` traces it without a graph break (``c`` is ``g/N`` for the loss, with the
    sign of the incoming gradient ``g``, and any sign in forward-mode products).
    """
    return lse - torch.log(c.abs()), torch.sign(c)


def _weighted_probabilities(
    s: torch.Tensor, shift: torch.Tensor, sign: torch.Tensor, i0: int, i1: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """For a logits row block (overwritten): ``c_i P_ij`` and, by symmetry of ``s``,
    ``c_j P_ji = c_j exp(s_ij - lse_j)``."""
    p_col = torch.sub(s, shift).exp_().mul_(sign)
    return s.sub_(shift[i0:i1, None]).exp_().mul_(sign[i0:i1, None]), p_col


def _weighted_row_probabilities(s: torch.Tensor, shift: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """``c_i P_ij`` of the full logits ``s`` (overwritten)."""
    return s.sub_(shift[:, None]).exp_().mul_(sign[:, None])


def _plus_transpose(m: torch.Tensor) -> torch.Tensor:
    """``m + m^T`` for a square matrix, as a new tensor. A contiguous copy of the transpose first:
    an elementwise op reading one operand transposed runs several times slower than both copies."""
    return m.T.contiguous().add_(m)


def _cross(u: torch.Tensor, w: torch.Tensor, i0: int, i1: int) -> torch.Tensor:
    """Rows ``i0:i1`` of ``Q = W U^T + U W^T``; for ``w [k, N, D]`` one ``[k, rows, N]`` block per cotangent."""
    if w.dim() == 2:
        return torch.addmm(torch.mm(w[i0:i1], u.T), u[i0:i1], w.T)
    return torch.matmul(w[:, i0:i1], u.T).add_(torch.matmul(u[i0:i1], w.transpose(1, 2)))


def _tangent_groups(k: int, block_elements: int) -> Iterator[tuple[int, int]]:
    """``(j0, j1)`` ranges of vectors processed together: a few ``[j1 - j0, rows, N]`` buffers of at most
    ``_SINGLE_BLOCK_BYTES`` (in fp32) each, so memory stays bounded for any ``k`` and every buffer stays
    below the 32 MiB from which glibc maps each allocation afresh (page faults on every call)."""
    per_group = max(1, (_SINGLE_BLOCK_BYTES // 4) // block_elements)
    for j0 in range(0, k, per_group):
        yield j0, min(k, j0 + per_group)


def _times_each(m: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``m @ w[j]`` for every ``j`` of ``w [k, N, D]``, as one ``[rows, N] x [N, k*D]`` product."""
    k, n, d = w.shape
    return torch.mm(m, w.transpose(0, 1).reshape(n, k * d)).view(m.shape[0], k, d).transpose(0, 1)


def lse_forward(u: torch.Tensor, inv_tau: float, precision: str) -> torch.Tensor:
    """``lse [N]`` (accumulation dtype) of the masked logits of ``u [N, D]``."""
    u = u.to(accumulation_dtype(u.dtype))
    n = u.shape[0]
    lse = empty_output(n, dtype=u.dtype, device=u.device)
    for i0, i1 in ((0, n),) if _single_block(u) else _row_blocks(n):
        lse[i0:i1] = torch.logsumexp(_masked_logits(u, i0, i1, inv_tau), dim=1)
    return lse


def lse_backward(u: torch.Tensor, lse: torch.Tensor, c: torch.Tensor, inv_tau: float, precision: str) -> torch.Tensor:
    """``(1/tau) (C P + P^T C) U`` as ``[N, D]`` in ``u.dtype``; ``lse, c`` are ``[N]`` in the accumulation dtype."""
    out_dtype = u.dtype
    u = u.to(lse.dtype)
    n = u.shape[0]
    out = empty_output_like(u)
    shift = _row_shift(lse, c)
    if _single_block(u):
        weighted = _weighted_row_probabilities(_masked_logits(u, 0, n, inv_tau), *shift)
        torch.mm(_plus_transpose(weighted), u, out=out)  # C P + P^T C = C P + (C P)^T
        return out.mul_(inv_tau).to(out_dtype)
    for i0, i1 in _row_blocks(n):
        p_row, p_col = _weighted_probabilities(_masked_logits(u, i0, i1, inv_tau), *shift, i0, i1)
        out[i0:i1] = torch.mm(p_row.add_(p_col), u).mul_(inv_tau)
    return out.to(out_dtype)


def lse_double_backward(
    u: torch.Tensor, lse: torch.Tensor, c: torch.Tensor, w: torch.Tensor, inv_tau: float, precision: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cotangent ``w [N, D]`` of the backward's output -> ``(grad_u [N, D] in u.dtype, r [N])``.

    ``grad_c = r / tau`` is formed by the caller; ``r`` is in the accumulation dtype.
    """
    out_dtype = u.dtype
    u, w = u.to(lse.dtype), w.to(lse.dtype)
    n = u.shape[0]
    r = empty_output(n, dtype=u.dtype, device=u.device)
    if _single_block(u):
        grad_u = _single_block_double_backward(u, lse, c, w, inv_tau, r)
        return grad_u.to(out_dtype), r
    for i0, i1 in _row_blocks(n):  # pass 1: r_i = sum_j P_ij Q_ij
        p = _masked_logits(u, i0, i1, inv_tau).sub_(lse[i0:i1, None]).exp_()
        r[i0:i1] = (p.mul_(_cross(u, w, i0, i1))).sum(dim=1)
    out = empty_output_like(u)
    shift = _row_shift(lse, c)
    for i0, i1 in _row_blocks(n):  # pass 2: (C P + P^T C) W / tau + (E + E^T) U / tau^2
        p_row, p_col = _weighted_probabilities(_masked_logits(u, i0, i1, inv_tau), *shift, i0, i1)
        q = _cross(u, w, i0, i1)
        e = p_row * (q - r[i0:i1, None])
        e.addcmul_(p_col, q.sub_(r))
        grad = torch.mm(p_row.add_(p_col), w).mul_(inv_tau)
        out[i0:i1] = grad.add_(torch.mm(e, u), alpha=inv_tau * inv_tau)
    return out.to(out_dtype), r


def _single_block_double_backward(
    u: torch.Tensor, lse: torch.Tensor, c: torch.Tensor, w: torch.Tensor, inv_tau: float, r: torch.Tensor
) -> torch.Tensor:
    """The double backward on the whole logits matrix; writes ``r`` and returns ``grad_u``."""
    p = _masked_logits(u, 0, len(u), inv_tau).sub_(lse[:, None]).exp_()
    q = _plus_transpose(torch.mm(w, u.T))  # Q = W U^T + U W^T
    torch.sum(p * q, dim=1, out=r)
    weighted = p.mul_(c[:, None])  # C P
    e = q.sub_(r[:, None]).mul_(weighted)  # E_ij = c_i P_ij (Q_ij - r_i)
    out = torch.mm(_plus_transpose(weighted), w).mul_(inv_tau)
    return out.add_(torch.mm(_plus_transpose(e), u), alpha=inv_tau * inv_tau)


def lse_backward_batched(
    u: torch.Tensor, lse: torch.Tensor, c: torch.Tensor, inv_tau: float, precision: str
) -> torch.Tensor:
    """:func:`lse_backward` for ``k`` weight vectors ``c [k, N]``: ``[k, N, D]`` in ``u.dtype``.

    ``(C P + P^T C) U = c * (P U) + P^T (c * U)``: the probabilities and ``P U`` are shared by every
    ``c``, and the ``P^T`` products of all ``k`` run as one ``[N, N] x [N, k*D]`` matmul.
    """
    out_dtype = u.dtype
    u = u.to(lse.dtype)
    n = u.shape[0]
    out = empty_output(c.shape[0], n, u.shape[1], dtype=u.dtype, device=u.device)
    weighted_u = c[:, :, None] * u
    for i0, i1 in ((0, n),) if _single_block(u) else _row_blocks(n):
        s = _masked_logits(u, i0, i1, inv_tau)
        p_col = torch.sub(s, lse).exp_()  # P_ji for the rows i of this block, by symmetry of s
        p_row = s.sub_(lse[i0:i1, None]).exp_()
        rows = _times_each(p_col, weighted_u).addcmul_(c[:, i0:i1, None], torch.mm(p_row, u))
        out[:, i0:i1] = rows.mul_(inv_tau)
    return out.to(out_dtype)


def lse_double_backward_batched(
    u: torch.Tensor, lse: torch.Tensor, c: torch.Tensor, w: torch.Tensor, inv_tau: float, precision: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`lse_double_backward` for ``k`` cotangents ``w [k, N, D]`` and weights ``c [N]`` (shared) or
    ``[k, N]``: ``(grad_u [k, N, D] in u.dtype, r [k, N])``.

    The exponential pass and the products with ``P`` alone are done once for all ``k``; per cotangent
    remain the tangent logits ``W U^T`` and the products that contain them.
    """
    out_dtype = u.dtype
    u, w = u.to(lse.dtype), w.to(lse.dtype)
    k, n = w.shape[0], u.shape[0]
    r = empty_output(k, n, dtype=u.dtype, device=u.device)
    out = empty_output(k, n, u.shape[1], dtype=u.dtype, device=u.device)
    if _single_block(u):
        _single_block_double_backward_batched(u, lse, c, w, inv_tau, r, out)
    else:
        _streamed_double_backward_batched(u, lse, c, w, inv_tau, r, out)
    return out.to(out_dtype), r


def _single_block_double_backward_batched(
    u: torch.Tensor, lse: torch.Tensor, c: torch.Tensor, w: torch.Tensor, inv_tau: float,
    r: torch.Tensor, out: torch.Tensor,
) -> None:
    """Writes ``r`` and ``out``. With ``A = W U^T`` and the symmetric ``S = C P + P^T C``:
    ``r_i = w_i . (P U)_i + sum_j P_ij A_ji`` and ``E + E^T = T + T^T`` for ``T = S * A - diag(c r) P``
    (the transposed terms of ``E + E^T`` pair up because ``S`` is symmetric). Per cotangent that is three
    ``N x N x D`` matmuls (``A``, ``S W``, ``(T + T^T) U``) and five elementwise passes (one of them the
    transposed copy, which costs less than a fourth matmul ``T^T U``), against the single-vector kernel's
    four matmuls, the exponentials and about a dozen passes."""
    n = u.shape[0]
    p = _masked_logits(u, 0, n, inv_tau).sub_(lse[:, None]).exp_()
    p_t = p.T.contiguous()
    pu = torch.mm(p, u)
    shared_s = _plus_transpose(p * c[:, None]) if c.dim() == 1 else None
    for j0, j1 in _tangent_groups(w.shape[0], n * n):
        wj = w[j0:j1]
        a = torch.matmul(wj, u.T)  # A_ij = w_i . u_j
        rj = torch.add((wj * pu).sum(-1), (a * p_t).sum(1), out=r[j0:j1])
        if shared_s is None:
            cj = c[j0:j1]
            s = (cj[:, :, None] * p).add_(cj[:, None, :] * p_t)
            first = torch.bmm(s, wj)
        else:
            cj, s = c, shared_s
            first = _times_each(s, wj)
        t = a.mul_(s).addcmul_(p, (cj * rj)[:, :, None], value=-1)
        second = torch.stack([torch.mm(_plus_transpose(t[i]), u) for i in range(j1 - j0)])
        torch.add(first.mul(inv_tau), second, alpha=inv_tau * inv_tau, out=out[j0:j1])


def _streamed_double_backward_batched(
    u: torch.Tensor, lse: torch.Tensor, c: torch.Tensor, w: torch.Tensor, inv_tau: float,
    r: torch.Tensor, out: torch.Tensor,
) -> None:
    """The two passes of :func:`lse_double_backward` over row blocks, each block's probabilities shared
    by every cotangent."""
    n, k = u.shape[0], w.shape[0]
    cb = c if c.dim() == 2 else c[None]
    rows = next(_row_blocks(n))[1]
    groups = list(_tangent_groups(k, rows * n))
    for i0, i1 in _row_blocks(n):  # pass 1: r_i = sum_j P_ij Q_ij
        p = _masked_logits(u, i0, i1, inv_tau).sub_(lse[i0:i1, None]).exp_()
        for j0, j1 in groups:
            r[j0:j1, i0:i1] = (_cross(u, w[j0:j1], i0, i1).mul_(p)).sum(-1)
    for i0, i1 in _row_blocks(n):  # pass 2: (C P + P^T C) W / tau + (E + E^T) U / tau^2
        s = _masked_logits(u, i0, i1, inv_tau)
        p_col = torch.sub(s, lse).exp_()
        p_row = s.sub_(lse[i0:i1, None]).exp_()
        for j0, j1 in groups:
            cj = cb if cb.shape[0] == 1 else cb[j0:j1]
            weighted_row = cj[:, i0:i1, None] * p_row
            weighted_col = cj[:, None, :] * p_col
            q = _cross(u, w[j0:j1], i0, i1)
            e = weighted_row * (q - r[j0:j1, i0:i1, None])
            e.addcmul_(weighted_col, q.sub_(r[j0:j1, None, :]))
            grad = torch.matmul(weighted_row.add_(weighted_col), w[j0:j1]).mul_(inv_tau)
            out[j0:j1, i0:i1] = grad.add_(torch.matmul(e, u), alpha=inv_tau * inv_tau)
