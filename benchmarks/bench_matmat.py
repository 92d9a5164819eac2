"""Batched Hessian-vector products: ``k`` products in one call against ``k`` separate products.

Op ``matmat``; provider ``reference`` is ``k`` separate products, provider ``batched`` the same ``k``
products in one call (``torch.func.vmap`` of the double backward, which runs the fused ops' batching
rules; ``HessianOperator.matmat`` for the network). Both use the same fused backend (``backend`` in
the size); ``k`` in 1, 8, 32 is the first entry of the size. Modes:

* ``nt_xent-hvp``, ``byol-hvp``, ``batch_norm-dbwd``: products through one fused op alone, on a retained
  ``create_graph`` gradient: the HVP w.r.t. the embeddings of ``nt_xent`` (N=2048, D=128, as in
  ``bench_nt_xent.py``), w.r.t. the predictions of ``byol_loss`` (B=4096, D=256, as in
  ``bench_byol.py``), and the double backward of one train-mode BatchNorm2d (``bench_batch_norm.py``'s
  ``dbwd``: [64, 64, 32, 32] and [64, 256, 8, 8]).
* ``resnet-hvp``: ``HessianOperator.matmat`` against ``k`` ``matvec`` calls (rev-rev, graph built
  once), SmallResNet(16, 32) + projector on 64 images of 12 px (``bench_batch_norm.py``'s HVP model),
  NT-Xent, with PyTorch's BatchNorm and the reference loss (``ops=torch``) and with the fused
  BatchNorm and loss (``ops=fused``).

CPU only, one intra-op thread (the GPU rows are not measured yet). ``BISSL_BENCH_SIZES=quick`` times
the BatchNorm [64, 256, 8, 8] row at k = 8. Every batched result is checked against the separate
products before timing. ``python benchmarks/bench_matmat.py`` measures the same cases interleaved
without pytest-benchmark (process CPU time per round, the order flipping every round; median ratio
and its range):

    python benchmarks/bench_matmat.py --rounds 7 --k 1,8,32 --cases nt_xent,byol,batch_norm,resnet
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import pytest
import torch
from bench_utils import bench_sizes_full, skip_unless_timed
from torch import nn

from bissl_fast import byol_loss, convert_batchnorm, nt_xent, reference
from bissl_fast._backends import resolve_backend
from bissl_fast.solver import HessianOperator
from bissl_fast.train.models import PretextModel, SmallResNet

PROVIDERS = ["reference", "batched"]  # reference first: the speedup is against it
KS = (1, 8, 32)
SHAPES = {
    "nt_xent-hvp": [(2048, 128)],
    "byol-hvp": [(4096, 256)],
    "batch_norm-dbwd": [(64, 64, 32, 32), (64, 256, 8, 8)],
    "resnet-hvp": [("torch",), ("fused",)],
}
SMALL = [(mode, shape, k) for mode, shapes in SHAPES.items() for shape in shapes for k in KS]
QUICK = ("batch_norm-dbwd", (64, 256, 8, 8), 8)
TEMPERATURE = 0.5
Products = Callable[[], object]


def _retained(outputs, wrt, cotangents) -> tuple[Products, Products]:
    """``(k separate products, one batched product)`` on a retained graph, cotangents ``[k, ...]``."""
    k = cotangents[0].shape[0]

    def separate():
        return [torch.autograd.grad(outputs, wrt, [c[j] for c in cotangents], retain_graph=True) for j in range(k)]

    def batched():
        return torch.func.vmap(lambda *c: torch.autograd.grad(outputs, wrt, c, retain_graph=True))(*cotangents)

    return separate, batched


def _nt_xent(k: int, shape: tuple, device: torch.device, backend: str) -> tuple[Products, Products]:
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(*shape, generator=gen).to(device).requires_grad_()
    (grad,) = torch.autograd.grad(nt_xent(z, temperature=TEMPERATURE, backend=backend), z, create_graph=True)
    return _retained([grad], [z], [torch.randn(k, *z.shape, generator=gen).to(device)])


def _byol(k: int, shape: tuple, device: torch.device, backend: str) -> tuple[Products, Products]:
    gen = torch.Generator().manual_seed(0)
    p1, p2, t1, t2 = (torch.randn(*shape, generator=gen).to(device) for _ in range(4))
    p1.requires_grad_()
    p2.requires_grad_()
    grads = torch.autograd.grad(byol_loss(p1, p2, t1, t2, backend=backend), (p1, p2), create_graph=True)
    cotangents = [torch.randn(k, *shape, generator=gen).to(device) for _ in range(2)]
    return _retained(list(grads), [p1, p2], cotangents)


def _batch_norm(k: int, shape: tuple, device: torch.device, backend: str) -> tuple[Products, Products]:
    gen = torch.Generator().manual_seed(0)
    layer = convert_batchnorm(nn.BatchNorm2d(shape[1]), backend=backend).to(device)
    x = torch.randn(shape, generator=gen).to(device).requires_grad_()
    gy = torch.randn(shape, generator=gen).to(device).requires_grad_()
    first = torch.autograd.grad(layer(x), [x, layer.weight, layer.bias], gy, create_graph=True)
    cotangents = [torch.randn(k, *t.shape, generator=gen).to(device) for t in first]
    return _retained(list(first), [x, gy, layer.weight], cotangents)


def _resnet(k: int, shape: tuple, device: torch.device, backend: str) -> tuple[Products, Products]:
    torch.manual_seed(0)
    backbone = SmallResNet(3, widths=(16, 32), blocks=(1, 1))
    model = PretextModel(backbone, backbone.out_dim, proj_dim=128, hidden_dim=512).to(device)
    fused = shape == ("fused",)
    if fused:
        convert_batchnorm(model)
    x = torch.randn(64, 3, 12, 12, device=device)
    loss = nt_xent if fused else reference.nt_xent
    op = HessianOperator(lambda: loss(model(x), TEMPERATURE), tuple(model.backbone.parameters()))
    gen = torch.Generator().manual_seed(1)
    vs = tuple(torch.randn(k, *p.shape, generator=gen).to(device) for p in op.params)
    return (lambda: [op.matvec(tuple(v[j] for v in vs)) for j in range(k)]), (lambda: op.matmat(vs))


def case(mode: str, shape: tuple, k: int, device: torch.device) -> tuple[dict, Products, Products]:
    """``(size, k separate products, the k products batched)`` of one row."""
    if mode == "resnet-hvp":
        size = {"k": k, "model": "SmallResNet(16,32)+proj", "B": 64, "HW": 12, "ops": shape[0]}
        return (size, *_resnet(k, shape, device, shape[0]))
    if mode == "batch_norm-dbwd":
        backend = "cpp" if device.type == "cpu" else "cuda"
        size = {"k": k, "N": shape[0], "C": shape[1], "H": shape[2], "W": shape[3], "backend": backend}
        return (size, *_batch_norm(k, shape, device, backend))
    op, factory, names = {"nt_xent-hvp": ("nt_xent", _nt_xent, "ND"), "byol-hvp": ("byol", _byol, "BD")}[mode]
    backend = resolve_backend("auto", device, op)
    return ({"k": k, **dict(zip(names, shape)), "backend": backend}, *factory(k, shape, device, backend))


def _flat(result) -> torch.Tensor:
    """Separate products (a list per vector) or a batched one (stacked) as one ``[k, -1]`` tensor."""
    if isinstance(result, list):
        return torch.stack([torch.cat([t.reshape(-1) for t in one]) for one in result])
    return torch.cat([t.reshape(t.shape[0], -1) for t in result], dim=1)


def check_same(separate: Products, batched: Products, tol: float = 1e-5) -> None:
    """Fails unless the batched products equal the separate ones (fp32: relative error below ``tol``)."""
    ref, out = _flat(separate()).double(), _flat(batched()).double()
    err = float((out - ref).norm() / ref.norm())
    assert err < tol, f"batched products differ from the separate ones: rel err {err:.3g}"


def _case_id(row: tuple) -> str:
    mode, shape, k = row
    return f"{mode}-{'x'.join(map(str, shape))}-k{k}"


@pytest.mark.usefixtures("single_cpu_thread")
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("row", SMALL, ids=_case_id)
def test_matmat(benchmark_op, bench_device, row, provider):
    if bench_sizes_full(bench_device):
        pytest.skip("the GPU rows of batched products are not measured yet")
    skip_unless_timed(bench_device, provider, row, SMALL, SMALL, quick=QUICK)
    mode, shape, k = row
    size, separate, batched = case(mode, shape, k, bench_device)
    if provider == "batched":
        check_same(separate, batched)
    benchmark_op(
        separate if provider == "reference" else batched, [()], op="matmat", provider=provider, mode=mode,
        size=size, dtype=torch.float32, device=bench_device, reference=None if provider == "reference" else separate,
        ratio_min_rounds=6, ratio_max_time_s=30.0,
    )


# ------------------------------------------------------------------------------ interleaved CLI


def _interleaved(separate: Products, batched: Products, rounds: int) -> tuple[list[float], list[float]]:
    """Process CPU time of both per round (after one warm-up call each), the order flipping every round."""
    separate()
    batched()
    times: tuple[list[float], list[float]] = ([], [])
    pairs = [(separate, times[0]), (batched, times[1])]
    for round_ in range(rounds):
        for fn, out in pairs if round_ % 2 == 0 else pairs[::-1]:
            start = time.process_time()
            fn()
            out.append(time.process_time() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--k", default=",".join(map(str, KS)), help="comma-separated numbers of vectors")
    parser.add_argument("--cases", default="nt_xent,byol,batch_norm,resnet", help="comma-separated mode prefixes")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ks = [int(k) for k in args.k.split(",")]
    prefixes = tuple(args.cases.split(","))
    cpu = torch.device("cpu")
    for mode, shapes in SHAPES.items():
        if not mode.startswith(prefixes):
            continue
        for shape in shapes:
            for k in ks:
                size, separate, batched = case(mode, shape, k, cpu)
                check_same(separate, batched)
                sep, bat = _interleaved(separate, batched, args.rounds)
                ratios = sorted(s / b for s, b in zip(sep, bat))
                label = f"{mode} {' '.join(f'{key}={value}' for key, value in size.items())}"
                print(f"{label:72s} separate {statistics.median(sep) * 1e3:9.1f} ms   batched "
                      f"{statistics.median(bat) * 1e3:9.1f} ms   speedup {statistics.median(ratios):.2f}x "
                      f"(per-round range {ratios[0]:.2f}-{ratios[-1]:.2f})", flush=True)


if __name__ == "__main__":
    main()
