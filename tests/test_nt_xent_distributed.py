"""``nt_xent(..., gather=True)`` over 2 gloo ranks equals the single-process loss on the global batch.

Each rank holds its own rows of every view; the global batch is view-major with view ``k`` =
``[rank0 view k; rank1 view k]``. Gradients and HVPs follow the all-reduce-sum convention (rank ``r``
gets ``world_size`` times its slice of the single-process result; DDP's averaging divides it out).
"""
from __future__ import annotations

import pytest
import torch

from helpers import loss_grad_hvp, run_distributed

pytestmark = pytest.mark.distributed

WORLD = 2
UPSTREAM = 0.7  # a non-unit upstream gradient


def _own_rows(n_global: int, views: int, rank: int) -> torch.Tensor:
    """Indices of this rank's rows in the global view-major batch."""
    b = n_global // (views * WORLD)
    return torch.cat([torch.arange(k * WORLD * b + rank * b, k * WORLD * b + (rank + 1) * b) for k in range(views)])


def _worker(rank: int, world_size: int) -> None:
    import importlib

    from helpers import rel_err

    from bissl_fast import reference

    nt_xent = importlib.import_module("bissl_fast.ops.nt_xent").nt_xent
    torch.set_num_threads(1)
    for views, b, d, tau in ((2, 5, 7, 0.3), (3, 4, 6, 0.1)):
        gen = torch.Generator().manual_seed(views)
        z_global = torch.randn(views * WORLD * b, d, generator=gen, dtype=torch.float64)
        v_global = torch.randn(z_global.shape, generator=gen, dtype=torch.float64)
        rows = _own_rows(z_global.shape[0], views, rank)

        def loss_fn(z, views=views, tau=tau):
            return nt_xent(z, temperature=tau, views=views, backend="torch", gather=True)

        loss, grad, hvp = loss_grad_hvp(loss_fn, z_global[rows], UPSTREAM, v_global[rows])
        ref = loss_grad_hvp(
            lambda z, views=views, tau=tau: reference.nt_xent(z, temperature=tau, views=views), z_global, UPSTREAM,
            v_global,
        )
        assert rel_err(loss, ref[0]) < 1e-12, (rank, views, "loss")
        assert rel_err(grad, WORLD * ref[1][rows]) < 1e-12, (rank, views, "grad")
        assert rel_err(hvp, WORLD * ref[2][rows]) < 1e-12, (rank, views, "hvp")

    bad = torch.randn(4 + 2 * rank, 3, dtype=torch.float64)
    try:
        nt_xent(bad, gather=True)
    except ValueError as exc:
        assert "same z shape on every rank" in str(exc)
    else:
        raise AssertionError("mismatched shapes across ranks did not raise")


def test_gather_matches_single_process_loss_grad_and_hvp():
    run_distributed(_worker, world_size=WORLD)
