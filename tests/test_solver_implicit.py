"""ImplicitGradient (CG and MINRES, all vector backends) vs reference.implicit_grad and vs dense solves;
the SolveReport's residuals and spectral signal, auto damping."""
from __future__ import annotations

import math

import pytest
import torch
from helpers import rel_err
from test_solver_cg import cpu_backends
from test_solver_hessian import dense_hessian, make_problem, make_tiny_problem, random_like

from bissl_fast import reference as R
from bissl_fast.solver import HessianOperator, ImplicitGradient, check_damping


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.mark.parametrize("method, layerwise", [("cg", True), ("cg", False), ("minres", None)])
@pytest.mark.parametrize("kind", ["simclr", "byol"])
def test_implicit_gradient_matches_reference(kind, method, layerwise):
    prob = make_problem(kind)
    v = random_like(prob.params)
    ref = R.implicit_grad(prob.loss_fn, prob.params, v, layerwise=bool(layerwise), method=method)
    for backend in cpu_backends():
        solver = ImplicitGradient(prob.params, layerwise=layerwise, backend=backend, method=method)
        with HessianOperator(prob.loss_fn, prob.params) as op:
            x = solver.solve(op, v)
            # Layerwise CG spends one more product measuring its true residual (its recursion is not that).
            assert op.num_products == 5 + (layerwise is True) == solver.last_report.products
        assert rel_err(x, ref) < 1e-10, backend
        assert solver.last_info.iterations == 5 and solver.last_info.backend == backend


def _dense_system(prob, damping: float) -> torch.Tensor:
    h = dense_hessian(prob)
    return torch.eye(h.shape[0], dtype=torch.float64) + h / (0.001 + damping)


def _flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


@pytest.mark.parametrize("method, layerwise", [("cg", True), ("cg", False), ("minres", None)])
def test_solve_report_matches_dense_quantities(method, layerwise):
    """The reported residuals are ||v - A x|| / ||v|| and ||v - A v|| / ||v|| of the dense system."""
    prob = make_tiny_problem()
    a = _dense_system(prob, damping=1.0)
    v = random_like(prob.params)
    solver = ImplicitGradient(prob.params, damping=1.0, method=method, layerwise=layerwise)
    with HessianOperator(prob.loss_fn, prob.params) as op:
        x = solver.solve(op, v)
    report, flat_v = solver.last_report, _flat(v)
    assert report.method == {"cg": "cg-layerwise" if layerwise else "cg-global", "minres": "minres"}[method]
    true_res = float((flat_v - a @ _flat(x)).norm() / flat_v.norm())
    assert report.relative_residual == pytest.approx(true_res, rel=1e-8)
    assert report.residual_measured == (layerwise is True)
    assert report.no_solve_relative_residual == pytest.approx(float((flat_v - a @ flat_v).norm() / flat_v.norm()), rel=1e-10)
    assert report.worse_than_no_solve == (true_res > report.no_solve_relative_residual)
    # The free spectral signal bounds the smallest eigenvalue of A from above; here A is indefinite.
    lowest = float(torch.linalg.eigvalsh(a)[0])
    assert lowest < 0 and report.system_min_estimate >= lowest - 1e-9
    assert report.damping == 1.0 and report.damping_products == 0 and not report.nonfinite
    if layerwise:
        # Unmeasured, layerwise CG's residual is unknown (its recursion is not v - A x), never a made-up number.
        unmeasured = ImplicitGradient(prob.params, damping=1.0, measure_residual=False)
        with HessianOperator(prob.loss_fn, prob.params) as op:
            unmeasured.solve(op, v)
            assert op.num_products == 5
        assert math.isnan(unmeasured.last_report.relative_residual) and unmeasured.last_report.worse_than_no_solve is None


def test_minres_never_worse_than_no_solve_where_layerwise_cg_is():
    """At random initialization the paper's system is indefinite (lambda_min(H) << -(lam + damping)):
    the paper's layerwise CG ends further from solving it than x = v, MINRES never does."""
    prob = make_problem("simclr")
    v = random_like(prob.params)
    reports = {}
    with HessianOperator(prob.loss_fn, prob.params) as op:
        assert not check_damping(op, iters=20).positive_definite
        for method in ("cg", "minres"):
            for iters in range(1, 6):
                solver = ImplicitGradient(prob.params, method=method, iters=iters, measure_residual=True)
                solver.solve(op, v)
                reports[method, iters] = solver.last_report
    for iters in range(1, 6):
        minres = reports["minres", iters]
        assert minres.relative_residual <= minres.no_solve_relative_residual
        assert not minres.worse_than_no_solve
    assert reports["cg", 5].worse_than_no_solve and reports["cg", 5].relative_residual > 2 * reports["cg", 5].no_solve_relative_residual
    assert reports["minres", 5].indefinite  # a negative Ritz value: the system is indefinite


def test_auto_damping_makes_the_system_positive_definite():
    prob = make_tiny_problem()
    v = random_like(prob.params)
    assert float(torch.linalg.eigvalsh(_dense_system(prob, 1.0))[0]) < 0
    solver = ImplicitGradient(prob.params, damping=1.0, auto_damping=True, auto_damping_iters=12, method="minres")
    with HessianOperator(prob.loss_fn, prob.params) as op:
        solver.solve(op, v)
        first = solver.last_report
        assert op.num_products == 12 + 5 == first.products and first.damping_products == 12
        solver.solve(op, v)  # the same operator: the estimate is reused
        assert solver.last_report.damping == first.damping and solver.last_report.damping_products == 0
        assert op.num_products == 12 + 10
    assert float(torch.linalg.eigvalsh(_dense_system(prob, first.damping))[0]) > 0.25
    # A floor that already gives the margin stays.
    calm = ImplicitGradient(prob.params, damping=1000.0, auto_damping=True)
    with HessianOperator(prob.loss_fn, prob.params) as op:
        calm.solve(op, v)
    assert calm.last_report.damping == 1000.0 and calm.last_report.damping_products == 10


def test_implicit_gradient_float32_matches_float64_reference():
    # At this random init with 2 samples per view, lambda_min(H) is about -3400: with the paper's
    # damping the system is indefinite and CG amplifies any rounding (float32 and float64 runs of
    # the reference itself disagree). damping=5000 makes it positive definite (condition ~4), so
    # the comparison measures the float32 path's arithmetic.
    prob64, prob32 = make_problem("simclr"), make_problem("simclr", dtype=torch.float32)
    v = random_like(prob64.params)
    ref = R.implicit_grad(prob64.loss_fn, prob64.params, v, damping=5000.0)
    for backend in cpu_backends():
        with HessianOperator(prob32.loss_fn, prob32.params) as op:
            assert check_damping(op, damping=5000.0, iters=10).positive_definite
            x = ImplicitGradient(prob32.params, damping=5000.0, backend=backend).solve(op, tuple(t.float() for t in v))
        assert rel_err(x, ref) < 1e-5, backend


def test_per_tensor_lam():
    prob = make_problem("simclr")
    v = random_like(prob.params)
    lams = [0.001 * (i + 1) for i in range(len(prob.params))]
    scales = [1.0 / (lam + 10.0) for lam in lams]

    def matvec(d):
        return tuple(di + s * hdi for di, s, hdi in zip(d, scales, R.hvp(prob.loss_fn, prob.params, d)))

    ref = R.cg_solve(matvec, v, iters=5)
    with HessianOperator(prob.loss_fn, prob.params) as op:
        x = ImplicitGradient(prob.params, lam=lams).solve(op, v)
        same = ImplicitGradient(prob.params, lam=[0.001] * len(prob.params)).solve(op, v)
        scalar = ImplicitGradient(prob.params, lam=0.001).solve(op, v)
    assert rel_err(x, ref) < 1e-10
    assert all(torch.equal(a, c) for a, c in zip(same, scalar))


def test_cg_converges_to_dense_solve_on_tiny_model():
    prob = make_tiny_problem()
    h = dense_hessian(prob)
    n = h.shape[0]
    c = 0.001 + 10.0
    system = torch.eye(n, dtype=torch.float64) + h / c
    assert float(torch.linalg.eigvalsh(system)[0]) > 0  # SPD: CG converges
    v = random_like(prob.params)
    exact = torch.linalg.solve(system, torch.cat([t.reshape(-1) for t in v]))
    # Global CG is CG on the coupled system (layerwise CG is not, and need not converge). Its
    # recursive residual stalls near 1e-8 relative because of the paper's 1e-12 in alpha's
    # denominator, but the iterate keeps improving: no tol here.
    with HessianOperator(prob.loss_fn, prob.params) as op:
        x = ImplicitGradient(prob.params, layerwise=False, iters=2 * n).solve(op, v)
    assert rel_err(torch.cat([t.reshape(-1) for t in x]), exact) < 1e-8


def test_bad_inputs_raise_clear_errors():
    prob = make_tiny_problem()
    with pytest.raises(ValueError, match="method must be one of"):
        ImplicitGradient(prob.params, method="gmres")
    with pytest.raises(ValueError, match="layerwise applies to CG only"):
        ImplicitGradient(prob.params, method="minres", layerwise=True)
    with pytest.raises(TypeError, match="measure_residual must be a bool or None"):
        ImplicitGradient(prob.params, measure_residual="yes")
    with pytest.raises(ValueError, match="auto_damping_iters must be >= 2"):
        ImplicitGradient(prob.params, auto_damping=True, auto_damping_iters=1)
    with pytest.raises(ValueError, match="lam must be a scalar or have one value per parameter"):
        ImplicitGradient(prob.params, lam=[0.1, 0.2])
    with pytest.raises(ValueError, match="damping must be a finite number >= 0"):
        ImplicitGradient(prob.params, damping=-1.0)
    with pytest.raises(ValueError, match="iters must be >= 1"):
        ImplicitGradient(prob.params, iters=0)
    other = make_problem("simclr")
    with HessianOperator(other.loss_fn, other.params) as op:
        with pytest.raises(ValueError, match="other shapes"):
            ImplicitGradient(prob.params).solve(op, random_like(prob.params))
