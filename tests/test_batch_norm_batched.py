"""Fused BatchNorm under vmap: ``batch_norm_{bwd,dbwd}_batched`` against one tangent at a time, the
batching rules under both vmaps, and gradcheck's batched checks (docs/design.md §2.3)."""
from __future__ import annotations

import sys

import pytest
import torch
from helpers import prototype_vmap, rel_err

from bissl_fast import batch_norm
from bissl_fast._backends import backend_reasons, backends
from bissl_fast.ops import batch_norm as bn_mod

needs_cpp = pytest.mark.skipif(not backends()["cpp"], reason=backend_reasons().get("cpp", ""))
DEVICES = [pytest.param("cpu", marks=needs_cpp), pytest.param("cuda", marks=pytest.mark.cuda)]
VMAPS = [pytest.param(torch.func.vmap, id="torch.func"), pytest.param(prototype_vmap, id="is_grads_batched")]
# [N, C, H, W] with a ragged lane tail (H*W = 15), [N, C] (the projector's BatchNorm1d), [N, C, L].
SHAPES = [(6, 5, 3, 5), (16, 7), (4, 3, 9)]
ops = torch.ops.bissl_fast


def _case(shape, dtype, device, training, affine=True, k=4, seed=0):
    """Saved-forward state of one layer and k tangents: (x, w, mean, invstd, g, ggi, ggw, ggb, gos)."""
    bn_mod.extension_ops()
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    c = shape[1]
    x = (2 * rand(*shape) + 0.7).to(dtype).to(device)
    w = (1 + 0.5 * rand(c)).to(x.dtype if dtype == torch.float64 else torch.float32).to(device) if affine else None
    rm, rv = rand(c).abs().to(device), (0.5 + rand(c).abs()).to(device)
    if dtype != torch.float64:
        rm, rv = rm.float(), rv.float()
    _, mean, invstd, _, _ = ops.batch_norm_fwd(x, w, None, rm, rv, training, 0.1, 1e-5)
    g = rand(*shape).to(dtype).to(device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    ggi, gos = (rand(k, *shape).to(dtype).to(device) for _ in range(2))
    ggw, ggb = (rand(k, c).to(acc).to(device) for _ in range(2))
    return x, w, mean, invstd, g, ggi, ggw, ggb, gos


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_batched_ops_equal_one_tangent_at_a_time(device, dtype, shape, training, affine):
    """The same per-channel sums in the same order as the single-tangent ops: equal bit for bit (CPU)."""
    x, w, mean, invstd, g, ggi, ggw, ggb, gos = _case(shape, dtype, device, training, affine)
    exact = device == "cpu"
    same = (lambda a, b: torch.equal(a, b)) if exact else (lambda a, b: rel_err(a, b) < 1e-6)
    mask = [True, affine, affine]
    gx, gw, gb = ops.batch_norm_bwd_batched(gos, x, w, mean, invstd, training, mask)
    for j in range(gos.shape[0]):
        ref = ops.batch_norm_bwd(gos[j], x, w, mean, invstd, training, mask)
        assert same(gx[j], ref[0])
        if affine:
            assert same(gw[j], ref[1]) and same(gb[j], ref[2])
    cotangent_sets = {
        "all": (ggi, ggw if affine else None, ggb if affine else None),
        "ggI only": (ggi, None, None),
        "ggW only": (None, ggw, None),
    }
    for name, (a, b, c) in cotangent_sets.items():
        out = ops.batch_norm_dbwd_batched(a, b, c, g, x, w, mean, invstd, training, [True, True, affine])
        for j in range(4):
            ref = ops.batch_norm_dbwd(*(None if t is None else t[j] for t in (a, b, c)), g, x, w, mean, invstd,
                                      training, [True, True, affine])
            assert same(out[0][j], ref[0]) and same(out[1][j], ref[1]), name
            if affine:
                assert same(out[2][j], ref[2]), name


@needs_cpp
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="outputs of 32 MiB and more are mapped on Linux only")
def test_outputs_of_32_mib_and_more_are_mapped_and_equal():
    """[k, ...] outputs of 32 MiB and more get their own huge-page-aligned mapping (csrc/output_alloc.cpp);
    they are written in full (the suite poisons outputs with NaN) and equal the single-tangent ops."""
    x, w, mean, invstd, g, ggi, ggw, ggb, gos = _case((16, 32, 64, 64), torch.float32, "cpu", True, k=4)
    gi, gg, gw = ops.batch_norm_dbwd_batched(ggi, ggw, ggb, g, x, w, mean, invstd, True, [True, True, True])
    assert gi.numel() * gi.element_size() == 32 << 20
    for out in (gi, gg):
        assert out.data_ptr() % (2 << 20) == 0
    for j in range(4):
        ref = ops.batch_norm_dbwd(ggi[j], ggw[j], ggb[j], g, x, w, mean, invstd, True, [True, True, True])
        assert torch.equal(gi[j], ref[0]) and torch.equal(gg[j], ref[1]) and torch.equal(gw[j], ref[2])


def _loop(op, args, in_dims, k):
    outs = [op(*(a if d is None or a is None else a.select(d, j) for a, d in zip(args, in_dims))) for j in range(k)]
    return tuple(torch.stack(o) if o[0].numel() else o[0] for o in zip(*outs))


@needs_cpp
@pytest.mark.parametrize("vmap", VMAPS)
@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_rules_match_loop(vmap, shape, training):
    """The shared-statistics path (only tangents batched) and the k*C channel path (the input batched)."""
    k = 3
    x, w, mean, invstd, g, ggi, ggw, ggb, gos = _case(shape, torch.float64, "cpu", training, k=k)
    mask = [True, True, True]

    def bwd(g_, x_, w_, mean_, invstd_):
        return ops.batch_norm_bwd(g_, x_, w_, mean_, invstd_, training, mask)

    def dbwd(ggi_, ggw_, ggb_, g_, x_, w_, mean_, invstd_):
        return ops.batch_norm_dbwd(ggi_, ggw_, ggb_, g_, x_, w_, mean_, invstd_, training, mask)

    xs = torch.stack([x * (1 + 0.1 * j) for j in range(k)], dim=1)  # batched at dim 1
    ws = torch.stack([w + 0.2 * j for j in range(k)])
    cases = [
        (bwd, (gos, x, w, mean, invstd), (0, None, None, None, None)),
        (bwd, (gos, xs, w, mean, invstd), (0, 1, None, None, None)),
        (dbwd, (ggi, ggw, ggb, g, x, w, mean, invstd), (0, 0, 0, None, None, None, None, None)),
        (dbwd, (ggi.movedim(0, 2), None, ggb, g, x, w, mean, invstd), (2, None, 0, None, None, None, None, None)),
        (dbwd, (ggi, ggw, ggb, g, xs, ws, mean, invstd), (0, 0, 0, None, 1, 0, None, None)),
    ]
    for op, args, in_dims in cases:
        out = vmap(op, in_dims=in_dims)(*args)
        ref = _loop(op, args, in_dims, k)
        for o, r in zip(out, ref):
            assert rel_err(o, r) < 1e-13, in_dims

    def fwd(x_, w_):
        return ops.batch_norm_fwd(x_, w_, None, None, None, True, 0.1, 1e-5)[0]

    assert rel_err(vmap(fwd, in_dims=(1, 0))(xs, ws), torch.stack([fwd(xs[:, j], ws[j]) for j in range(k)])) < 1e-13


@needs_cpp
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batched_gradcheck_and_gradgradcheck_fp64(training):
    """gradcheck's batched checks run the backward and the double backward under the older vmap."""
    bn_mod.extension_ops()
    x = (2 * torch.randn(4, 3, 2, 3, dtype=torch.float64) + 0.5).requires_grad_()
    w, b = torch.rand(3, dtype=torch.float64, requires_grad=True), torch.randn(3, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)

    def f(x_, w_, b_):
        return batch_norm(x_, None if training else rm, None if training else rv, w_, b_, training=training,
                          backend="cpp")

    assert torch.autograd.gradcheck(f, (x, w, b), check_batched_grad=True)
    assert torch.autograd.gradgradcheck(f, (x, w, b), check_batched_grad=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_opcheck_batched_ops(device, training):
    x, w, mean, invstd, g, ggi, ggw, ggb, gos = _case((4, 3, 2, 2), torch.float64, device, training, k=2)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(ops.batch_norm_bwd_batched.default, (gos, x, w, mean, invstd, training, [True, True, True]),
                          test_utils=tests)
    torch.library.opcheck(ops.batch_norm_bwd_batched.default,
                          (gos, x, None, mean, invstd, training, [True, False, False]), test_utils=tests)
    torch.library.opcheck(ops.batch_norm_dbwd_batched.default,
                          (ggi, ggw, ggb, g, x, w, mean, invstd, training, [True, True, True]), test_utils=tests)
    torch.library.opcheck(ops.batch_norm_dbwd_batched.default,
                          (None, ggw, None, g, x, w, mean, invstd, training, [True, False, True]), test_utils=tests)


@needs_cpp
def test_batched_op_checks_and_not_differentiable():
    x, w, mean, invstd, g, ggi, ggw, ggb, gos = _case((4, 3, 2, 2), torch.float64, "cpu", True, k=2)
    with pytest.raises(RuntimeError, match=r"grad_out must have shape \[k, "):
        ops.batch_norm_bwd_batched(g, x, w, mean, invstd, True, [True, True, True])
    with pytest.raises(RuntimeError, match="at least one of ggI, ggW, ggB"):
        ops.batch_norm_dbwd_batched(None, None, None, g, x, w, mean, invstd, True, [True, True, True])
    with pytest.raises(RuntimeError, match="ggW holds 1 tangents"):
        ops.batch_norm_dbwd_batched(ggi, ggw[:1], None, g, x, w, mean, invstd, True, [True, True, True])
    with pytest.raises(RuntimeError, match=r"ggB must be \[k, C\]"):
        ops.batch_norm_dbwd_batched(ggi, None, ggb[:, :2], g, x, w, mean, invstd, True, [True, True, True])
    out = ops.batch_norm_bwd_batched(gos.clone().requires_grad_(), x, w, mean, invstd, True, [True, True, True])
    with pytest.raises(NotImplementedError, match="not differentiable"):
        out[0].sum().backward()
