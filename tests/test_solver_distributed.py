"""HessianOperator / ImplicitGradient across 2 gloo ranks on CPU (spawned processes).

Each rank holds the same weights and its own batch. Checked on every rank: a product is the mean
of the per-rank products and costs exactly one all-reduce (bucketed), matmat too; the implicit
gradient (CG and MINRES) equals bissl_fast.reference.implicit_grad run under the same process group, and
its solve report is the same on every rank.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from helpers import run_distributed

WORLD = 2


def _worker(rank: int, world_size: int) -> None:
    torch.set_num_threads(1)
    _check(rank)


def _check(rank: int) -> None:
    from helpers import rel_err
    from test_solver_hessian import make_problem, random_like

    from bissl_fast import _dist
    from bissl_fast import reference as R
    from bissl_fast.solver import HessianOperator, ImplicitGradient

    problems = [make_problem("simclr", data_seed=100 + r) for r in range(WORLD)]
    mine = problems[rank]
    v = random_like(mine.params, seed=7)
    vs = random_like(mine.params, seed=8, k=2)
    expected = [R.hvp(p.loss_fn, p.params, v) for p in problems]
    expected_mean = tuple(sum(parts) / WORLD for parts in zip(*expected))

    calls = []
    real_all_reduce = _dist.dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        calls.append(tensor.numel())
        return real_all_reduce(tensor, *args, **kwargs)

    _dist.dist.all_reduce = counting_all_reduce
    try:
        with HessianOperator(mine.loss_fn, mine.params) as op:
            out = op.matvec(v)
            assert calls == [sum(p.numel() for p in mine.params)], calls  # one bucketed all-reduce
            batched = op.matmat(vs)
            assert len(calls) == 2
        with HessianOperator(mine.loss_fn, mine.params, average_over_ranks=False) as op:
            local = op.matvec(v)
            assert len(calls) == 2
    finally:
        _dist.dist.all_reduce = real_all_reduce
    assert rel_err(out, expected_mean) < 1e-12
    assert rel_err(local, expected[rank]) < 1e-12
    for j in range(2):
        col = tuple(t[j] for t in vs)
        mean_j = tuple(sum(parts) / WORLD for parts in zip(*[R.hvp(p.loss_fn, p.params, col) for p in problems]))
        assert rel_err(tuple(t[j] for t in batched), mean_j) < 1e-12

    # The upper-level gradient differs per rank; both implementations average it first.
    g = random_like(mine.params, seed=20 + rank)
    for method in ("cg", "minres"):
        ref = R.implicit_grad(mine.loss_fn, mine.params, g, method=method)
        solver = ImplicitGradient(mine.params, method=method)
        with HessianOperator(mine.loss_fn, mine.params) as op:
            x = solver.solve(op, g)
        assert rel_err(x, ref) < 1e-10, method
        # Every rank holds the averaged vectors, so every rank reports the same solve quality.
        quality = torch.tensor([solver.last_report.relative_residual, solver.last_report.no_solve_relative_residual],
                               dtype=torch.float64)
        gathered = [torch.empty_like(quality) for _ in range(WORLD)]
        dist.all_gather(gathered, quality)
        assert all(torch.equal(q, quality) for q in gathered), method


@pytest.mark.distributed
def test_two_rank_products_and_implicit_gradient():
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    run_distributed(_worker, world_size=WORLD)
