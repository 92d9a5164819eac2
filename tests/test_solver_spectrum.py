"""Lanczos / power-iteration spectrum estimates and check_damping vs the dense Hessian's eigenvalues."""
from __future__ import annotations

import pytest
import torch
from test_solver_hessian import dense_hessian, make_problem, make_tiny_problem

from bissl_fast.solver import HessianOperator, check_damping, top_eigenvalues


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def test_spectrum_estimates_match_dense_eigenvalues():
    prob = make_tiny_problem()
    eig = torch.linalg.eigvalsh(dense_hessian(prob))
    n = eig.shape[0]
    with HessianOperator(prob.loss_fn, prob.params) as op:
        lanczos = top_eigenvalues(op, k=3, iters=n)
        power = top_eigenvalues(op, k=2, iters=300, method="power")
        report = check_damping(op, lam=0.001, damping=10.0, iters=n)
        tight = check_damping(op, lam=0.0, damping=0.5 * float(-eig[0]), iters=n)
    assert torch.allclose(lanczos, eig.flip(0)[:3], rtol=1e-8, atol=1e-10)
    by_magnitude = eig[eig.abs().argsort(descending=True)][:2]
    assert torch.allclose(power, by_magnitude, rtol=1e-4)
    assert report.lambda_min == pytest.approx(float(eig[0]), rel=1e-8, abs=1e-10)
    assert report.lambda_max == pytest.approx(float(eig[-1]), rel=1e-8)
    assert report.positive_definite == (float(eig[0]) > -10.001)
    # damping = |lambda_min| / 2 puts the system's smallest eigenvalue at -1: indefinite.
    assert float(eig[0]) < 0
    assert tight.system_min == pytest.approx(-1.0, rel=1e-6)
    assert not tight.positive_definite and tight.condition_number == float("inf")


def test_bad_inputs_raise_clear_errors():
    other = make_problem("simclr")
    with HessianOperator(other.loss_fn, other.params) as op:
        with pytest.raises(ValueError, match="Lanczos with iters=3"):
            top_eigenvalues(op, k=4, iters=3)
        with pytest.raises(ValueError, match="method"):
            top_eigenvalues(op, method="arnoldi")
        with pytest.raises(ValueError, match="block_size"):
            check_damping(op, block_size=0)


@pytest.mark.parametrize("block_size", [1, 3, 4])
def test_block_lanczos_through_the_whole_space_is_exact(block_size):
    """With as many products as parameters, every block size spans the space: the dense extremes."""
    prob = make_tiny_problem()
    eig = torch.linalg.eigvalsh(dense_hessian(prob))
    n = eig.shape[0]
    with HessianOperator(prob.loss_fn, prob.params) as op:
        report = check_damping(op, iters=n, block_size=block_size)
        top = top_eigenvalues(op, k=2, iters=n, block_size=block_size)
        assert op.num_products <= 2 * (n + block_size)
    assert report.lambda_min == pytest.approx(float(eig[0]), rel=1e-8, abs=1e-10)
    assert report.lambda_max == pytest.approx(float(eig[-1]), rel=1e-8)
    assert torch.allclose(top, eig.flip(0)[:2], rtol=1e-8, atol=1e-10)


def test_check_damping_runs_batched_products():
    """Block size b: about iters / b batched products of b vectors each."""
    prob = make_tiny_problem()
    with HessianOperator(prob.loss_fn, prob.params) as op:
        calls = []
        matmat = op.matmat
        op.matmat = lambda vs: calls.append(vs[0].shape[0]) or matmat(vs)
        check_damping(op, iters=12, block_size=4)
    assert calls == [4, 4, 4]
