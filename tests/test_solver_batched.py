"""Batched Hessian-vector products: ``matmat`` against ``k`` ``matvec`` calls through fused and unfused
models in every mode, and no per-vector vmap fallback from a bissl_fast op (docs/design.md §2.3)."""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import pytest
import torch
from helpers import rel_err
from test_solver_hessian import make_problem, random_like

from bissl_fast import convert_batchnorm
from bissl_fast.solver import HessianOperator

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

K = 3
MODES = {"rev-rev": {"mode": "rev-rev"}, "recompute": {"recompute": True}, "fwd-rev": {"mode": "fwd-rev"}}


def _problem(kind: str, losses: str, fused_bn: bool):
    prob = make_problem(kind, losses)
    if fused_bn:
        convert_batchnorm(prob.modules, backend="cpp")
    return prob


@pytest.mark.parametrize("fused_bn", [False, True], ids=["torch-bn", "fused-bn"])
@pytest.mark.parametrize("losses", ["reference", "fused"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("kind", ["simclr", "byol"])
def test_matmat_equals_k_matvecs_fp64(kind, mode, losses, fused_bn):
    prob = _problem(kind, losses, fused_bn)
    vs = random_like(prob.params, k=K)
    with HessianOperator(prob.loss_fn, prob.params, module=prob.modules, **MODES[mode]) as op:
        batched = op.matmat(vs)
        assert op.num_products == K
        for j in range(K):
            single = op.matvec(tuple(t[j] for t in vs))
            assert rel_err(tuple(t[j] for t in batched), single) < 1e-12
    # The fused path is the same operator as the reference one (a wrong batched rule cannot hide behind
    # an equally wrong matvec).
    if losses == "fused" or fused_bn:
        plain = make_problem(kind, "reference")
        with HessianOperator(plain.loss_fn, plain.params) as op:
            assert rel_err(batched, op.matmat(vs)) < 1e-10


@contextlib.contextmanager
def _vmap_fallback_warnings() -> Iterator[list[str]]:
    """Both vmaps report every op that has no batching rule; yields the messages of the block."""
    torch._C._debug_only_display_vmap_fallback_warnings(True)
    torch._C._functorch._set_vmap_fallback_warning_enabled(True)
    messages: list[str] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
        messages.extend(str(w.message) for w in caught)
    finally:
        torch._C._debug_only_display_vmap_fallback_warnings(False)
        torch._C._functorch._set_vmap_fallback_warning_enabled(False)


@pytest.mark.parametrize("kind", ["simclr", "byol"])
def test_no_vmap_fallback_from_bissl_fast_ops(kind):
    prob = _problem(kind, "fused", fused_bn=True)
    vs = random_like(prob.params, k=K)
    with _vmap_fallback_warnings() as messages:
        for mode in ("rev-rev", "fwd-rev"):
            with HessianOperator(prob.loss_fn, prob.params, mode=mode, module=prob.modules) as op:
                op.matmat(vs)
        # What a user may call directly: autograd's own batched backward (the older vmap).
        grads = torch.autograd.grad(prob.loss_fn(), prob.params, create_graph=True)
        torch.autograd.grad(grads, prob.params, vs, is_grads_batched=True)
    ours = [m for m in messages if "bissl_fast" in m]
    assert not ours, ours
    # The warnings do get through: the older vmap has no rules for PyTorch's convolution backward.
    assert any("batching rule" in m for m in messages)


def test_matmat_of_a_single_vector_and_of_many():
    prob = _problem("simclr", "fused", fused_bn=True)
    with HessianOperator(prob.loss_fn, prob.params) as op:
        v = random_like(prob.params)
        one = op.matmat(tuple(t[None] for t in v))
        assert rel_err(tuple(t[0] for t in one), op.matvec(v)) < 1e-12
        many = random_like(prob.params, k=9)
        out = op.matmat(many)
        assert rel_err(tuple(t[7] for t in out), op.matvec(tuple(t[7] for t in many))) < 1e-12


@pytest.mark.parametrize("mode", list(MODES))
def test_matmat_in_chunks_equals_all_at_once(mode):
    prob = _problem("simclr", "fused", fused_bn=True)
    vs = random_like(prob.params, k=5)
    with HessianOperator(prob.loss_fn, prob.params, module=prob.modules, **MODES[mode]) as op:
        whole = op.matmat(vs)
        for chunk_size in (1, 2, 5, 8):
            assert rel_err(op.matmat(vs, chunk_size=chunk_size), whole) < 1e-12, chunk_size
        assert op.num_products == 25
        for bad in (0, -1, 2.0, True, "2"):
            with pytest.raises(ValueError, match="chunk_size must be a positive int or None"):
                op.matmat(vs, chunk_size=bad)
