"""Launchers and routes of the NT-Xent Triton kernels (docs/design.md §2.1, "Triton routes").

Entry points, with the names and signatures of ``nt_xent_torch.py``: :func:`lse_forward`,
:func:`lse_backward`, :func:`lse_double_backward`, and for ``k`` vectors at once (batched Hessian-vector
products) :func:`lse_backward_batched` and :func:`lse_double_backward_batched`: the same kernels in one
launch, the vector index on the third grid axis. The kernels are in ``nt_xent_triton_kernels.py``.

A launch's route (``triton_routes.Route``) follows from three things:

* the pass: ``fwd``, ``bwd``, ``bwd_bwd_r`` (double backward, pass 1) or ``bwd_bwd`` (pass 2);
* the operand group: ``ieee`` (fp32, exact dots: FMA loops, no tensor cores), ``tf32`` (fp32 on
  tensor cores) or ``16-bit`` (bf16 and fp16 rows);
* ``D``: rows up to 256 wide are padded to ``BLOCK_D = max(64, next_pow2(D))`` for the resident
  kernels; wider rows, and the ``ieee`` group in every pass at every width, take the K-loop kernels
  (``BLOCK_K = 64``; outputs in ``BLOCK_DO = min(max(64, next_pow2(D)), 256)`` wide chunks).

:data:`_TILES` holds each route's tiles (at most three: the first is the fixed-config mode's).
Every tile there fits sm_80's and sm_90's shared memory per block and compiles for sm_90 without
register spills with triton 3.6 and with triton 3.8, whose compilers differ
(``tests/test_triton_resources.py``, run in both CI venvs; integer arguments divisible by 16), and
none sits at ptxas's 255-register cap with either. The ``ieee`` group's dots are FMA loops that
triton unrolls over the whole K extent: whether their operands fit in registers is left to ptxas's
scheduling, and with resident rows they did not at tiles that fit shared memory (the backward and double backward spilled kilobytes per
thread with triton 3.6, the forward 6 KiB per thread at ``D = 256`` with triton 3.8), so every
``ieee`` pass reads K in 64-wide chunks instead (docs/design.md §2.1).

A new kernel joins by adding its pass to :data:`_KERNELS` (with its pointer arguments) and its
routes to :data:`_TILES`, and a launcher that calls :func:`route`: ``triton_aot.nt_xent_routes``
builds the routes of every pass in :data:`PASSES`, so the resource tests check its tiles too.
"""
from __future__ import annotations

import torch
import triton

from .._alloc import empty_output
from .._backends import triton_interpret_mode
from . import nt_xent_triton_kernels as kernels
from .triton_routes import RoutedKernel, Route, Tile, mn_tile, pointer

#: Widest padded D the resident kernels take; wider rows use the K-loop kernels.
_RESIDENT_MAX_D = 256
#: Narrowest padded D: smaller rows are padded to it (tl.dot needs 16; 64 keeps one compile for all
#: small widths).
_MIN_BLOCK_D = 64
_BLOCK_K = 64

_TUNE_KEY = ("N", "D", "PRECISION")
#: (resident kernel, K-loop kernel, pointer arguments that hold rows, other fp32 pointer arguments,
#: whether the kernel takes PV_BF16 and the K-loop one BLOCK_DO) per pass.
_KERNELS = {
    "fwd": (kernels._lse_fwd_resident_kernel, kernels._lse_fwd_kernel, ("u_ptr",), ("lse_ptr",), False),
    "bwd": (kernels._lse_bwd_resident_kernel, kernels._lse_bwd_kernel, ("u_ptr", "out_ptr"),
            ("lse_ptr", "c_ptr"), True),
    "bwd_bwd_r": (kernels._lse_bwd_bwd_r_resident_kernel, kernels._lse_bwd_bwd_r_kernel, ("u_ptr", "w_ptr"),
                  ("lse_ptr", "r_ptr"), False),
    "bwd_bwd": (kernels._lse_bwd_bwd_resident_kernel, kernels._lse_bwd_bwd_kernel, ("u_ptr", "w_ptr", "out_ptr"),
                ("lse_ptr", "c_ptr", "r_ptr"), True),
}
PASSES = tuple(_KERNELS)
_ROUTED = {fn: RoutedKernel(fn, _TUNE_KEY) for entry in _KERNELS.values() for fn in entry[:2]}


def _tiles(*specs: str) -> tuple[Tile, ...]:
    """``"64x32w8s2"`` -> ``mn_tile(64, 32, 8, 2)``."""
    out = []
    for spec in specs:
        mn, rest = spec.split("w")
        warps, stages = rest.split("s")
        m, n = mn.split("x")
        out.append(mn_tile(int(m), int(n), int(warps), int(stages)))
    return tuple(out)


#: Tiles per (operand group, pass, family + width): ``r<BLOCK_D>`` resident, ``k<BLOCK_DO>`` K-loop
#: (``k`` alone for the K-loop kernels without output chunks). Chosen from compiles for sm_90 and
#: sm_80 (docs/design.md §2.1 has the table); the order is by work per program, largest first (not
#: timed: no GPU has run them yet).
_TILES: dict[tuple[str, str, str], tuple[Tile, ...]] = {
    # 16-bit rows: tensor-core dots in bf16/fp16.
    ("16-bit", "fwd", "r64"): _tiles("128x64w8s2", "64x64w4s2", "64x32w4s2"),
    ("16-bit", "fwd", "r128"): _tiles("128x64w8s2", "64x64w4s2", "64x32w4s2"),
    ("16-bit", "fwd", "r256"): _tiles("64x64w8s2", "64x32w4s2", "32x32w4s2"),
    ("16-bit", "fwd", "k"): _tiles("64x64w8s2", "64x32w4s2", "32x32w4s2"),
    ("16-bit", "bwd", "r64"): _tiles("128x64w8s2", "64x64w4s2", "64x32w4s2"),
    ("16-bit", "bwd", "r128"): _tiles("64x64w8s2", "64x64w8s3", "64x32w8s2"),
    ("16-bit", "bwd", "r256"): _tiles("64x32w8s2", "32x64w8s2", "32x32w8s1"),
    ("16-bit", "bwd", "k256"): _tiles("64x64w8s2", "64x32w8s2", "32x32w8s1"),
    ("16-bit", "bwd_bwd_r", "r64"): _tiles("128x64w8s2", "64x64w4s2", "64x32w4s2"),
    ("16-bit", "bwd_bwd_r", "r128"): _tiles("64x64w8s2", "64x64w4s2", "64x32w4s2"),
    ("16-bit", "bwd_bwd_r", "r256"): _tiles("64x64w8s2", "64x32w8s2", "32x64w4s2"),
    ("16-bit", "bwd_bwd_r", "k"): _tiles("64x64w8s2", "64x32w8s2", "64x64w4s2"),
    ("16-bit", "bwd_bwd", "r64"): _tiles("128x32w8s2", "64x32w8s2", "64x32w4s2"),
    ("16-bit", "bwd_bwd", "r128"): _tiles("32x64w8s2", "32x32w8s2", "32x32w8s1"),
    ("16-bit", "bwd_bwd", "r256"): _tiles("32x32w8s2", "32x16w8s2", "32x32w8s1"),
    ("16-bit", "bwd_bwd", "k256"): _tiles("32x64w8s1", "32x32w8s2", "32x32w8s1"),
    # fp32 rows, TF32 tensor-core dots.
    ("tf32", "fwd", "r64"): _tiles("128x64w8s2", "64x64w4s2", "64x32w4s2"),
    ("tf32", "fwd", "r128"): _tiles("64x64w8s2", "64x64w4s2", "64x32w4s2"),
    ("tf32", "fwd", "r256"): _tiles("64x64w8s2", "64x32w8s2", "32x32w4s2"),
    ("tf32", "fwd", "k"): _tiles("64x64w8s2", "64x32w8s2", "32x32w4s1"),
    ("tf32", "bwd", "r64"): _tiles("64x64w8s2", "64x64w4s2", "64x32w4s2"),
    ("tf32", "bwd", "r128"): _tiles("64x64w8s2", "64x32w8s2", "32x64w8s2"),
    ("tf32", "bwd", "r256"): _tiles("32x64w8s2", "32x32w4s2", "32x32w4s1"),
    ("tf32", "bwd", "k256"): _tiles("64x64w8s2", "64x32w8s2", "32x32w8s1"),
    ("tf32", "bwd_bwd_r", "r64"): _tiles("64x64w8s2", "64x64w4s2", "64x32w4s2"),
    ("tf32", "bwd_bwd_r", "r128"): _tiles("64x64w8s2", "64x32w8s2", "64x32w4s2"),
    ("tf32", "bwd_bwd_r", "r256"): _tiles("32x16w8s2", "16x32w8s2", "16x32w4s2"),
    ("tf32", "bwd_bwd_r", "k"): _tiles("64x64w8s2", "64x32w8s2", "64x32w4s2"),
    ("tf32", "bwd_bwd", "r64"): _tiles("64x32w4s2", "32x32w4s2", "32x32w8s1"),
    ("tf32", "bwd_bwd", "r128"): _tiles("32x32w4s2", "32x32w4s1"),
    ("tf32", "bwd_bwd", "r256"): _tiles("32x16w8s2", "16x32w8s1", "16x16w8s1"),
    ("tf32", "bwd_bwd", "k256"): _tiles("32x32w8s1", "32x16w8s1", "16x16w8s1"),
    # fp32 rows, exact (FMA) dots: small tiles and eight warps keep the per-thread products in registers.
    ("ieee", "fwd", "k"): _tiles("64x32w8s1", "32x32w8s1", "32x32w4s1"),
    ("ieee", "bwd", "k64"): _tiles("64x32w8s1", "64x16w8s1"),
    ("ieee", "bwd", "k128"): _tiles("64x32w8s1", "32x64w8s1"),
    ("ieee", "bwd", "k256"): _tiles("64x32w8s1", "32x32w8s1"),
    ("ieee", "bwd_bwd_r", "k"): _tiles("64x32w8s1", "32x32w8s1", "32x32w4s1"),
    ("ieee", "bwd_bwd", "k64"): _tiles("32x32w8s1"),
    ("ieee", "bwd_bwd", "k128"): _tiles("32x32w8s1"),
    ("ieee", "bwd_bwd", "k256"): _tiles("32x32w8s1"),
}


def operand_group(dtype: torch.dtype, precision: str) -> str:
    """``ieee``, ``tf32`` or ``16-bit``: how the kernels' dot products run for rows of ``dtype``."""
    return precision if dtype == torch.float32 else "16-bit"


def _padded(d: int) -> int:
    return max(_MIN_BLOCK_D, triton.next_power_of_2(d))


def _resident(group: str, d: int) -> bool:
    return _padded(d) <= _RESIDENT_MAX_D and group != "ieee"


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


def route(kernel_pass: str, dtype: torch.dtype, precision: str, d: int) -> Route:
    """The route of ``kernel_pass`` for rows ``[N, d]`` of ``dtype`` with ``precision`` fp32 dots."""
    resident_fn, k_loop_fn, row_ptrs, fp32_ptrs, pv = _KERNELS[kernel_pass]
    group = operand_group(dtype, precision)
    padded = _padded(d)
    if _resident(group, d):
        fn, blocks, width = resident_fn, {"BLOCK_D": padded}, f"r{padded}"
    else:
        block_do = min(padded, _RESIDENT_MAX_D)
        fn = k_loop_fn
        blocks = {"BLOCK_K": _BLOCK_K, **({"BLOCK_DO": block_do} if pv else {})}
        width = f"k{block_do}" if pv else "k"
    ptr_types = {name: pointer(dtype) for name in row_ptrs} | {name: "*fp32" for name in fp32_ptrs}
    # *_batch: elements between consecutive vectors of a batched launch (0 for an argument they share).
    scalars = {"N": "i32", "D": "i32", "stride": "i32", "inv_tau": "fp32", "w_batch": "i32", "c_batch": "i32",
               "r_batch": "i32", "out_batch": "i32"}
    signature = tuple((name, ptr_types.get(name) or scalars[name]) for name in fn.arg_names
                      if name in ptr_types or name in scalars)
    constexprs = {**blocks, **_dot_options(precision, dtype, pv=pv)}
    return Route(f"{kernel_pass} {group} {width}", _ROUTED[fn], signature, tuple(constexprs.items()),
                 _TILES[(group, kernel_pass, width)])


def _rows_grid(n: int, k: int = 1):
    return lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), 1, k)


def _out_grid(n: int, d: int, r: Route, k: int = 1):
    block_do = dict(r.constexprs).get("BLOCK_DO")
    if block_do is None:
        return _rows_grid(n, k)
    return lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(d, block_do), k)


def lse_forward(u: torch.Tensor, inv_tau: float, precision: str) -> torch.Tensor:
    """``lse [N]`` (fp32) of the masked logits of contiguous ``u [N, D]``."""
    n, d = u.shape
    lse = empty_output(n, dtype=torch.float32, device=u.device)
    route("fwd", u.dtype, precision, d).launch(_rows_grid(n), u, lse, n, d, u.stride(0), inv_tau)
    return lse


def lse_backward(u: torch.Tensor, lse: torch.Tensor, c: torch.Tensor, inv_tau: float, precision: str) -> torch.Tensor:
    """``(1/tau) (C P + P^T C) U`` as ``[N, D]`` in ``u.dtype``; ``lse, c`` are fp32 ``[N]``."""
    return lse_backward_batched(u, lse, c[None], inv_tau, precision)[0]


def lse_backward_batched(
    u: torch.Tensor, lse: torch.Tensor, c: torch.Tensor, inv_tau: float, precision: str
) -> torch.Tensor:
    """:func:`lse_backward` for ``k`` weight vectors ``c [k, N]`` (fp32, contiguous): ``[k, N, D]``."""
    n, d = u.shape
    k = c.shape[0]
    out = empty_output(k, n, d, dtype=u.dtype, device=u.device)
    if k == 0:
        return out
    r = route("bwd", u.dtype, precision, d)
    r.launch(_out_grid(n, d, r, k), u, lse, c, out, n, d, u.stride(0), inv_tau, n, n * d)
    return out


def lse_double_backward(
    u: torch.Tensor, lse: torch.Tensor, c: torch.Tensor, w: torch.Tensor, inv_tau: float, precision: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cotangent ``w [N, D]`` of the backward's output -> ``(grad_u [N, D] in u.dtype, r [N] fp32)``.

    ``grad_c = r / tau`` is formed by the caller. ``u`` and ``w`` share dtype and are contiguous.
    """
    grad_u, r_out = lse_double_backward_batched(u, lse, c, w[None], inv_tau, precision)
    return grad_u[0], r_out[0]


def lse_double_backward_batched(
    u: torch.Tensor, lse: torch.Tensor, c: torch.Tensor, w: torch.Tensor, inv_tau: float, precision: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`lse_double_backward` for ``k`` cotangents ``w [k, N, D]`` (contiguous, ``u``'s dtype) and
    weights ``c`` fp32 ``[N]`` (shared) or ``[k, N]``: ``(grad_u [k, N, D], r [k, N] fp32)``."""
    n, d = u.shape
    k = w.shape[0]
    r_out = empty_output(k, n, dtype=torch.float32, device=u.device)
    out = empty_output(k, n, d, dtype=u.dtype, device=u.device)
    if k == 0:
        return out, r_out
    c_batch = n if c.dim() == 2 else 0
    route("bwd_bwd_r", u.dtype, precision, d).launch(_rows_grid(n, k), u, w, lse, r_out, n, d, u.stride(0), inv_tau,
                                                     n * d, n)
    second = route("bwd_bwd", u.dtype, precision, d)
    second.launch(_out_grid(n, d, second, k), u, w, lse, c, r_out, out, n, d, u.stride(0), inv_tau, n * d, c_batch,
                  n, n * d)
    return out, r_out
