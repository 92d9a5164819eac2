"""Shared test utilities: relative errors against float64 references with named assertions,
loss/gradient/HVP of a loss of one tensor, the older vmap, HVP through a tiny MLP, distributed runs, tiny BiSSL
models without BatchNorm, image folders / CIFAR-10 pickles written for the data tests, and the real
packages of the integration tests."""
from __future__ import annotations

import importlib
import os
import pickle
from typing import Callable, Sequence

import numpy as np
import pytest
import torch
from torch import nn

TensorOrTensors = torch.Tensor | Sequence[torch.Tensor]

#: Names of the three results of :func:`loss_grad_hvp`, for :func:`assert_close_rel` messages.
LOSS_GRAD_HVP = ("loss", "gradient", "HVP")


def rel_err(out: TensorOrTensors, ref: TensorOrTensors) -> float:
    """``||out - ref|| / ||ref||`` in float64 over one tensor or a tuple of tensors; NaN never passes."""
    if isinstance(out, torch.Tensor):
        out, ref = (out,), (ref,)
    assert len(out) == len(ref)
    num = sum(float((o.double() - r.double()).pow(2).sum()) for o, r in zip(out, ref))
    den = sum(float(r.double().pow(2).sum()) for r in ref)
    for o in out:
        assert bool(torch.isfinite(o).all()), "output contains NaN or inf"
    return (num ** 0.5) / max(den ** 0.5, 1e-300)


def assert_close_rel(name: str, out: TensorOrTensors, ref: TensorOrTensors, tol: float) -> None:
    """``rel_err(out, ref) < tol``; a failure names the tensor (loss, gradient, HVP, ...) and the error."""
    if isinstance(out, torch.Tensor):
        assert bool(torch.isfinite(out).all()), f"{name}: output contains NaN or inf"
    else:
        for i, o in enumerate(out):
            assert bool(torch.isfinite(o).all()), f"{name}[{i}]: output contains NaN or inf"
    err = rel_err(out, ref)
    assert err < tol, f"{name}: relative error {err:.3e} is not below {tol:.1e}"


def assert_loss_grad_hvp_close(out: Sequence[torch.Tensor], ref: Sequence[torch.Tensor], tol: float) -> None:
    """:func:`assert_close_rel` on each of the ``(loss, gradient, HVP)`` triples of :func:`loss_grad_hvp`."""
    assert len(out) == len(ref)
    for name, o, r in zip(LOSS_GRAD_HVP, out, ref):
        assert_close_rel(name, o, r, tol)


def loss_grad_hvp(
    loss_fn: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, g: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss, gradient of ``g * loss`` (a non-unit upstream gradient) and Hessian-vector product
    ``d<grad, v>/dz``, all w.r.t. ``z`` and detached."""
    z = z.detach().requires_grad_()
    loss = loss_fn(z)
    (grad,) = torch.autograd.grad(loss * g, z, create_graph=True)
    (hvp,) = torch.autograd.grad(grad, z, v)
    return loss.detach(), grad.detach(), hvp


def prototype_vmap(fn: Callable, in_dims=0) -> Callable:
    """The older vmap, the one behind ``torch.autograd.grad(..., is_grads_batched=True)`` and gradcheck's
    batched checks (``torch.func.vmap`` is the other); bissl_fast's batching rules serve both."""
    return torch._vmap_internals._vmap(fn, in_dims, 0)


def mlp_hvp(loss_of_embeddings: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, out_dim: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """HVP of ``loss(mlp(x))`` w.r.t. a tiny MLP's parameters along a fixed random direction.

    The loss is summed with a small extra term, so a backward that is not itself differentiable
    (and silently drops the loss's second-order part) gives a different answer.
    """
    gen = torch.Generator().manual_seed(seed)
    d_in = x.shape[1]
    w1 = (torch.randn(d_in, 16, generator=gen, dtype=torch.float64) / d_in ** 0.5).to(x.dtype).requires_grad_()
    w2 = (torch.randn(16, out_dim, generator=gen, dtype=torch.float64) / 4).to(x.dtype).requires_grad_()
    params = (w1, w2)
    vec = tuple(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(x.dtype) for p in params)
    emb = torch.tanh(x @ w1) @ w2
    loss = loss_of_embeddings(emb) + 0.1 * (emb ** 2).mean()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    return torch.autograd.grad(grads, params, vec)


# A spawned test that runs past this fails with the ranks still running, instead of stalling the suite
# (a gloo teardown has deadlocked before). Generous: on a loaded 2-core machine these tests have taken
# 110 s. The process group's own timeout is shorter, so a collective that waits on a dead peer raises
# inside its rank first, with a traceback.
DISTRIBUTED_DEADLINE_S = 300.0
PROCESS_GROUP_TIMEOUT_S = 240.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for the process group's rendezvous)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _distributed_entry(rank: int, world_size: int, port: int, done_dir: str, fn: Callable[..., None],
                       args: tuple) -> None:
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=PROCESS_GROUP_TIMEOUT_S))
    try:
        fn(rank, world_size, *args)
        open(os.path.join(done_dir, str(rank)), "w").close()  # tells a timed-out caller this rank finished fn
        # No rank tears the group down while another still uses it (an early teardown has aborted a peer).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable[..., None], *args, world_size: int = 2,
                    deadline_s: float = DISTRIBUTED_DEADLINE_S) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes joined by a gloo group.

    ``fn`` must be a module-level function (it is pickled); it asserts inside and may write results
    to files under a tmp path passed in ``args``. A failure in any process fails the caller with that
    process's traceback; ranks still running after ``deadline_s`` seconds are terminated and the
    caller fails naming them.
    """
    import tempfile
    import time

    import pytest
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as done_dir:
        context = mp.start_processes(_distributed_entry, args=(world_size, free_port(), done_dir, fn, args),
                                     nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + deadline_s
        try:
            while not context.join(timeout=1):
                if time.monotonic() > deadline:
                    alive = [rank for rank, process in enumerate(context.processes) if process.is_alive()]
                    hung = [rank for rank in alive if not os.path.exists(os.path.join(done_dir, str(rank)))]
                    pytest.fail(f"{fn.__name__}: rank(s) {hung} of {world_size} hung in {fn.__name__} (rank(s) "
                                f"{sorted(set(alive) - set(hung))} waiting in teardown) after {deadline_s:.0f} s; "
                                "terminated")
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
                    process.join(5)


class TinyLower(nn.Module):
    """Pretext model for 8x8 digits without BatchNorm: per-view and concatenated forwards give one loss, and
    N ranks give the one-process result (BatchNorm would normalize each with other statistics)."""

    def __init__(self, byol: bool) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Flatten(), nn.Linear(64, 24), nn.Tanh(), nn.Linear(24, 16), nn.Tanh())
        self.head = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 8))
        self.predictor = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8)) if byol else None


class TinyUpper(nn.Module):
    """The downstream partner of :class:`TinyLower`: the same backbone layout and a 10-class linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Flatten(), nn.Linear(64, 24), nn.Tanh(), nn.Linear(24, 16), nn.Tanh())
        self.head = nn.Linear(16, 10)


def flip_views(batch: torch.Tensor) -> list[torch.Tensor]:
    """Two deterministic views of an image batch (no randomness to keep in step across runs or ranks)."""
    return [batch, 0.9 * batch.flip(-1)]


def write_image_folder(root, shapes=((12, 10), (9, 14), (16, 16)), classes=("cat", "dog")) -> dict[str, np.ndarray]:
    """PNGs ``root/<class>/img<i>.png`` of random RGB pixels, one per shape ``(h, w)``; path -> written array."""
    from PIL import Image

    rng = np.random.default_rng(1)
    written = {}
    for cls in classes:
        os.makedirs(root / cls)
        for i, (h, w) in enumerate(shapes):
            arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            path = root / cls / f"img{i}.png"
            Image.fromarray(arr).save(path)
            written[str(path)] = arr
    return written


def write_cifar10(root, per_batch: int = 6) -> dict[str, tuple[np.ndarray, list[int]]]:
    """The ``cifar-10-batches-py`` pickles with ``per_batch`` random images each; batch name -> (data, labels)."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch).tolist()
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f)
        written[name] = (data, labels)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    return written



def import_or_skip(name: str):
    """The real package (or module) ``name`` for an ``integration`` test: the test skips where its package is
    not installed, except in the integration pass (``scripts/run_integration.sh`` sets ``BISSL_FAST_INTEGRATION=1``),
    which must not skip: there a missing or broken package fails the test."""
    if os.environ.get("BISSL_FAST_INTEGRATION") == "1":
        return importlib.import_module(name)
    return pytest.importorskip(name, reason=f"{name.split('.')[0]} is not installed")
