"""BatchNorm: PyTorch's (``reference``) vs the fused ops (``cpp`` / ``cuda``), see docs/design.md §2.3.

``dbwd``: the double backward alone, i.e. the gradient of ``<(gx, gw, gb), v>`` w.r.t. (input,
grad_output, weight) through a retained create_graph backward of one train-mode BatchNorm2d, at
ResNet shapes (CPU: [64, 64, 32, 32] and [64, 256, 8, 8]; CUDA adds ResNet-50 shapes at batch 256).
``bytes_moved`` is the floor of a fused double backward: read input, grad_output and the cotangent
of grad_input, write the gradients w.r.t. input and grad_output (5 tensors).

``hvp``: one Hessian-vector product (``HessianOperator`` rev-rev, graph built once) of the NT-Xent loss
through the built-in small ResNets with a projector head, 64 images: SmallResNet(16, 32) at 12 px and
SmallResNet(32, 64, 128) at 32 px; ``cpp``/``cuda`` run the same model after ``convert_batchnorm``.

pytest-benchmark times the providers one after another. On a shared machine that skews ratios, so
``python benchmarks/bench_batch_norm.py`` measures them interleaved instead (one intra-op thread,
process CPU time, several rounds; prints the median ratio and its spread) and can profile the HVP:

    python benchmarks/bench_batch_norm.py --rounds 7            # interleaved ratios
    python benchmarks/bench_batch_norm.py --profile             # torch.profiler table, before/after
"""
from __future__ import annotations

import argparse
import statistics
import time

import pytest
import torch
from bench_utils import skip_unless_timed
from torch import nn

from bissl_fast import convert_batchnorm, reference
from bissl_fast.solver import HessianOperator
from bissl_fast.train.models import PretextModel, SmallResNet

PROVIDERS = ["reference", "cpp", "cuda"]  # reference first: the speedups are against it
DBWD_SMALL = [(64, 64, 32, 32), (64, 256, 8, 8)]
DBWD_FULL = DBWD_SMALL + [(256, 64, 56, 56), (256, 256, 14, 14), (256, 1024, 14, 14)]
DBWD_QUICK = (64, 256, 8, 8)  # BISSL_BENCH_SIZES=quick: the cheaper CPU shape
RESNETS = {"small_12px": ((16, 32), 12), "small_32px": ((32, 64, 128), 32)}
IMAGES = 64


def _layer(provider: str, channels: int, device: torch.device) -> nn.Module:
    layer = nn.BatchNorm2d(channels).to(device)
    return layer if provider == "reference" else convert_batchnorm(layer, backend=provider)


def dbwd_case(provider: str, shape: tuple[int, ...], device: torch.device, seed: int = 0):
    """A zero-argument double backward through one BatchNorm2d (the graph is built once and retained)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    layer = _layer(provider, shape[1], device)
    x = torch.randn(shape, generator=gen, device=device, requires_grad=True)
    gy = torch.randn(shape, generator=gen, device=device, requires_grad=True)
    first = torch.autograd.grad(layer(x), [x, layer.weight, layer.bias], gy, create_graph=True)
    cotangents = [torch.randn(t.shape, generator=gen, device=device) for t in first]
    wrt = [x, gy, layer.weight]
    return lambda: torch.autograd.grad(first, wrt, cotangents, retain_graph=True)


def hvp_case(provider: str, name: str, device: torch.device):
    """A zero-argument HVP through a SmallResNet + projector on NT-Xent, and the operator's params."""
    widths, res = RESNETS[name]
    torch.manual_seed(0)
    backbone = SmallResNet(3, widths=widths, blocks=(1,) * len(widths))
    model = PretextModel(backbone, backbone.out_dim, proj_dim=128, hidden_dim=512).to(device)
    if provider != "reference":
        convert_batchnorm(model, backend=provider)
    x = torch.randn(IMAGES, 3, res, res, device=device)
    params = tuple(model.backbone.parameters())
    op = HessianOperator(lambda: reference.nt_xent(model(x), 0.5), params)
    gen = torch.Generator().manual_seed(1)
    v = tuple(torch.randn(p.shape, generator=gen).to(device) for p in params)
    return (lambda: op.matvec(v)), op


@pytest.mark.usefixtures("single_cpu_thread")
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", DBWD_FULL, ids=lambda s: "x".join(map(str, s)))
def test_batch_norm_dbwd(benchmark_op, bench_device, provider, shape):
    skip_unless_timed(bench_device, provider, shape, DBWD_SMALL, DBWD_FULL, quick=DBWD_QUICK)
    fn = dbwd_case(provider, shape, bench_device)
    n, c, h, w = shape
    benchmark_op(
        fn, [()], op="batch_norm", provider=provider, mode="dbwd", size={"N": n, "C": c, "H": h, "W": w},
        dtype=torch.float32, device=bench_device, bytes_moved=5 * n * c * h * w * 4,
        reference=None if provider == "reference" else dbwd_case("reference", shape, bench_device),
    )


def _rel_err(out, ref) -> float:
    num = sum(float((o.double() - r.double()).pow(2).sum()) for o, r in zip(out, ref))
    den = sum(float(r.double().pow(2).sum()) for r in ref)
    return (num / den) ** 0.5


@pytest.mark.usefixtures("single_cpu_thread")
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("model", list(RESNETS))
def test_batch_norm_hvp_resnet(benchmark_op, bench_device, provider, model):
    skip_unless_timed(bench_device, provider, model, list(RESNETS), list(RESNETS))
    fn, op = hvp_case(provider, model, bench_device)
    if provider != "reference":
        # Same product as PyTorch's BatchNorm before timing. In float32 both differ from the float64
        # product by up to ~5e-3 on some random nets (a ReLU kink crossed by rounding; measured over
        # seeds for torch and fused alike), so this is a sanity check; tests/test_batch_norm.py checks
        # equality in float64 to 1e-10.
        ref_fn, _ = hvp_case("reference", model, bench_device)
        err = _rel_err(fn(), ref_fn())
        assert err < 1e-2, f"{provider} HVP differs from the torch-BatchNorm one: rel err {err:.3g}"
    widths, res = RESNETS[model]
    benchmark_op(
        fn, [()], op="batch_norm_resnet", provider=provider, mode="hvp",
        size={"widths": "-".join(map(str, widths)), "HW": res, "B": IMAGES, "P": sum(p.numel() for p in op.params)},
        dtype=torch.float32, device=bench_device,
        reference=None if provider == "reference" else hvp_case("reference", model, bench_device)[0],
    )


# ------------------------------------------------------------------------------ interleaved CLI


def _interleaved(cases: dict[str, object], rounds: int) -> dict[str, list[float]]:
    """Process CPU time of each case per round, the cases alternating within every round."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():
        fn()  # warm-up
    for _ in range(rounds):
        for name, fn in cases.items():
            start = time.process_time()
            fn()
            times[name].append(time.process_time() - start)
    return times


def _report(label: str, times: dict[str, list[float]]) -> None:
    ref, fused = times["reference"], times["cpp"]
    ratios = sorted(r / f for r, f in zip(ref, fused))
    print(
        f"{label:28s} torch {statistics.median(ref) * 1e3:9.2f} ms   fused {statistics.median(fused) * 1e3:8.2f} ms   "
        f"speedup median {statistics.median(ratios):.2f}x (per-round range {ratios[0]:.2f}-{ratios[-1]:.2f})"
    )


def _profile(name: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    for provider in ("reference", "cpp"):
        fn, _ = hvp_case(provider, name, torch.device("cpu"))
        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=44)
        print(f"--- {name}, {'torch BatchNorm' if provider == 'reference' else 'fused BatchNorm'}\n{table}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables of the HVPs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    if args.profile:
        for name in RESNETS:
            _profile(name)
        return
    for shape in DBWD_SMALL:
        cases = {p: dbwd_case(p, shape, cpu) for p in ("reference", "cpp")}
        _report("dbwd " + "x".join(map(str, shape)), _interleaved(cases, args.rounds))
    for name in RESNETS:
        cases = {p: hvp_case(p, name, cpu)[0] for p in ("reference", "cpp")}
        _report(f"hvp {name}", _interleaved(cases, args.rounds))


if __name__ == "__main__":
    main()
