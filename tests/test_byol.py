"""Fused BYOL loss (bissl_fast.byol_loss) against bissl_fast.reference.byol_loss: loss, gradient and
double gradient on the C++ CPU kernel (always), the CUDA kernel (marked ``cuda``) and plain torch.
The Triton kernels run the same checks from test_byol_triton.py."""
from __future__ import annotations

import pytest
import torch
from helpers import assert_close_rel, mlp_hvp

from bissl_fast import (
    BackendUnavailableError,
    BYOLLoss,
    BYOLLossFunction,
    byol_loss,
    normalized_regression,
    reference,
)
from bissl_fast.ops import byol as byol_mod
from bissl_fast._backends import backend_reasons, backends

needs_cpp = pytest.mark.skipif(not backends()["cpp"], reason=backend_reasons().get("cpp", ""))
KERNEL_BACKENDS = [
    pytest.param("cpp", "cpu", id="cpp", marks=needs_cpp),
    pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.cuda),
]
FP32_TOL = 1e-5
LOW_PRECISION_TOL = 1e-2


def _inputs(b: int, d: int, dtype: torch.dtype, device: str, scales=(1.0, 1.0, 1.0, 1.0)) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(b * 1000 + d)
    return [(s * torch.randn(b, d, generator=gen, dtype=torch.float64)).to(dtype).to(device) for s in scales]


def _ref_loss_and_grads(xs: list[torch.Tensor], upstream: float, need_targets: bool):
    """float64 reference loss and gradients (of ``upstream * loss``) on the same values."""
    xd = [x.detach().double().cpu().requires_grad_(i < 2 or need_targets) for i, x in enumerate(xs)]
    loss = reference.byol_loss(*xd)
    grads = torch.autograd.grad(upstream * loss, [x for x in xd if x.requires_grad])
    return loss.detach(), grads


def check_loss_and_grad(backend: str, device: str, b: int, d: int, dtype: torch.dtype, tol: float,
                        need_targets: bool, scales=(1.0, 1.0, 1.0, 1.0)) -> None:
    xs = _inputs(b, d, dtype, device, scales)
    for i, x in enumerate(xs):
        x.requires_grad_(i < 2 or need_targets)
    upstream = 1.7  # non-unit, so a backward that ignores its incoming gradient fails
    loss = byol_loss(*xs, backend=backend)
    assert loss.dtype == dtype and loss.shape == ()
    grads = torch.autograd.grad(upstream * loss, [x for x in xs if x.requires_grad])
    ref_loss, ref_grads = _ref_loss_and_grads(xs, upstream, need_targets)
    assert_close_rel("loss", loss.detach().cpu(), ref_loss, tol)
    assert_close_rel("gradients", [g.cpu() for g in grads], ref_grads, tol)


def check_hvp(backend: str, device: str, dtype: torch.dtype, tol: float, targets_require_grad: bool,
              b: int = 5, d: int = 11) -> None:
    """HVP of the loss through a tiny MLP whose output feeds p1/p2 (and the targets, if they require grad)."""
    x = torch.randn(b, 3, dtype=torch.float64).to(dtype).to(device)
    gen = torch.Generator().manual_seed(7)
    t1, t2 = (torch.randn(b, d, generator=gen, dtype=torch.float64).to(dtype).to(device) for _ in range(2))

    def views(emb: torch.Tensor):
        if targets_require_grad:
            # Every argument depends on the parameters: the cross blocks of the Hessian contribute.
            return emb, emb.flip(0) * 0.5 + 0.1, emb.roll(1, dims=1) + t1, emb * 0.3 - t2
        return emb, emb * 0.5 + 0.1, t1, t2

    got = mlp_hvp(lambda emb: byol_loss(*views(emb), backend=backend), x, d)
    want = mlp_hvp(lambda emb: reference.byol_loss(*views(emb)), x.double().cpu(), d)
    assert_close_rel("HVP w.r.t. the MLP parameters", [g.cpu() for g in got], want, tol)


# ------------------------------------------------------------------------------ loss and gradient


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("b,d", [(1, 7), (37, 100), (64, 256)])
@pytest.mark.parametrize("need_targets", [False, True], ids=["detached", "targets_grad"])
def test_loss_and_grad_fp32(backend, device, b, d, need_targets):
    check_loss_and_grad(backend, device, b, d, torch.float32, FP32_TOL, need_targets)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loss_and_grad_low_precision(backend, device, dtype):
    check_loss_and_grad(backend, device, 33, 96, dtype, LOW_PRECISION_TOL, need_targets=True)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, FP32_TOL)])
@pytest.mark.parametrize("scales", [(1e15, 1e-6, 1e8, 1e-8), (1e-14, 1e-13, 3.0, 1e-15)], ids=["large_small", "below_eps"])
def test_extreme_norms(backend, device, dtype, tol, scales):
    """Huge and tiny rows, and rows below eps = 1e-12 where F.normalize clamps the norm."""
    check_loss_and_grad(backend, device, 9, 17, dtype, tol, need_targets=True, scales=scales)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_zero_rows_and_mixed_regimes(backend, device):
    """Exactly-zero rows (loss 2) next to ordinary and sub-eps rows, in one batch, in float64."""
    xs = _inputs(6, 10, torch.float64, device)
    xs[0][0] = 0.0
    xs[2][1] = 0.0
    xs[1][2] *= 1e-13
    xs[3][3] *= 1e-13
    for x in xs:
        x.requires_grad_()
    per_row = normalized_regression(xs[0], xs[3], backend=backend)
    assert per_row[0].item() == 2.0
    loss = byol_loss(*xs, backend=backend)
    grads = torch.autograd.grad(2.5 * loss, xs, create_graph=True)
    ref_loss, ref_grads = _ref_loss_and_grads(xs, 2.5, need_targets=True)
    assert_close_rel("loss", loss.detach().cpu(), ref_loss, 1e-12)
    assert_close_rel("gradients", [g.detach().cpu() for g in grads], ref_grads, 1e-12)
    vec = [torch.randn_like(x) for x in xs]
    hv = [h.cpu() for h in torch.autograd.grad(grads, xs, vec)]
    xd = [x.detach().cpu().requires_grad_() for x in xs]
    ref_hv = torch.autograd.grad(torch.autograd.grad(2.5 * reference.byol_loss(*xd), xd, create_graph=True), xd,
                                 [v.cpu() for v in vec])
    # torch's norm double backward is NaN at an exactly-zero vector (rows 0 of p1 and 1 of t1, plus
    # their partners); the clamped-regime HVP is finite there. Compare every other row.
    finite = torch.stack([torch.isfinite(r).all(dim=1) for r in ref_hv]).all(dim=0)
    assert finite.sum() == 4 and not finite[0] and not finite[1]
    assert all(bool(torch.isfinite(h).all()) for h in hv)
    assert_close_rel("HVP on the finite rows", [h[finite] for h in hv], [r[finite] for r in ref_hv], 1e-12)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_normalized_regression_per_row(backend, device):
    p, t = _inputs(13, 50, torch.float32, device)[:2]
    p.requires_grad_()
    out = normalized_regression(p, t, backend=backend)
    assert out.shape == (13,) and out.dtype == torch.float32
    ref = reference.normalized_regression(p.detach().double().cpu(), t.double().cpu())
    assert_close_rel("per-row loss", out.detach().cpu(), ref, FP32_TOL)
    w = torch.linspace(-1, 2, 13, device=device)
    (g,) = torch.autograd.grad((out * w).sum(), p)
    pd = p.detach().double().cpu().requires_grad_()
    (g_ref,) = torch.autograd.grad((reference.normalized_regression(pd, t.double().cpu()) * w.double().cpu()).sum(), pd)
    assert_close_rel("gradient", g.cpu(), g_ref, FP32_TOL)


# ------------------------------------------------------------------------------ double backward


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, FP32_TOL)])
@pytest.mark.parametrize("targets_require_grad", [False, True], ids=["detached", "targets_grad"])
def test_hvp_through_mlp(backend, device, dtype, tol, targets_require_grad):
    check_hvp(backend, device, dtype, tol, targets_require_grad)


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_cpp), "torch"])
def test_gradcheck_gradgradcheck(backend):
    xs = [x.requires_grad_() for x in _inputs(4, 6, torch.float64, "cpu")]
    fn = lambda *a: byol_loss(*a, backend=backend)
    assert torch.autograd.gradcheck(fn, xs)
    assert torch.autograd.gradgradcheck(fn, xs)
    p, t = (x.detach().clone().requires_grad_() for x in xs[:2])
    row = lambda a, b: normalized_regression(a, b, backend=backend)
    assert torch.autograd.gradcheck(row, (p, t))
    assert torch.autograd.gradgradcheck(row, (p, t))


@needs_cpp
def test_gradgradcheck_detached_targets():
    """Only predictions require grad: the t_grad=False kernels (no target gradient written)."""
    p1, p2, t1, t2 = _inputs(3, 5, torch.float64, "cpu")
    p1.requires_grad_()
    p2.requires_grad_()
    fn = lambda a, b: byol_loss(a, b, t1, t2, backend="cpp")
    assert torch.autograd.gradcheck(fn, (p1, p2))
    assert torch.autograd.gradgradcheck(fn, (p1, p2))


@needs_cpp
def test_third_derivative_raises():
    p, t = (x.requires_grad_() for x in _inputs(2, 3, torch.float64, "cpu")[:2])
    (g,) = torch.autograd.grad(normalized_regression(p, t, backend="cpp").sum(), p, create_graph=True)
    (h,) = torch.autograd.grad((g * g).sum(), p, create_graph=True)
    with pytest.raises(NotImplementedError, match="third derivatives"):
        torch.autograd.grad(h.sum(), p)


# ------------------------------------------------------------------------------ torch.library


def _op_samples(device: str, dtype=torch.float64):
    p, t, wp, wt = _inputs(5, 9, dtype, device)
    g = torch.randn(5, dtype=dtype, device=device)
    ops = byol_mod.extension_ops()
    return ops, [
        (ops.fwd, (p, t)),
        (ops.fwd, (p.clone().requires_grad_(), t.clone().requires_grad_())),
        (ops.bwd, (g, p, t, False)),
        (ops.bwd, (g.clone().requires_grad_(), p.clone().requires_grad_(), t.clone().requires_grad_(), True)),
        (ops.hvp, (g, p, t, wp, None, False)),
        (ops.hvp, (g, p, t, wp, wt, True)),
    ]


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=needs_cpp), pytest.param("cuda", marks=pytest.mark.cuda)])
def test_opcheck_registered_ops(device):
    ops, samples = _op_samples(device)
    for op, args in samples:
        # test_aot_dispatch_dynamic differentiates the op; byol_hvp has no (third-order) derivative.
        tests = ("test_schema", "test_autograd_registration", "test_faketensor")
        if op is not ops.hvp:
            tests += ("test_aot_dispatch_dynamic",)
        torch.library.opcheck(op, args, test_utils=tests)


@needs_cpp
def test_torch_compile_traces_through_ops():
    """fullgraph capture with the fake kernels and registered autograd (aot_eager: no codegen needed)."""
    xs = [x.requires_grad_() for x in _inputs(6, 12, torch.float32, "cpu")]

    def f(p1, p2, t1, t2):
        return normalized_regression(p1, t2, backend="cpp").mean() + normalized_regression(p2, t1, backend="cpp").mean()

    for fn in (f, lambda *a: byol_loss(*a, backend="cpp")):
        compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
        got = torch.autograd.grad(compiled(*xs), xs)
        want = torch.autograd.grad(fn(*xs), xs)
        assert_close_rel("compiled gradients", got, want, 1e-6)



@needs_cpp
@pytest.mark.parametrize("targets_need_grad", [False, True])
def test_hvp_through_a_graph_compiled_with_the_eager_backend_is_exact(targets_need_grad):
    """torch.compile(backend="eager") accepts a double backward; through the fused loss it must be the exact
    HVP (it once raised "element 0 of tensors does not require grad"), cross terms included."""
    torch._dynamo.reset()
    xs = [x.requires_grad_(i < 2 or targets_need_grad) for i, x in enumerate(_inputs(6, 5, torch.float64, "cpu"))]
    wrt = [x for x in xs if x.requires_grad]
    vs = [torch.randn_like(x) for x in wrt]

    def hvp(loss_fn):
        grads = torch.autograd.grad(0.7 * loss_fn(*xs), wrt, create_graph=True)
        return torch.autograd.grad(grads, wrt, vs)

    want = hvp(reference.byol_loss)
    compiled = torch.compile(lambda *a: byol_loss(*a, backend="cpp"), backend="eager")
    assert_close_rel("compiled-graph HVP", hvp(compiled), want, 1e-12)

@needs_cpp
def test_kernels_do_not_write_inputs():
    xs = [x.requires_grad_() for x in _inputs(4, 8, torch.float32, "cpu")]
    before = [x.detach().clone() for x in xs]
    versions = [x._version for x in xs]
    grads = torch.autograd.grad(byol_loss(*xs, backend="cpp"), xs, create_graph=True)
    torch.autograd.grad(grads, xs, [torch.ones_like(x) for x in xs])
    assert [x._version for x in xs] == versions
    assert all(torch.equal(x.detach(), b) for x, b in zip(xs, before))


# ------------------------------------------------------------------------------ API and errors


@needs_cpp
def test_module_function_and_auto_backend():
    xs = _inputs(8, 16, torch.float32, "cpu")
    assert byol_mod._resolve("auto", torch.device("cpu")) == "cpp"
    module = BYOLLoss()
    assert "backend='auto'" in repr(module)
    ref = reference.byol_loss(*xs)
    assert_close_rel("BYOLLoss", module(*xs), ref, FP32_TOL)
    assert_close_rel("BYOLLossFunction", BYOLLossFunction.apply(*xs, "cpp"), ref, FP32_TOL)
    assert_close_rel("byol_loss torch", byol_loss(*xs, backend="torch"), ref, 1e-7)


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda x: (x, x, x, x[:, :5]), ValueError, "shapes must match"),
        (lambda x: (x, x, x, x[0]), ValueError, "must be 2-D"),
        (lambda x: (x, x, x, x.long()), TypeError, "floating dtype"),
        (lambda x: (x, x, x, x[:0]), ValueError, "must not be empty"),
        (lambda x: (x, x, x, x.double()), TypeError, "share one dtype"),
        (lambda x: (x, x, x, x.to("meta")), ValueError, "one device"),
        (lambda x: (x, x, x, x.tolist()), TypeError, "must be a torch.Tensor"),
    ],
    ids=["shape", "ndim", "int", "empty", "dtype_mix", "device_mix", "not_tensor"],
)
def test_bad_inputs(make, exc, match):
    x = torch.randn(4, 6)
    with pytest.raises(exc, match=match):
        byol_loss(*make(x), backend="cpp")


def test_bad_backend():
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match="backend must be"):
        byol_loss(x, x, x, x, backend="fast")
    with pytest.raises(ValueError, match="backend must be"):
        BYOLLoss(backend="fast")
    with pytest.raises(BackendUnavailableError, match="cuda"):
        normalized_regression(x, x, backend="cuda")


@needs_cpp
def test_op_level_checks():
    ops = byol_mod.extension_ops()
    p = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="same shape"):
        ops.fwd(p, p[:, :3])
    with pytest.raises(RuntimeError, match=r"grad must be \[B\]"):
        ops.bwd(torch.ones(2), p, p, False)
    with pytest.raises(RuntimeError, match="wp must have shape"):
        ops.hvp(torch.ones(3), p, p, p[:2], None, False)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_non_contiguous_inputs_and_partial_requires_grad(backend, device):
    check_non_contiguous_and_partial_grad(backend, device)


def check_non_contiguous_and_partial_grad(backend: str, device: str) -> None:
    """Strided views are read correctly; gradients go exactly where requires_grad asks."""
    base = _inputs(20, 24, torch.float64, device)
    xs = [base[0].t()[:20], base[1][:, 2:22], base[2][:, 4:24], base[3].t()[:20]]
    assert not xs[0].is_contiguous() and not xs[1].is_contiguous()
    ref = reference.byol_loss(*[x.cpu() for x in xs])
    assert_close_rel("loss", byol_loss(*xs, backend=backend).cpu(), ref, 1e-12)
    for mask in [(False, False, True, False), (True, False, False, False), (False, True, False, True)]:
        leaves = [x.detach().clone().requires_grad_(m) for x, m in zip(xs, mask)]
        want_in = [x for x in leaves if x.requires_grad]
        got = torch.autograd.grad(byol_loss(*leaves, backend=backend), want_in)
        ref_leaves = [x.detach().cpu().requires_grad_(m) for x, m in zip(xs, mask)]
        want = torch.autograd.grad(reference.byol_loss(*ref_leaves), [x for x in ref_leaves if x.requires_grad])
        assert_close_rel(f"gradients for requires_grad={mask}", [g.cpu() for g in got], want, 1e-12)


@pytest.mark.parametrize("targets_move", [False, True], ids=["detached", "targets_tangent"])
def test_forward_over_reverse_matches_reference(targets_move):
    """``torch.func.jvp`` of ``torch.func.grad`` (the solver's "fwd-rev" product) and the loss's own
    JVP through the fused ops equal the same transforms of the reference, in float64."""
    if not backends()["cpp"]:
        pytest.skip("the C++ extension is not built")
    ins = tuple(torch.randn(5, 7, dtype=torch.float64) for _ in range(4))
    tangents = tuple(torch.randn(5, 7, dtype=torch.float64) for _ in range(4))
    argnums = (0, 1, 2, 3) if targets_move else (0, 1)

    def transforms(loss):
        def f(*xs):
            full = (*xs, *ins[len(xs):])
            return loss(*full) + full[0].pow(3).sum()

        primals, tans = ins[: len(argnums)], tangents[: len(argnums)]
        hvp = torch.func.jvp(torch.func.grad(f, argnums=argnums), primals, tans)[1]
        return (*hvp, torch.func.jvp(f, primals, tans)[1])

    got = transforms(lambda *xs: byol_loss(*xs, backend="cpp"))
    expected = transforms(reference.byol_loss)
    names = [f"fwd-rev HVP [{i}]" for i in range(len(got) - 1)] + ["directional derivative"]
    for name, g, e in zip(names, got, expected):
        assert_close_rel(name, g, e, 1e-12)
