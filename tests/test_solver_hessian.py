"""HessianOperator: products vs autograd and the paper's recompute, batching, fwd-rev, lifetime, errors.

Problems are small conv nets with train-mode BatchNorm + MLP projector (2 samples x 2 views of
1x8x8 images) under the SimCLR and BYOL losses. The builders here are reused by test_solver_cg.py.
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import weakref
from collections.abc import Callable

import pytest
import torch
from helpers import rel_err
from torch import nn

from bissl_fast import reference as R
from bissl_fast.bench.memory import peak_memory_bytes
from bissl_fast.solver import HessianOperator
from bissl_fast.train.models import PretextModel, SmallResNet

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _losses(impl: str) -> tuple[Callable, Callable]:
    if impl == "reference":
        return R.nt_xent, R.byol_loss
    import bissl_fast

    return bissl_fast.nt_xent, bissl_fast.byol_loss


class _Online(nn.Module):
    """BYOL online network: backbone -> projector -> predictor."""

    def __init__(self, model: PretextModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.predictor(self.model(x))


@dataclasses.dataclass
class Problem:
    net: nn.Module  # the online network: images -> embeddings (SimCLR z, BYOL predictions)
    params: tuple[torch.Tensor, ...]  # backbone parameters (the BiSSL lower parameters)
    names: list[str]
    loss_with: Callable[[Callable[[torch.Tensor], torch.Tensor]], torch.Tensor]  # loss given a forward
    calls_per_loss: int  # forward passes of net per loss evaluation
    modules: nn.Module  # every network the loss runs (BYOL: online + target), for fwd-rev

    def loss_fn(self) -> torch.Tensor:
        return self.loss_with(self.net)

    def functional_loss(self, *ps: torch.Tensor) -> torch.Tensor:
        fwd = lambda x: torch.func.functional_call(self.net, dict(zip(self.names, ps)), (x,))
        return self.loss_with(fwd)

    def bn_state(self) -> list[torch.Tensor]:
        return [b.clone() for b in self.modules.buffers()]


def make_problem(
    kind: str, impl: str = "reference", dtype: torch.dtype = torch.float64, seed: int = 0, data_seed: int | None = None
) -> Problem:
    """``seed`` fixes the weights; ``data_seed`` (default: the same stream) the batch."""
    torch.manual_seed(seed)
    nt_xent, byol_loss = _losses(impl)
    backbone = SmallResNet(in_channels=1, widths=(8, 16))
    if kind == "simclr":
        net = PretextModel(backbone, backbone.out_dim, proj_dim=8, hidden_dim=16).to(dtype)
        if data_seed is not None:
            torch.manual_seed(data_seed)
        x = torch.randn(4, 1, 8, 8, dtype=torch.float64).to(dtype)  # view-major: 2 views x 2 samples

        def loss_with(fwd):
            return nt_xent(fwd(x), 0.5)

        calls, modules = 1, net
    elif kind == "byol":
        model = PretextModel(backbone, backbone.out_dim, proj_dim=8, hidden_dim=16, predictor=True).to(dtype)
        net = _Online(model)
        target = copy.deepcopy(model).requires_grad_(False)
        if data_seed is not None:
            torch.manual_seed(data_seed)
        x1, x2 = torch.randn(2, 2, 1, 8, 8, dtype=torch.float64).to(dtype)

        def loss_with(fwd):
            with torch.no_grad():
                t1, t2 = target(x1), target(x2)
            return byol_loss(fwd(x1), fwd(x2), t1, t2)

        calls, modules = 2, nn.ModuleList([net, target])
    else:
        raise ValueError(kind)
    prefix = "model.backbone." if kind == "byol" else "backbone."
    names = [prefix + n for n, _ in backbone.named_parameters()]
    return Problem(net, tuple(backbone.parameters()), names, loss_with, calls, modules)


def make_tiny_problem(dtype: torch.dtype = torch.float64, seed: int = 0) -> Problem:
    """69 parameters (MLP with train-mode BatchNorm, SimCLR loss): small enough for a dense Hessian."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 4)).to(dtype)
    x = torch.randn(8, 6, dtype=torch.float64).to(dtype)

    def loss_with(fwd):
        return R.nt_xent(fwd(x), 0.5)

    names = [n for n, _ in net.named_parameters()]
    return Problem(net, tuple(net.parameters()), names, loss_with, 1, net)


def random_like(params, seed: int = 1, k: int | None = None) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    shape = (lambda p: p.shape) if k is None else (lambda p: (k, *p.shape))
    return tuple(torch.randn(shape(p), generator=gen, dtype=torch.float64).to(p.dtype) for p in params)


CASES = [("simclr", "reference"), ("byol", "reference"), ("simclr", "fused"), ("byol", "fused")]


def dense_hessian(prob: Problem) -> torch.Tensor:
    """Dense Hessian of the tiny problem over the concatenated parameters (float64)."""
    sizes = [p.numel() for p in prob.params]

    def flat_loss(theta):
        parts = [t.view(p.shape) for t, p in zip(theta.split(sizes), prob.params)]
        return prob.functional_loss(*parts)

    theta = torch.cat([p.detach().reshape(-1) for p in prob.params])
    return torch.autograd.functional.hessian(flat_loss, theta)


@pytest.mark.parametrize("kind,impl", CASES)
def test_matvec_matches_autograd_hvp_and_paper_recompute(kind, impl):
    prob = make_problem(kind, impl)
    v = random_like(prob.params)
    if impl == "reference":
        ref = torch.autograd.functional.hvp(prob.functional_loss, prob.params, v)[1]
    else:
        # autograd.functional.hvp needs third derivatives (double-backward trick), which the fused
        # losses do not provide: compare with the reference loss on the same net and batch.
        plain = make_problem(kind, "reference")
        ref = R.hvp(plain.loss_fn, plain.params, v)
    paper = R.hvp(prob.loss_fn, prob.params, v)
    assert rel_err(paper, ref) < 1e-10
    with HessianOperator(prob.loss_fn, prob.params) as op:
        first, second = op.matvec(v), op.matvec(v)  # the second product reuses the retained graph
        assert op.num_products == 2
    assert rel_err(first, ref) < 1e-10
    assert rel_err(second, ref) < 1e-10
    with HessianOperator(prob.loss_fn, prob.params, recompute=True) as op:
        assert rel_err(op.matvec(v), paper) < 1e-12


@pytest.mark.parametrize("mode", ["rev-rev", "fwd-rev"])
@pytest.mark.parametrize("kind", ["simclr", "byol"])
def test_matmat_equals_k_matvecs(kind, mode):
    prob = make_problem(kind)
    vs = random_like(prob.params, k=3)
    with HessianOperator(prob.loss_fn, prob.params, mode=mode, module=prob.modules) as op:
        batched = op.matmat(vs)
        for j in range(3):
            single = op.matvec(tuple(t[j] for t in vs))
            assert rel_err(tuple(t[j] for t in batched), single) < 1e-10


@pytest.mark.parametrize("kind", ["simclr", "byol"])
def test_fwd_rev_matvec_with_the_fused_losses(kind):
    prob = make_problem(kind, "fused")
    v = random_like(prob.params)
    with HessianOperator.from_module(prob.modules, prob.loss_fn, prob.params) as op:
        fwd_rev = op.matvec(v)
    with HessianOperator(prob.loss_fn, prob.params, mode="rev-rev") as op:
        assert rel_err(fwd_rev, op.matvec(v)) < 1e-10


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("kind", ["simclr", "byol"])
def test_fwd_rev_equals_rev_rev_and_leaves_running_stats_alone(kind, dtype, tol):
    prob = make_problem(kind, dtype=dtype)
    v = random_like(prob.params)
    before = prob.bn_state()
    with HessianOperator.from_module(prob.modules, prob.loss_fn, prob.params) as op:
        assert op.mode == "fwd-rev"
        fwd_rev = op.matvec(v)
        op.matmat(random_like(prob.params, k=2))
    after = prob.bn_state()
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "fwd-rev changed BatchNorm running stats"
    assert all(m.track_running_stats for m in prob.modules.modules() if isinstance(m, nn.BatchNorm2d))
    with HessianOperator(prob.loss_fn, prob.params, mode="rev-rev") as op:
        rev_rev = op.matvec(v)
    ref = torch.autograd.functional.hvp(
        prob.functional_loss, tuple(p.double() for p in prob.params), tuple(t.double() for t in v)
    )[1] if dtype == torch.float64 else rev_rev
    assert rel_err(fwd_rev, rev_rev) < tol
    assert rel_err(rev_rev, ref) < tol


def _batches_tracked(net: nn.Module) -> int:
    return int(next(m for m in net.modules() if isinstance(m, nn.BatchNorm2d)).num_batches_tracked)


def test_running_stats_update_once_per_build_not_per_product():
    prob = make_problem("byol")
    v = random_like(prob.params)
    start = _batches_tracked(prob.net)
    with HessianOperator(prob.loss_fn, prob.params) as op:
        assert _batches_tracked(prob.net) == start + prob.calls_per_loss
        op.matvec(v)
        op.matmat(random_like(prob.params, k=2))
        assert _batches_tracked(prob.net) == start + prob.calls_per_loss
    with HessianOperator(prob.loss_fn, prob.params, recompute=True) as op:
        op.matvec(v)
        op.matvec(v)
    assert _batches_tracked(prob.net) == start + 3 * prob.calls_per_loss  # the paper: one forward per product


def test_parameter_outside_the_loss_gets_zero_product():
    prob = make_problem("simclr")
    unused = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    params = (*prob.params, unused)
    v = random_like(params)
    with HessianOperator(prob.loss_fn, params) as op:
        out = op.matvec(v)
        batched = op.matmat(random_like(params, k=2))
    assert torch.equal(out[-1], torch.zeros(3, 2, dtype=torch.float64))
    assert torch.equal(batched[-1], torch.zeros(2, 3, 2, dtype=torch.float64))
    assert rel_err(out[:-1], R.hvp(prob.loss_fn, prob.params, v[:-1])) < 1e-10


def test_release_frees_the_graph_and_forbids_use():
    prob = make_problem("simclr", dtype=torch.float32)
    v = random_like(prob.params)
    op = HessianOperator(prob.loss_fn, prob.params)
    graph_refs = [weakref.ref(g) for g in op._grads]
    op.matvec(v)
    op.release()
    assert all(ref() is None for ref in graph_refs), "gradient graph still alive after release()"
    assert op.released
    with pytest.raises(RuntimeError, match="released"):
        op.matvec(v)
    with pytest.raises(RuntimeError, match="released"):
        op.matmat(random_like(prob.params, k=1))
    with HessianOperator(prob.loss_fn, prob.params) as op2:
        pass
    with pytest.raises(RuntimeError, match="released"):
        op2.matvec(v)


def test_no_memory_growth_over_50_operator_lifetimes():
    prob = make_tiny_problem(torch.float32)
    v = random_like(prob.params)
    refs: list[weakref.ref] = []

    def lifetimes(n: int) -> None:
        for _ in range(n):
            with HessianOperator(prob.loss_fn, prob.params) as op:
                refs.extend(weakref.ref(g) for g in op._grads)
                op.matvec(v)

    one = peak_memory_bytes(lambda: lifetimes(1))
    fifty = peak_memory_bytes(lambda: lifetimes(50))
    assert all(ref() is None for ref in refs), "a released operator's graph is still alive"
    gc.collect()
    # Fifty build-use-release cycles peak like one: nothing accumulates between lifetimes.
    assert fifty <= 1.05 * one, (one, fifty)


def test_bad_inputs_raise_clear_errors():
    prob = make_problem("simclr")
    prob_x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    v = random_like(prob.params)
    with pytest.raises(TypeError, match="loss_fn"):
        HessianOperator(3.0, prob.params)
    with pytest.raises(ValueError, match="params must not be empty"):
        HessianOperator(prob.loss_fn, ())
    with pytest.raises(ValueError, match="does not require grad"):
        HessianOperator(prob.loss_fn, (torch.zeros(2, dtype=torch.float64),))
    with pytest.raises(ValueError, match="mode"):
        HessianOperator(prob.loss_fn, prob.params, mode="rev-fwd")
    with pytest.raises(ValueError, match="module="):
        HessianOperator(prob.loss_fn, prob.params, mode="fwd-rev")
    with pytest.raises(ValueError, match="recompute"):
        HessianOperator(prob.loss_fn, prob.params, mode="fwd-rev", module=prob.net, recompute=True)
    with pytest.raises(ValueError, match="not a parameter of module"):
        HessianOperator(prob.loss_fn, prob.params, mode="fwd-rev", module=nn.Linear(2, 2))
    with pytest.raises(ValueError, match="scalar"):
        HessianOperator(lambda: prob.loss_fn().expand(2), prob.params)
    byol = make_problem("byol")
    with (
        HessianOperator(byol.loss_fn, byol.params, mode="fwd-rev", module=byol.net) as op,
        pytest.raises(RuntimeError, match="target network"),
    ):
        op.matvec(random_like(byol.params))

    class OldStyleSquare(torch.autograd.Function):  # no setup_context: unusable under torch.func
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        def backward(ctx, g):
            return 2 * ctx.saved_tensors[0] * g

    with (
        HessianOperator(lambda: OldStyleSquare.apply(prob.net(prob_x)).sum(), prob.params, mode="fwd-rev",
                        module=prob.net) as op,
        pytest.raises(RuntimeError, match="without torch.func support"),
    ):
        op.matvec(v)
    with HessianOperator(prob.loss_fn, prob.params) as op:
        with pytest.raises(ValueError, match=r"v\[0\] must have shape"):
            op.matvec((v[0][:1], *v[1:]))
        with pytest.raises(ValueError, match="one per parameter"):
            op.matvec(v[:-1])
        with pytest.raises(TypeError, match="dtype"):
            op.matvec(tuple(t.float() for t in v))
        with pytest.raises(ValueError, match=r"\[k, \*params\[0\]\.shape\]"):
            op.matmat(v)
        with pytest.raises(ValueError, match="one per parameter"):
            op.matmat(random_like(prob.params, k=2)[:-1])
