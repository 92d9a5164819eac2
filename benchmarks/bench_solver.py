"""Solver benchmarks.

(a) One BiSSL upper stage: 8 implicit-gradient solves x 5 CG iterations on ONE lower batch.
    ``reference``: ``bissl_fast.reference.implicit_grad`` (forward + create_graph gradient + double
    backward for every product, per-tensor Python CG loop). ``rev-rev``: one ``HessianOperator``
    for the stage (graph built once, one double backward per product) + ``ImplicitGradient`` with
    the auto vector backend. ``rev-rev+fused-bn``: the same with every BatchNorm of the pretext model
    converted to the fused kernels (``bissl_fast.convert_batchnorm``, what ``BiSSLTrainer`` does on
    CPU by default). ``fwd-rev``: forward-over-reverse products. The results are checked
    against the reference before timing (rel err < 1e-5 fp32 for rev-rev), and each speedup is
    measured interleaved with the reference stage.
    CPU (one thread): the built-in SmallResNet at widths (16, 32) and (16, 32, 64), and a plain
    conv-BatchNorm-ReLU net without shortcuts, 16 images per view at 12x12; fwd-rev on the first
    only (it is slower than the recompute on CPU and not what ``auto`` picks). CUDA: resnet18_cifar
    and torchvision's ResNet-50 (skipped when torchvision is missing) at pretext batch 256, 32x32
    and 96x96.
(b) CG vector work of a 5-iteration solve with the product excluded (the matvec returns its
    input), on ResNet-50's 161 parameter shapes (CUDA: 25.6 M parameters; CPU: channels / 4).

The per-layer-type split of one product and one stage is ``bissl_fast.bench.profile_hvp`` (``bissl-fast bench`` runs it with this suite).
"""
from __future__ import annotations

import pytest
import torch
from bench_utils import bench_sizes_full, sizes_timed
from torch import nn

from bissl_fast import reference
from bissl_fast._backends import backends
from bissl_fast.bench.profile_hvp import StageProblem, stage_backbone, stage_problem
from bissl_fast.bench.timing import StreamFloor
from bissl_fast.nn import convert_batchnorm
from bissl_fast.solver import HessianOperator, ImplicitGradient, cg_solve, check_damping

SOLVES, CG_ITERS = 8, 5


def _rel_err(out, ref) -> float:
    num = sum(float((o.double() - r.double()).pow(2).sum()) for o, r in zip(out, ref))
    den = sum(float(r.double().pow(2).sum()) for r in ref)
    return (num / den) ** 0.5


def _stage_problem(
    loss: str, backbone: str, batch: int, res: int, device: torch.device, fused_bn: bool = False
) -> StageProblem:
    """The stage's lower batch and model; seeded, so two calls build identical weights and inputs."""
    torch.manual_seed(0)
    if backbone == "resnet50":
        torchvision = pytest.importorskip("torchvision")
        net = torchvision.models.resnet50()
        net.fc = nn.Identity()
        dim = 2048
    else:
        net, dim = stage_backbone(backbone)
    problem = stage_problem(loss, net, dim, batch, res, device, SOLVES)
    if fused_bn:
        convert_batchnorm(problem.modules)
    return problem


def _stage(provider: str, loss_fn, modules, params, vs, damping: float):
    if provider == "reference":
        return [reference.implicit_grad(loss_fn, params, v, damping=damping, iters=CG_ITERS) for v in vs]
    solver = ImplicitGradient(params, damping=damping, iters=CG_ITERS)
    with HessianOperator(loss_fn, params, mode=provider.removesuffix("+fused-bn"), module=modules) as op:
        return [solver.solve(op, v) for v in vs]


_dampings: dict[tuple, float] = {}


def _damping(key: tuple, loss_fn, params) -> float:
    """The paper's damping (10), raised to 2 |lambda_min| when that leaves the system indefinite.

    At random init the pretext Hessian has large negative eigenvalues, and CG on an indefinite
    system amplifies rounding so much that two float32 runs with different summation orders
    disagree in the first digits; a positive definite system makes the result comparable. The
    damping value does not change the cost of a stage.
    """
    if key not in _dampings:
        with HessianOperator(loss_fn, params) as op:
            report = check_damping(op, damping=10.0, iters=10)
        _dampings[key] = 10.0 if report.system_min > 0.5 else max(10.0, 2.0 * abs(report.lambda_min))
    return _dampings[key]


STAGE_SIZES_SMALL = [("small", 16, 12), ("small3", 16, 12), ("bnconv", 16, 12)]
STAGE_SIZES_FULL = [("resnet18", 256, 32), ("resnet18", 256, 96), ("resnet50", 256, 32), ("resnet50", 256, 96)]
STAGE_SIZE_QUICK = ("bnconv", 16, 12)  # BISSL_BENCH_SIZES=quick: the cheapest CPU model


@pytest.mark.usefixtures("single_cpu_thread")
@pytest.mark.parametrize("provider", ["reference", "rev-rev", "rev-rev+fused-bn", "fwd-rev"])
@pytest.mark.parametrize("loss", ["simclr", "byol"])
@pytest.mark.parametrize("backbone,batch,res", STAGE_SIZES_SMALL + STAGE_SIZES_FULL)
def test_upper_stage(benchmark_op, bench_device, backbone, batch, res, loss, provider):
    full = bench_sizes_full(bench_device)
    if (backbone, batch, res) not in sizes_timed(bench_device, STAGE_SIZES_SMALL, STAGE_SIZES_FULL, STAGE_SIZE_QUICK):
        pytest.skip("size not in this device's grid (BISSL_BENCH_SIZES=small|full|quick)")
    if provider == "fwd-rev" and not full and backbone != "small":
        pytest.skip("fwd-rev is timed on the first CPU model only (slower than the recompute on CPU)")
    if provider == "rev-rev+fused-bn" and bench_device.type != "cpu":
        pytest.skip("the fused BatchNorm's CUDA kernels are not measured yet (auto keeps PyTorch's on CUDA)")
    problem = _stage_problem(loss, backbone, batch, res, bench_device)
    damping = _damping((backbone, batch, res, loss), problem.loss_fn, problem.params)
    if provider == "rev-rev+fused-bn":
        reference_problem = problem
        problem = _stage_problem(loss, backbone, batch, res, bench_device, fused_bn=True)
    else:
        reference_problem = problem
    loss_fn, modules, params, vs = problem.loss_fn, problem.modules, problem.params, problem.vs
    ref_args = (reference_problem.loss_fn, reference_problem.modules, reference_problem.params, reference_problem.vs)
    if provider != "reference":
        # Same answer as the paper's implementation before timing anything (first solve). fwd-rev
        # computes the products in a different order of operations than autograd's double backward.
        ref = reference.implicit_grad(ref_args[0], ref_args[2], ref_args[3][0], damping=damping, iters=CG_ITERS)
        ours = _stage(provider, loss_fn, modules, params, vs[:1], damping)[0]
        err = _rel_err(ours, ref)
        tol = 1e-4 if provider == "fwd-rev" else 1e-5
        assert err < tol, f"{provider} differs from reference.implicit_grad: rel err {err:.3g}"
    n_params = sum(p.numel() for p in params)
    benchmark_op(
        lambda: _stage(provider, loss_fn, modules, params, vs, damping), [()], op=f"upper_stage_{loss}",
        provider=provider, mode=f"{SOLVES}x{CG_ITERS}cg",
        size={"model": backbone, "B": batch, "HW": res, "P": n_params}, dtype=torch.float32, device=bench_device,
        reference=None if provider == "reference" else lambda: _stage("reference", *ref_args, damping),
        ratio_min_rounds=6, ratio_max_time_s=30.0,
    )


def resnet50_shapes(div: int = 1) -> list[tuple[int, ...]]:
    """The 161 parameter shapes of torchvision's ResNet-50 (channel counts divided by ``div``)."""
    c = lambda n: max(1, n // div)
    shapes: list[tuple[int, ...]] = [(c(64), 3, 7, 7), (c(64),), (c(64),)]
    in_ch = 64
    for width, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
        for i in range(blocks):
            out_ch = width * 4
            shapes += [(c(width), c(in_ch), 1, 1), (c(width),), (c(width),)]
            shapes += [(c(width), c(width), 3, 3), (c(width),), (c(width),)]
            shapes += [(c(out_ch), c(width), 1, 1), (c(out_ch),), (c(out_ch),)]
            if i == 0:
                shapes += [(c(out_ch), c(in_ch), 1, 1), (c(out_ch),), (c(out_ch),)]
            in_ch = out_ch
    shapes += [(1000, c(2048)), (1000,)]
    return shapes


@pytest.mark.parametrize("provider", ["reference", "torch", "cpp", "cuda"])
def test_cg_vector_work(benchmark_op, bench_device, provider):
    if provider == "cuda" and (bench_device.type != "cuda" or not backends()["cuda"]):
        pytest.skip("the cuda backend needs a CUDA build and device")
    if provider == "cpp" and (bench_device.type != "cpu" or not backends()["cpp"]):
        pytest.skip("the cpp backend runs on CPU tensors")
    div = 1 if bench_sizes_full(bench_device) else 4
    shapes = resnet50_shapes(div)
    assert len(shapes) == 161
    gen = torch.Generator().manual_seed(0)
    b = tuple(torch.randn(s, generator=gen).to(bench_device) for s in shapes)

    def identity(d):
        return tuple(d)

    def reference_fn():
        return reference.cg_solve(identity, b, iters=CG_ITERS)

    def fast_fn():
        return cg_solve(identity, b, iters=CG_ITERS, backend=provider)

    n = sum(b_.numel() for b_ in b)
    # per iteration: dots read 2+2 vectors, the update reads 4 and writes 2, the direction reads 2 writes 1
    floor = StreamFloor(13 * n * 4, repeats=CG_ITERS)
    benchmark_op(
        reference_fn if provider == "reference" else fast_fn, [()], op="cg_vector_work", provider=provider,
        mode=f"{CG_ITERS}it", size={"T": 161, "P": n}, dtype=torch.float32, device=bench_device,
        reference=None if provider == "reference" else reference_fn,
        floor=floor, bytes_moved=floor.nbytes * floor.repeats,
    )
