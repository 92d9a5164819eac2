"""Shared test utilities: relative errors against float64 references, HVP through a tiny MLP."""
from __future__ import annotations

from typing import Callable, Sequence

import torch


def rel_err(out: torch.Tensor | Sequence[torch.Tensor], ref: torch.Tensor | Sequence[torch.Tensor]) -> float:
    """``||out - ref|| / ||ref||`` in float64 over one tensor or a tuple of tensors; NaN never passes."""
    if isinstance(out, torch.Tensor):
        out, ref = (out,), (ref,)
    assert len(out) == len(ref)
    num = sum(float((o.double() - r.double()).pow(2).sum()) for o, r in zip(out, ref))
    den = sum(float(r.double().pow(2).sum()) for r in ref)
    for o in out:
        assert bool(torch.isfinite(o).all()), "output contains NaN or inf"
    return (num ** 0.5) / max(den ** 0.5, 1e-300)


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
