"""Triton kernels of the BYOL normalized-regression row ops (docs/design.md §2.2).

Same math as ``csrc/include/bissl_fast/byol_math.h`` (see its header comment for the derivation):
each program owns ``BLOCK_B`` rows, reduces the per-row dot products over ``D`` in ``BLOCK_D``
chunks (fp32 accumulation for fp32/bf16/fp16 inputs, fp64 for fp64), turns them into per-row
coefficients, and streams out the outputs as linear combinations of the input rows in a second
pass over ``D``. Inputs are contiguous ``[B, D]``; this module imports triton, so import it only
when a Triton kernel is about to launch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._alloc import empty_output
from ..reference import NORMALIZE_EPS
from .triton_routes import TRITON_TYPES, RoutedKernel, Route, Tile, pointer


#: The kernels the launchers call. They do not specialize on B, which only bounds masks: one compile
#: per route serves every batch size.
_launched = triton.jit(do_not_specialize=["B"])


@triton.jit
def _row(pp, tt, pt, EPS: tl.constexpr):
    """(inv_np, inv_nt, a, b, c) of byol_math.h's make_row."""
    # Correctly rounded square roots (tl.sqrt may lower to an approximate fp32 instruction);
    # sqrt_rn is fp32-only, and fp64 sqrt is always correctly rounded.
    if pp.dtype == tl.float64:
        np_ = tl.sqrt(pp)
        nt = tl.sqrt(tt)
    else:
        np_ = tl.sqrt_rn(pp)
        nt = tl.sqrt_rn(tt)
    # eps in the accumulation dtype: a bare float constant would be rounded to fp32 first.
    eps = tl.full(pp.shape, EPS, pp.dtype)
    a = tl.where(np_ >= eps, 1.0, 0.0).to(pp.dtype)
    b = tl.where(nt >= eps, 1.0, 0.0).to(pp.dtype)
    inv_np = 1.0 / tl.maximum(np_, eps)
    inv_nt = 1.0 / tl.maximum(nt, eps)
    c = pt * inv_np * inv_nt
    return inv_np, inv_nt, a, b, c


@triton.jit
def _offsets(pid, d0, B, D, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = d0 + tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < B) & (cols[None, :] < D)
    offs = rows[:, None].to(tl.int64) * D + cols[None, :]
    return offs, mask


@triton.jit
def _row_sums(P, T, pid, B, D, ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per-row ``p.p``, ``t.t`` and ``p.t`` of the ``BLOCK_B`` rows of program ``pid``."""
    pp = tl.zeros([BLOCK_B], dtype=ACC)
    tt = tl.zeros([BLOCK_B], dtype=ACC)
    pt = tl.zeros([BLOCK_B], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        offs, mask = _offsets(pid, d0, B, D, BLOCK_B, BLOCK_D)
        x = tl.load(P + offs, mask=mask, other=0.0).to(ACC)
        y = tl.load(T + offs, mask=mask, other=0.0).to(ACC)
        pp += tl.sum(x * x, axis=1)
        tt += tl.sum(y * y, axis=1)
        pt += tl.sum(x * y, axis=1)
    return pp, tt, pt


@_launched
def _byol_fwd_kernel(P, T, OUT, B, D, ACC: tl.constexpr, EPS: tl.constexpr,
                     BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    pp, tt, pt = _row_sums(P, T, pid, B, D, ACC, BLOCK_B, BLOCK_D)
    _, _, _, _, c = _row(pp, tt, pt, EPS)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    tl.store(OUT + rows, (2.0 - 2.0 * c).to(OUT.dtype.element_ty), mask=rows < B)


@_launched
def _byol_bwd_kernel(G, P, T, DP, DT, B, D, T_GRAD: tl.constexpr, ACC: tl.constexpr, EPS: tl.constexpr,
                     BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    pp, tt, pt = _row_sums(P, T, pid, B, D, ACC, BLOCK_B, BLOCK_D)
    inv_np, inv_nt, a, b, c = _row(pp, tt, pt, EPS)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    g = tl.load(G + rows, mask=rows < B, other=0.0).to(ACC)
    # byol_math.h grad_coef: dp = k_pp p + k_pt t, dt = k_tt t + k_tp p.
    cross = -2.0 * g * inv_np * inv_nt
    k_pp = 2.0 * g * a * c * inv_np * inv_np
    k_tt = 2.0 * g * b * c * inv_nt * inv_nt
    for d0 in range(0, D, BLOCK_D):
        offs, mask = _offsets(pid, d0, B, D, BLOCK_B, BLOCK_D)
        x = tl.load(P + offs, mask=mask, other=0.0).to(ACC)
        y = tl.load(T + offs, mask=mask, other=0.0).to(ACC)
        tl.store(DP + offs, (k_pp[:, None] * x + cross[:, None] * y).to(DP.dtype.element_ty), mask=mask)
        if T_GRAD:
            tl.store(DT + offs, (k_tt[:, None] * y + cross[:, None] * x).to(DT.dtype.element_ty), mask=mask)


@triton.jit
def _hvp_coefficients(ip, it, a, b, c, g, p_wp, t_wp, p_wt, t_wt):
    """byol_math.h hvp_coef, term for term: ``(dgrad, k_p_p, k_p_t, k_p_wp, k_p_wt, k_t_p, k_t_t, k_t_wp, k_t_wt)``."""
    u_wp = p_wp * ip
    v_wp = t_wp * it
    u_wt = p_wt * ip
    v_wt = t_wt * it
    dc = (v_wp - a * c * u_wp) * ip + (u_wt - b * c * v_wt) * it
    s = -2.0 * g
    gp_u = -a * dc * ip + 2.0 * a * c * u_wp * ip * ip
    gp_v = -b * v_wt * it * ip - a * u_wp * ip * ip
    gt_v = -b * dc * it + 2.0 * b * c * v_wt * it * it
    gt_u = -a * u_wp * ip * it - b * v_wt * it * it
    return (-2.0 * dc, s * gp_u * ip, s * gp_v * it, s * (-a * c * ip * ip), s * (ip * it),
            s * gt_u * ip, s * gt_v * it, s * (ip * it), s * (-b * c * it * it))


@triton.jit
def _hvp_outputs(P, T, WP, WT, DP, DT, pid, B, D, k_p_p, k_p_t, k_p_wp, k_p_wt, k_t_p, k_t_t, k_t_wp, k_t_wt,
                 HAS_WT: tl.constexpr, T_GRAD: tl.constexpr, ACC: tl.constexpr,
                 BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """``dp`` (and ``dt``) of the program's rows: the per-row combinations of ``p, t, wp, wt``."""
    for d0 in range(0, D, BLOCK_D):
        offs, mask = _offsets(pid, d0, B, D, BLOCK_B, BLOCK_D)
        x = tl.load(P + offs, mask=mask, other=0.0).to(ACC)
        y = tl.load(T + offs, mask=mask, other=0.0).to(ACC)
        w = tl.load(WP + offs, mask=mask, other=0.0).to(ACC)
        dp = k_p_p[:, None] * x + k_p_t[:, None] * y + k_p_wp[:, None] * w
        dt = k_t_p[:, None] * x + k_t_t[:, None] * y + k_t_wp[:, None] * w
        if HAS_WT:
            z = tl.load(WT + offs, mask=mask, other=0.0).to(ACC)
            dp += k_p_wt[:, None] * z
            dt += k_t_wt[:, None] * z
        tl.store(DP + offs, dp.to(DP.dtype.element_ty), mask=mask)
        if T_GRAD:
            tl.store(DT + offs, dt.to(DT.dtype.element_ty), mask=mask)


@_launched
def _byol_hvp_kernel(G, P, T, WP, WT, DG, DP, DT, B, D, HAS_WT: tl.constexpr, T_GRAD: tl.constexpr,
                     ACC: tl.constexpr, EPS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    pp = tl.zeros([BLOCK_B], dtype=ACC)
    tt = tl.zeros([BLOCK_B], dtype=ACC)
    pt = tl.zeros([BLOCK_B], dtype=ACC)
    p_wp = tl.zeros([BLOCK_B], dtype=ACC)
    t_wp = tl.zeros([BLOCK_B], dtype=ACC)
    p_wt = tl.zeros([BLOCK_B], dtype=ACC)
    t_wt = tl.zeros([BLOCK_B], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        offs, mask = _offsets(pid, d0, B, D, BLOCK_B, BLOCK_D)
        x = tl.load(P + offs, mask=mask, other=0.0).to(ACC)
        y = tl.load(T + offs, mask=mask, other=0.0).to(ACC)
        w = tl.load(WP + offs, mask=mask, other=0.0).to(ACC)
        pp += tl.sum(x * x, axis=1)
        tt += tl.sum(y * y, axis=1)
        pt += tl.sum(x * y, axis=1)
        p_wp += tl.sum(x * w, axis=1)
        t_wp += tl.sum(y * w, axis=1)
        if HAS_WT:
            z = tl.load(WT + offs, mask=mask, other=0.0).to(ACC)
            p_wt += tl.sum(x * z, axis=1)
            t_wt += tl.sum(y * z, axis=1)
    ip, it, a, b, c = _row(pp, tt, pt, EPS)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    g = tl.load(G + rows, mask=rows < B, other=0.0).to(ACC)
    dg, k_p_p, k_p_t, k_p_wp, k_p_wt, k_t_p, k_t_t, k_t_wp, k_t_wt = _hvp_coefficients(
        ip, it, a, b, c, g, p_wp, t_wp, p_wt, t_wt)
    tl.store(DG + rows, dg.to(DG.dtype.element_ty), mask=rows < B)
    _hvp_outputs(P, T, WP, WT, DP, DT, pid, B, D, k_p_p, k_p_t, k_p_wp, k_p_wt, k_t_p, k_t_t, k_t_wp, k_t_wt,
                 HAS_WT, T_GRAD, ACC, BLOCK_B, BLOCK_D)


@_launched
def _byol_hvp_batched_kernel(G, P, T, WP, WT, DG, DP, DT, K, B, D, HAS_WT: tl.constexpr, T_GRAD: tl.constexpr,
                             ACC: tl.constexpr, EPS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """``byol_hvp`` for ``K`` cotangents (``WP, WT, DP, DT`` are ``[K, B, D]``, ``DG`` is ``[K, B]``) in one
    launch: each program reduces its rows' norms once, then adds every cotangent's dot products and outputs."""
    pid = tl.program_id(0)
    pp, tt, pt = _row_sums(P, T, pid, B, D, ACC, BLOCK_B, BLOCK_D)
    ip, it, a, b, c = _row(pp, tt, pt, EPS)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    g = tl.load(G + rows, mask=rows < B, other=0.0).to(ACC)
    # Pointers to cotangent j's blocks, advanced by one [B, D] block (and one [B] block) per cotangent.
    wp_j, wt_j, dp_j, dt_j, dg_j = WP, WT, DP, DT, DG
    for _ in range(K):
        p_wp = tl.zeros([BLOCK_B], dtype=ACC)
        t_wp = tl.zeros([BLOCK_B], dtype=ACC)
        p_wt = tl.zeros([BLOCK_B], dtype=ACC)
        t_wt = tl.zeros([BLOCK_B], dtype=ACC)
        for d0 in range(0, D, BLOCK_D):
            offs, mask = _offsets(pid, d0, B, D, BLOCK_B, BLOCK_D)
            x = tl.load(P + offs, mask=mask, other=0.0).to(ACC)
            y = tl.load(T + offs, mask=mask, other=0.0).to(ACC)
            w = tl.load(wp_j + offs, mask=mask, other=0.0).to(ACC)
            p_wp += tl.sum(x * w, axis=1)
            t_wp += tl.sum(y * w, axis=1)
            if HAS_WT:
                z = tl.load(wt_j + offs, mask=mask, other=0.0).to(ACC)
                p_wt += tl.sum(x * z, axis=1)
                t_wt += tl.sum(y * z, axis=1)
        dg, k_p_p, k_p_t, k_p_wp, k_p_wt, k_t_p, k_t_t, k_t_wp, k_t_wt = _hvp_coefficients(
            ip, it, a, b, c, g, p_wp, t_wp, p_wt, t_wt)
        tl.store(dg_j + rows, dg.to(DG.dtype.element_ty), mask=rows < B)
        _hvp_outputs(P, T, wp_j, wt_j, dp_j, dt_j, pid, B, D, k_p_p, k_p_t, k_p_wp, k_p_wt,
                     k_t_p, k_t_t, k_t_wp, k_t_wt, HAS_WT, T_GRAD, ACC, BLOCK_B, BLOCK_D)
        wp_j += B * D
        wt_j += B * D
        dp_j += B * D
        dt_j += B * D
        dg_j += B


#: Elements of one program's row block (rows x BLOCK_D) per kernel, halved for fp64: the HVP keeps
#: four inputs of its row block in registers, and larger blocks spilled on sm_90 (docs/design.md §2.2);
#: the batched HVP also carries its rows' norms and coefficients through the loop over cotangents, and
#: spilled at 2048.
_BLOCK_ELEMENTS = {"fwd": 4096, "bwd": 4096, "hvp": 2048, "hvp_batched": 1024}
#: A row block of up to this many bytes (in the accumulation type) runs on 4 warps, a larger one on 8
#: (with 8 warps ptxas held 8 KiB HVP blocks to 64 registers per thread, and spilled).
_FOUR_WARP_BYTES = 8192
_MAX_BLOCK_D = 1024
#: Narrower rows are padded to this: one compile serves every small D.
_MIN_BLOCK_D = 64
#: Per-row values (sums, coefficients) live in registers once per row: more rows per program than
#: this spill them when D is small.
_MAX_BLOCK_B = 64

_ROUTED = {fn.__name__: RoutedKernel(fn, interpret_tile=None)
           for fn in (_byol_fwd_kernel, _byol_bwd_kernel, _byol_hvp_kernel, _byol_hvp_batched_kernel)}
#: Pointer arguments of each kernel, in order (all in the rows' dtype).
_POINTERS = {
    "_byol_fwd_kernel": ("P", "T", "OUT"),
    "_byol_bwd_kernel": ("G", "P", "T", "DP", "DT"),
    "_byol_hvp_kernel": ("G", "P", "T", "WP", "WT", "DG", "DP", "DT"),
    "_byol_hvp_batched_kernel": ("G", "P", "T", "WP", "WT", "DG", "DP", "DT"),
}


def _config(kernel: str, b: int, d: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_B, BLOCK_D, num_warps) of ``kernel`` for ``[b, d]`` rows: D in chunks of at most 1024, rows
    packed when D is small."""
    accumulator_bytes = 8 if dtype == torch.float64 else 4
    elements = _BLOCK_ELEMENTS[kernel] * 4 // accumulator_bytes
    block_d = min(max(triton.next_power_of_2(d), _MIN_BLOCK_D), _MAX_BLOCK_D, elements)
    block_b = max(1, min(triton.next_power_of_2(b), elements // block_d, _MAX_BLOCK_B))
    num_warps = 4 if block_b * block_d * accumulator_bytes <= _FOUR_WARP_BYTES else 8
    return block_b, block_d, num_warps


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def route(kernel: str, dtype: torch.dtype, b: int, d: int, **flags: bool) -> Route:
    """The route of ``kernel`` (``fwd``, ``bwd``, ``hvp``, ``hvp_batched``) for ``[b, d]`` rows of ``dtype``;
    ``flags`` are its ``T_GRAD`` / ``HAS_WT`` constexprs."""
    fn = _ROUTED[f"_byol_{kernel}_kernel"]
    block_b, block_d, warps = _config(kernel, b, d, dtype)
    sizes = (("K", "i32"),) if kernel == "hvp_batched" else ()
    signature = tuple((name, pointer(dtype)) for name in _POINTERS[fn.name]) + sizes + (("B", "i32"), ("D", "i32"))
    constexprs = {**flags, "ACC": _acc(dtype), "EPS": NORMALIZE_EPS, "BLOCK_B": block_b, "BLOCK_D": block_d}
    # Three stages is triton's default for a plain launch: the loads of the D loop are pipelined.
    tile = Tile((), warps, num_stages=3)
    name = " ".join([f"byol {kernel} {TRITON_TYPES[dtype]} {block_b}x{block_d}", *(k for k, v in flags.items() if v)])
    return Route(name, fn, signature, tuple(constexprs.items()), (tile,))


def routes(dtype: torch.dtype, d: int, b: int = 1 << 20) -> list[Route]:
    """Every route of rows ``[b, d]`` of ``dtype`` (each flag combination); by default full row blocks."""
    return [route("fwd", dtype, b, d)] + [route("bwd", dtype, b, d, T_GRAD=t) for t in (False, True)] + [
        route(kernel, dtype, b, d, HAS_WT=w, T_GRAD=t)
        for kernel in ("hvp", "hvp_batched") for w in (False, True) for t in (False, True)
    ]


def _grid(b: int, r: Route) -> tuple[int]:
    return (triton.cdiv(b, dict(r.constexprs)["BLOCK_B"]),)


def fwd(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-row ``2 - 2 cos(p_b, t_b)``: ``p, t`` contiguous ``[B, D]`` -> ``[B]``."""
    b, d = p.shape
    out = empty_output(b, dtype=p.dtype, device=p.device)
    r = route("fwd", p.dtype, b, d)
    r.launch(_grid(b, r), p, t, out, b, d)
    return out


def bwd(grad: torch.Tensor, p: torch.Tensor, t: torch.Tensor, t_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``sum_b grad_b (2 - 2 cos(p_b, t_b))``: ``(dp [B, D], dt [B, D] or [0] unless t_grad)``."""
    b, d = p.shape
    dp = empty_output(b, d, dtype=p.dtype, device=p.device)
    dt = empty_output(b, d, dtype=p.dtype, device=p.device) if t_grad else empty_output(0, dtype=p.dtype, device=p.device)
    r = route("bwd", p.dtype, b, d, T_GRAD=t_grad)
    r.launch(_grid(b, r), grad, p, t, dp, dt if t_grad else dp, b, d)
    return dp, dt


def hvp(
    grad: torch.Tensor, p: torch.Tensor, t: torch.Tensor, wp: torch.Tensor, wt: torch.Tensor | None, t_grad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Vector-Jacobian product of :func:`bwd` with cotangents ``(wp, wt)``: ``(dgrad [B], dp, dt)``."""
    b, d = p.shape
    dg = empty_output(b, dtype=p.dtype, device=p.device)
    dp = empty_output(b, d, dtype=p.dtype, device=p.device)
    dt = empty_output(b, d, dtype=p.dtype, device=p.device) if t_grad else empty_output(0, dtype=p.dtype, device=p.device)
    r = route("hvp", p.dtype, b, d, HAS_WT=wt is not None, T_GRAD=t_grad)
    r.launch(_grid(b, r), grad, p, t, wp, wp if wt is None else wt, dg, dp, dt if t_grad else dp, b, d)
    return dg, dp, dt


def hvp_batched(
    grad: torch.Tensor, p: torch.Tensor, t: torch.Tensor, wp: torch.Tensor, wt: torch.Tensor | None, t_grad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`hvp` for ``k`` cotangents ``wp, wt [k, B, D]`` (contiguous) in one launch:
    ``(dgrad [k, B], dp [k, B, D], dt [k, B, D] or [0])``."""
    k = wp.shape[0]
    b, d = p.shape
    dg = empty_output(k, b, dtype=p.dtype, device=p.device)
    dp = empty_output(k, b, d, dtype=p.dtype, device=p.device)
    dt = empty_output(k, b, d, dtype=p.dtype, device=p.device) if t_grad else empty_output(0, dtype=p.dtype,
                                                                                           device=p.device)
    if k == 0:
        return dg, dp, dt
    r = route("hvp_batched", p.dtype, b, d, HAS_WT=wt is not None, T_GRAD=t_grad)
    r.launch(_grid(b, r), grad, p, t, wp, wp if wt is None else wt, dg, dp, dt if t_grad else dp, k, b, d)
    return dg, dp, dt
