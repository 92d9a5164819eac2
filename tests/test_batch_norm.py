"""Fused BatchNorm (bissl_fast.ops.batch_norm, bissl_fast.nn) against torch.nn.BatchNorm1d/2d: outputs,
gradients, double gradients, running statistics, gradcheck/gradgradcheck in float64, module drop-in
behaviour, convert_batchnorm and an HVP through a converted SmallResNet; C++ CPU kernel (always) and
CUDA kernel (marked ``cuda``)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers import rel_err
from torch import nn

from bissl_fast import (
    BackendUnavailableError,
    BatchNorm1d,
    BatchNorm2d,
    batch_norm,
    convert_batchnorm,
)
from bissl_fast._backends import backend_reasons, backends
from bissl_fast.ops import batch_norm as bn_mod
from bissl_fast.train.models import SmallResNet

needs_cpp = pytest.mark.skipif(not backends()["cpp"], reason=backend_reasons().get("cpp", ""))
KERNEL_BACKENDS = [
    pytest.param("cpp", "cpu", id="cpp", marks=needs_cpp),
    pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.cuda),
]
FP32_TOL = 1e-5
LOW_PRECISION_TOL = 1e-2
F64_TOL = 1e-10

# (shape, module class): 2d, 1d [N, C], 1d [N, C, L], N=1 with spatial dims, C=1, H*W=1, odd sizes.
SHAPES = [
    ((8, 5, 6, 7), "2d"),
    ((16, 6), "1d"),
    ((4, 3, 9), "1d"),
    ((1, 3, 4, 5), "2d"),
    ((6, 1, 3, 3), "2d"),
    ((7, 4, 1, 1), "2d"),
    ((3, 17, 5, 3), "2d"),
]


def _torch_cls(kind: str) -> type[nn.Module]:
    return nn.BatchNorm2d if kind == "2d" else nn.BatchNorm1d


def _fused_cls(kind: str) -> type[nn.Module]:
    return BatchNorm2d if kind == "2d" else BatchNorm1d


def _module_pair(kind: str, c: int, backend: str, device: str, dtype: torch.dtype, **kwargs):
    """(torch module, fused module) with the same random parameters and running statistics."""
    ref = _torch_cls(kind)(c, **kwargs).to(device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(c)
    with torch.no_grad():
        if ref.affine:
            ref.weight.copy_(1 + 0.5 * torch.randn(c, generator=gen))
            ref.bias.copy_(0.3 * torch.randn(c, generator=gen))
        if ref.running_mean is not None:
            ref.running_mean.copy_(0.2 * torch.randn(c, generator=gen))
            ref.running_var.copy_(0.5 + torch.rand(c, generator=gen))
    fused = _fused_cls(kind)(c, backend=backend, **kwargs).to(device=device, dtype=dtype)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def _input(shape, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (2 * torch.randn(shape, generator=gen, dtype=torch.float64) + 0.7).to(dtype).to(device)


def _params(m: nn.Module) -> list[torch.Tensor]:
    return [p for p in (m.weight, m.bias) if p is not None]


def _buffers(m: nn.Module) -> list[torch.Tensor]:
    return [b for b in (m.running_mean, m.running_var) if b is not None]


# ------------------------------------------------------------------------------ forward and backward


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("shape,kind", SHAPES)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("mode", ["train", "eval", "train_untracked", "eval_untracked"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32_TOL), (torch.bfloat16, LOW_PRECISION_TOL)], ids=["fp32", "bf16"])
def test_forward_backward_match_torch(backend, device, shape, kind, affine, mode, dtype, tol):
    """Output, input/weight/bias gradients (non-unit upstream) and running statistics against a
    float64 torch.nn.BatchNorm on the same values."""
    track = not mode.endswith("untracked")
    ref, fused = _module_pair(kind, shape[1], backend, device, dtype, affine=affine, track_running_stats=track)
    ref = ref.double()
    if mode.startswith("eval"):
        ref.eval()
        fused.eval()
    x = _input(shape, dtype, device).requires_grad_()
    xd = x.detach().double().requires_grad_()
    y = fused(x)
    y_ref = ref(xd)
    assert y.dtype == dtype and y.shape == x.shape
    assert rel_err(y.detach().cpu(), y_ref.detach().cpu()) < tol
    # Not the input's generator and seed: an upstream gradient parallel to the input has a near-zero gx.
    gy = torch.randn(shape, generator=torch.Generator().manual_seed(99), dtype=torch.float64).to(device)
    grads = torch.autograd.grad(y, [x, *_params(fused)], gy.to(dtype))
    grads_ref = torch.autograd.grad(y_ref, [xd, *_params(ref)], gy.to(dtype).double())
    for g, gr in zip(grads, grads_ref):
        assert rel_err(g.cpu(), gr.cpu()) < tol
    for b, br in zip(_buffers(fused), _buffers(ref)):
        assert rel_err(b.cpu(), br.cpu()) < tol
    if track:
        assert int(fused.num_batches_tracked) == int(ref.num_batches_tracked)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("shape,kind", SHAPES)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, F64_TOL), (torch.float32, FP32_TOL), (torch.bfloat16, LOW_PRECISION_TOL)],
                         ids=["fp64", "fp32", "bf16"])
def test_double_backward_matches_torch(backend, device, shape, kind, affine, training, dtype, tol):
    """Gradients of <(gx, gw, gb), random directions> w.r.t. input, weight and grad_output."""
    ref, fused = _module_pair(kind, shape[1], backend, device, dtype, affine=affine)
    ref = ref.double()
    ref.train(training)
    fused.train(training)
    x = _input(shape, dtype, device).requires_grad_()
    xd = x.detach().double().requires_grad_()
    gen = torch.Generator().manual_seed(5)
    # The float64 reference runs on the same (rounded) values as the kernel.
    gy = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(device).requires_grad_()
    gyd = gy.detach().double().requires_grad_()
    dirs = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(dtype).double().to(device)
            for t in [x, *_params(fused)]]

    def second(module, inp, upstream, directions, cast):
        params = _params(module)
        first = torch.autograd.grad(module(inp), [inp, *params], upstream, create_graph=True)
        inner = sum((f * cast(d)).sum() for f, d in zip(first, directions))
        # Eval mode without affine: gx = s g does not depend on the input; its gradient is zero.
        return torch.autograd.grad(inner, [inp, *params[:1], upstream], allow_unused=True, materialize_grads=True)

    got = second(fused, x, gy, dirs, lambda d: d.to(dtype))
    want = second(ref, xd, gyd, dirs, lambda d: d)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert rel_err(g.cpu(), w.cpu()) < tol


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("shape", [(3, 2, 2, 3), (5, 3)])
def test_gradcheck_gradgradcheck_float64(backend, device, training, affine, shape):
    c = shape[1]
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) + 0.5).to(device).requires_grad_()
    rm = (0.1 * torch.randn(c, generator=gen, dtype=torch.float64)).to(device)
    rv = (0.5 + torch.rand(c, generator=gen, dtype=torch.float64)).to(device)
    inputs = [x]
    if affine:
        inputs += [(1 + 0.3 * torch.randn(c, generator=gen, dtype=torch.float64)).to(device).requires_grad_(),
                   (0.2 * torch.randn(c, generator=gen, dtype=torch.float64)).to(device).requires_grad_()]

    def fn(x, *wb):
        w, b = wb if wb else (None, None)
        # Clones: gradcheck evaluates many times and training must not drift the statistics it normalizes with.
        return batch_norm(x, rm.clone(), rv.clone(), w, b, training=training, momentum=0.1, eps=1e-5, backend=backend)

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


# ------------------------------------------------------------------------------ running statistics


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("momentum", [0.1, 0.7, None], ids=["m0.1", "m0.7", "cumulative"])
def test_running_stats_over_several_steps(backend, device, momentum):
    """Updated once per forward (unbiased variance), cumulative average with momentum=None, and never by
    the backward or double backward."""
    ref, fused = _module_pair("2d", 4, backend, device, torch.float64, momentum=momentum)
    for step in range(3):
        x = _input((5, 4, 3, 2), torch.float64, device, seed=step).requires_grad_()
        y, y_ref = fused(x), ref(x)
        g = torch.autograd.grad(y.square().sum(), [x, fused.weight], create_graph=True)
        torch.autograd.grad(sum(t.sum() for t in g), [x, fused.weight])
        assert rel_err(y.detach().cpu(), y_ref.detach().cpu()) < F64_TOL
        for b, br in zip(_buffers(fused), _buffers(ref)):
            assert rel_err(b.cpu(), br.cpu()) < F64_TOL
        assert int(fused.num_batches_tracked) == int(ref.num_batches_tracked) == step + 1


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_mixed_precision_float32_parameters_with_bf16_input(backend, device):
    ref = nn.BatchNorm2d(3).to(device)
    fused = BatchNorm2d(3, backend=backend).to(device)
    x = _input((4, 3, 5, 5), torch.bfloat16, device)
    y, y_ref = fused(x), ref(x)
    assert y.dtype == torch.bfloat16 and fused.running_mean.dtype == torch.float32
    assert rel_err(y.detach().float().cpu(), y_ref.detach().float().cpu()) < LOW_PRECISION_TOL
    assert rel_err(fused.running_var.cpu(), ref.running_var.cpu()) < FP32_TOL


# ------------------------------------------------------------------------------ modules and conversion


def test_module_is_a_drop_in():
    ref, fused = nn.BatchNorm2d(7, momentum=None, affine=True), BatchNorm2d(7, momentum=None, affine=True)
    assert isinstance(fused, nn.BatchNorm2d)
    assert repr(fused) == repr(ref)
    assert list(fused.state_dict()) == list(ref.state_dict())
    ref.running_mean.fill_(0.25)
    fused.load_state_dict(ref.state_dict())
    assert torch.equal(fused.running_mean, ref.running_mean)
    fused.reset_running_stats()
    assert torch.equal(fused.running_mean, torch.zeros(7)) and int(fused.num_batches_tracked) == 0
    one_d = BatchNorm1d(5, affine=False, track_running_stats=False)
    assert repr(one_d) == repr(nn.BatchNorm1d(5, affine=False, track_running_stats=False))
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        one_d(torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match="backend"):
        BatchNorm2d(3, backend="fast")


def _hand_built_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 5 * 5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3),
    )


@needs_cpp
def test_convert_batchnorm_keeps_parameters_buffers_and_outputs():
    net = _hand_built_net().double()
    ref = copy.deepcopy(net)
    params = {name: p for name, p in net.named_parameters()}
    buffers = {name: b for name, b in net.named_buffers()}
    assert convert_batchnorm(net) is net
    assert isinstance(net[1], BatchNorm2d) and isinstance(net[5], BatchNorm1d)
    assert all(p is params[name] for name, p in net.named_parameters())
    assert all(b is buffers[name] for name, b in net.named_buffers())
    assert list(net.state_dict()) == list(ref.state_dict())
    x = torch.randn(8, 2, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(net(x), ref(x)) < F64_TOL
        for b, br in zip(net.buffers(), ref.buffers()):
            assert rel_err(b, br) < F64_TOL
        net.eval()
        ref.eval()
        assert rel_err(net(x), ref(x)) < F64_TOL
    # A BatchNorm that is the model itself is converted too.
    root = nn.BatchNorm1d(3)
    assert isinstance(convert_batchnorm(root, backend="torch"), BatchNorm1d) and root.backend == "torch"


def test_convert_batchnorm_leaves_sync_batchnorm_with_a_warning():
    net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.SyncBatchNorm(2), nn.BatchNorm2d(2))
    with pytest.warns(UserWarning, match="SyncBatchNorm"):
        convert_batchnorm(net)
    assert type(net[1]) is nn.SyncBatchNorm and isinstance(net[2], BatchNorm2d)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert_batchnorm(_hand_built_net())
    with pytest.raises(TypeError, match="nn.Module"):
        convert_batchnorm("resnet")


def _resnet_hvp(model: nn.Module, x: torch.Tensor, v_seed: int = 3) -> tuple[torch.Tensor, ...]:
    params = [p for p in model.parameters()]
    feats = model(x)
    loss = (feats.square().mean(dim=1) - feats.mean(dim=1)).mean() + feats.std(dim=0).sum()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    gen = torch.Generator().manual_seed(v_seed)
    vs = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    return torch.autograd.grad(grads, params, vs)


@needs_cpp
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_hvp_through_converted_small_resnet_equals_torch(training, one_intra_op_thread):
    torch.manual_seed(1)
    model = SmallResNet(in_channels=2, widths=(4, 8), blocks=(1, 1)).double().train(training)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    ref = copy.deepcopy(model)
    convert_batchnorm(model, backend="cpp")
    x = torch.randn(6, 2, 8, 8, dtype=torch.float64)
    assert rel_err(_resnet_hvp(model, x), _resnet_hvp(ref, x)) < F64_TOL
    for b, br in zip(model.buffers(), ref.buffers()):
        assert rel_err(b.double(), br.double()) < F64_TOL


@needs_cpp
def test_fwd_rev_products_through_converted_model_equal_rev_rev(one_intra_op_thread):
    """Under torch.func (HessianOperator fwd-rev) the layers compute with PyTorch's batch_norm: same products."""
    from bissl_fast.solver import HessianOperator

    torch.manual_seed(2)
    model = convert_batchnorm(SmallResNet(2, widths=(4, 8)).double(), backend="cpp")
    x = torch.randn(6, 2, 8, 8, dtype=torch.float64)
    params = tuple(model.parameters())

    def loss():
        feats = model(x)
        return feats.square().mean() + feats.std(dim=0).sum()

    v = tuple(torch.randn_like(p) for p in params)
    rev_rev = HessianOperator(loss, params, mode="rev-rev").matvec(v)
    fwd_rev = HessianOperator(loss, params, mode="fwd-rev", module=model).matvec(v)
    assert rel_err(fwd_rev, rev_rev) < F64_TOL


@needs_cpp
def test_fused_backend_runs_the_fused_ops_in_every_pass():
    """The HVP graph holds the fused backward ops, not PyTorch's BatchNorm backward."""
    layer = BatchNorm2d(3, backend="cpp").double()
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).pow(3).sum(), [x], create_graph=True)
    names = []
    stack = [gx.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn.name() in names:
            continue
        names.append(fn.name())
        stack.extend(f for f, _ in fn.next_functions)
    assert not any("NativeBatchNorm" in n for n in names)
    assert any("batch_norm_bwd" in n for n in names)


# ------------------------------------------------------------------------------ op contract


@needs_cpp
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_opcheck(training):
    bn_mod.extension_ops()
    ops = torch.ops.bissl_fast
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    torch.library.opcheck(ops.batch_norm_fwd.default, (x, w, b, rm, rv, training, 0.1, 1e-5))
    torch.library.opcheck(ops.batch_norm_fwd.default, (x, None, None, None, None, True, 0.1, 1e-5))
    _, mean, invstd, _, _ = ops.batch_norm_fwd(x.detach(), w.detach(), b.detach(), rm, rv, training, 0.1, 1e-5)
    g = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(ops.batch_norm_bwd.default, (g, x, w, mean, invstd, training, [True, True, True]))
    torch.library.opcheck(ops.batch_norm_bwd.default, (g, x, None, mean, invstd, training, [True, False, False]))
    ggi, ggw, ggb = torch.randn_like(x), torch.randn_like(w), torch.randn_like(b)
    torch.library.opcheck(ops.batch_norm_dbwd.default,
                          (ggi.detach(), ggw.detach(), ggb.detach(), g.detach(), x.detach(), w.detach(), mean, invstd,
                           training, [True, True, True]))
    torch.library.opcheck(ops.batch_norm_dbwd.default,
                          (None, ggw.detach(), None, g.detach(), x.detach(), w.detach(), mean, invstd, training,
                           [True, True, False]))


@needs_cpp
def test_third_derivative_raises():
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    y = batch_norm(x, None, None, training=True, backend="cpp")
    (gx,) = torch.autograd.grad(y.pow(3).sum(), [x], create_graph=True)
    (ggx,) = torch.autograd.grad(gx.pow(2).sum(), [x], create_graph=True)
    with pytest.raises(NotImplementedError, match="third derivatives"):
        torch.autograd.grad(ggx.sum(), [x])


@needs_cpp
def test_channels_last_input_gives_the_same_values():
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64).to(memory_format=torch.channels_last)
    got = batch_norm(x, None, None, training=True, backend="cpp")
    want = torch.nn.functional.batch_norm(x, None, None, training=True)
    assert rel_err(got, want) < F64_TOL


# ------------------------------------------------------------------------------ input validation


@needs_cpp
def test_bad_inputs_raise_clear_errors():
    x = torch.randn(4, 3, 2, 2)
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match=r"\[N, C, \*\]"):
        batch_norm(torch.randn(5), None, None, training=True, backend="cpp")
    with pytest.raises(ValueError, match="running_mean must have shape"):
        batch_norm(x, torch.zeros(4), rv, training=True, backend="cpp")
    with pytest.raises(TypeError, match="weight must have dtype"):
        batch_norm(x, rm, rv, torch.ones(3, dtype=torch.float64), backend="cpp")
    with pytest.raises(ValueError, match="together"):
        batch_norm(x, rm, None, training=True, backend="cpp")
    with pytest.raises(ValueError, match="eval mode"):
        batch_norm(x, None, None, training=False, backend="cpp")
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        batch_norm(torch.randn(1, 3, 1, 1), None, None, training=True, backend="cpp")
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        BatchNorm1d(3, backend="cpp")(torch.randn(1, 3))
    with pytest.raises(ValueError, match="eps"):
        batch_norm(x, rm, rv, training=True, eps=0.0, backend="cpp")
    with pytest.raises(TypeError, match="floating"):
        batch_norm(x.long(), rm, rv, backend="cpp")
    with pytest.raises(ValueError, match="backend"):
        batch_norm(x, rm, rv, backend="fast")
    # The ops themselves check too (direct torch.ops callers).
    bn_mod.extension_ops()
    with pytest.raises(RuntimeError, match="grad_out must have shape"):
        torch.ops.bissl_fast.batch_norm_bwd(torch.randn(4, 3), x, None, rm, rv, True, [True, False, False])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_unavailable_backend_raises():
    with pytest.raises(BackendUnavailableError):
        batch_norm(torch.randn(4, 3), None, None, training=True, backend="cuda")
