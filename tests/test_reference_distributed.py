"""reference.implicit_grad averages v and every HVP over ranks (2 gloo processes on CPU)."""
from __future__ import annotations

import pytest
import torch

from bissl_fast import reference
from helpers import run_distributed

pytestmark = pytest.mark.distributed


def _problem(rank: int):
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    v = (torch.randn(3, generator=gen, dtype=torch.float64), torch.randn(1, generator=gen, dtype=torch.float64))
    return x, v


def _params():
    gen = torch.Generator().manual_seed(7)
    return (torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True),
            torch.randn(1, generator=gen, dtype=torch.float64, requires_grad=True))


def _loss(x, w, b):
    return torch.nn.functional.softplus(x @ w + b).pow(2).mean()


def _rank_solve(rank: int, world_size: int, out_dir: str) -> None:
    x, v = _problem(rank)
    w, b = _params()
    sol = reference.implicit_grad(lambda: _loss(x, w, b), (w, b), v, damping=0.1, iters=4, layerwise=False)
    torch.save(sol, f"{out_dir}/rank{rank}.pt")


def test_implicit_grad_averages_v_and_hvps_over_ranks(tmp_path):
    run_distributed(_rank_solve, str(tmp_path))
    (x0, v0), (x1, v1) = _problem(0), _problem(1)
    w, b = _params()
    v_mean = tuple((a + c) / 2 for a, c in zip(v0, v1))
    expected = reference.implicit_grad(
        lambda: (_loss(x0, w, b) + _loss(x1, w, b)) / 2, (w, b), v_mean, damping=0.1, iters=4, layerwise=False
    )
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for g, e in zip(got, expected):
            assert torch.allclose(g, e, rtol=1e-12, atol=1e-14)
