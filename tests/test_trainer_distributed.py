"""Two gloo processes on CPU end a BiSSL stage with the parameters of one process on the same global batches.

BatchNorm would make the comparison inexact by design (each rank normalizes with its own half-batch
statistics, as DDP without SyncBatchNorm does), so these models have no BatchNorm: then gradient
averaging, the NT-Xent all-gather and the rank-averaged Hessian products reproduce the
single-process stage exactly, up to floating-point summation order (float64 here).
"""
from __future__ import annotations

import os
import tempfile

import pytest
import torch
from helpers import TinyLower as _Lower
from helpers import TinyUpper as _Upper
from helpers import flip_views as _views
from helpers import run_distributed
from torch import nn

from bissl_fast.data.tensors import TensorLoader, load_digits
from bissl_fast.train.config import BiSSLConfig
from bissl_fast.train.trainer import BiSSLTrainer

WORLD = 2
PER_RANK = 8


def _models(pretext: str) -> tuple[_Lower, _Upper]:
    torch.manual_seed(0)
    return _Lower(pretext == "byol").double(), _Upper().double()


def _params(lower: nn.Module, upper: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in list(lower.parameters()) + list(upper.parameters())]


def _run(pretext: str, rank: int, world: int) -> list[torch.Tensor]:
    """One BiSSL stage; ``world`` ranks with ``PER_RANK`` samples each == 1 rank with ``world * PER_RANK``."""
    lower, upper = _models(pretext)
    digits = load_digits(size=None)
    x, y = digits.x.double(), digits.y
    batch = PER_RANK * (WORLD // world)
    trainer = BiSSLTrainer(
        lower, upper,
        TensorLoader(x[:64], None, batch_size=batch, seed=1, rank=rank, world_size=world),
        TensorLoader(x[100:164], y[100:164], batch_size=batch, seed=2, rank=rank, world_size=world),
        torch.optim.SGD(lower.parameters(), lr=0.1, momentum=0.9),
        torch.optim.SGD(upper.parameters(), lr=0.1, momentum=0.9),
        BiSSLConfig(pretext=pretext, lower_iters=2, upper_iters=2, cg_iters=3, progress=False),
        lower_transform=_views,
    )
    trainer.fit(1)
    return _params(lower, upper)


def _worker(rank: int, world_size: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    for pretext in ("simclr", "byol"):
        torch.save(_run(pretext, rank, world_size), os.path.join(out_dir, f"{pretext}_{rank}.pt"))


@pytest.mark.distributed
def test_two_processes_equal_one_process():
    with tempfile.TemporaryDirectory() as out_dir:
        run_distributed(_worker, out_dir, world_size=WORLD)
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for pretext in ("simclr", "byol"):
                single = _run(pretext, 0, 1)
                initial = _params(*_models(pretext))
                assert all(not torch.equal(a, b) for a, b in zip(single, initial)), "every tensor moves in a stage"
                for rank in range(WORLD):
                    multi = torch.load(os.path.join(out_dir, f"{pretext}_{rank}.pt"))
                    for a, b in zip(multi, single):
                        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12), (pretext, rank, float((a - b).abs().max()))
        finally:
            torch.set_num_threads(previous)
