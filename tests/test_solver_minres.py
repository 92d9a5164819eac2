"""minres_solve (all vector backends) vs the plain reference loop, SciPy's iterates and dense solves;
warm start, tolerance, MINRESInfo (residual recurrence, Ritz values), NaN handling, the fused ops."""
from __future__ import annotations

import pytest
import torch
from helpers import rel_err
from test_solver_cg import SHAPES, cpu_backends, spd_system

from bissl_fast import reference as R
from bissl_fast._backends import backends
from bissl_fast.solver import MINRESInfo, minres_solve

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def indefinite_system(dtype: torch.dtype, device: str = "cpu"):
    """A = diag(m) + (0.3 / n) 1 1^T split like SHAPES, with a third of the diagonal in [-1.5, -0.5]; and b.

    Symmetric and indefinite, |eigenvalues| bounded away from 0 (well conditioned), so the comparison
    measures the solver's arithmetic.
    """
    gen = torch.Generator().manual_seed(2)
    diags = []
    for s in SHAPES:
        m = torch.rand(s, generator=gen, dtype=torch.float64) + 0.5
        sign = torch.where(torch.rand(s, generator=gen) < 1 / 3, -1.0, 1.0).to(torch.float64)
        diags.append((m * sign).to(dtype).to(device))
    b = tuple(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).to(device) for s in SHAPES)
    calls = []
    coupling = 0.3 / sum(t.numel() for t in b)

    def matvec(d):
        calls.append(1)
        total = coupling * sum(t.sum() for t in d)
        return tuple(m * t + total for m, t in zip(diags, d))

    return matvec, b, calls


SYSTEMS = {"definite": spd_system, "indefinite": indefinite_system}


def dense_system(n: int, indefinite: bool, seed: int):
    """A small dense symmetric A = Q diag(e) Q^T (e of both signs when indefinite), b, and the split of [n] into tensors."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]
    e = torch.rand(n, generator=gen, dtype=torch.float64) * 2.5 + 0.5
    if indefinite:
        e[: n // 3] *= -1
    a = (q * e) @ q.T
    a = 0.5 * (a + a.T)
    b = torch.randn(n, generator=gen, dtype=torch.float64)
    sizes = [n // 3, n - n // 3 - 2, 2]
    return a, b, sizes, e


def split(flat: torch.Tensor, sizes) -> tuple[torch.Tensor, ...]:
    return tuple(t.reshape(2, -1) if t.numel() % 2 == 0 and t.numel() > 2 else t for t in flat.split(sizes))


def cat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _check_against_reference(backend: str, device: str, dtype: torch.dtype, kind: str):
    matvec64, b64, _ = SYSTEMS[kind](torch.float64, device)
    matvec, b, calls = SYSTEMS[kind](dtype, device)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for iters in range(1, 7):
        ref = R.minres_solve(matvec64, b64, iters=iters)
        calls.clear()
        out = minres_solve(matvec, b, iters=iters, backend=backend)
        assert len(calls) == iters, "x0=None must not spend a matvec"
        assert all(o.dtype == dtype and o.shape == t.shape for o, t in zip(out, b))
        assert rel_err(out, ref) < tol, (iters, rel_err(out, ref))


@pytest.mark.parametrize("kind", list(SYSTEMS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", cpu_backends())
def test_minres_matches_reference_loop_every_iteration(backend, dtype, kind):
    _check_against_reference(backend, "cpu", dtype, kind)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", list(SYSTEMS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", ["cuda", "torch"])
def test_minres_matches_reference_loop_every_iteration_cuda(backend, dtype, kind):
    _check_against_reference(backend, "cuda", dtype, kind)


@pytest.mark.parametrize("indefinite", [False, True])
@pytest.mark.parametrize("backend", cpu_backends())
def test_minres_matches_scipy_iterates_and_dense_solve(backend, indefinite):
    """Every iterate equals SciPy's minres iterate (same recurrences) to 1e-10; n iterations solve the system."""
    sla = pytest.importorskip("scipy.sparse.linalg", reason="SciPy's minres is the independent reference here")
    for n, seed in ((12, 0), (20, 1)):
        a, b, sizes, _ = dense_system(n, indefinite, seed)
        iterates = []
        sla.minres(a.numpy(), b.numpy(), rtol=1e-300, maxiter=n, callback=lambda xk: iterates.append(xk.copy()))
        assert len(iterates) >= n - 2  # SciPy stops only once converged to machine precision

        def matvec(d):
            return split(a @ cat(d), sizes)

        for k, expected in enumerate(iterates, start=1):
            x = cat(minres_solve(matvec, split(b, sizes), iters=k, backend=backend))
            assert rel_err(x, torch.from_numpy(expected)) < 1e-10, (n, k)
        x = cat(minres_solve(matvec, split(b, sizes), iters=n, backend=backend))
        assert rel_err(x, torch.linalg.solve(a, b)) < 1e-10


@pytest.mark.parametrize("backend", cpu_backends())
def test_residual_never_grows_and_info_is_the_true_residual(backend):
    a, b, sizes, e = dense_system(20, indefinite=True, seed=3)

    def matvec(d):
        return split(a @ cat(d), sizes)

    x, info = minres_solve(matvec, split(b, sizes), iters=8, return_info=True, backend=backend)
    assert isinstance(info, MINRESInfo) and info.iterations == 8 and info.backend == backend
    assert all(later <= earlier * (1 + 1e-12) for earlier, later in zip(info.residual_norms, info.residual_norms[1:]))
    assert info.relative_residuals[0] == pytest.approx(1.0)
    true_res = float((b - a @ cat(x)).norm())
    assert info.residual_norms[-1] == pytest.approx(true_res, rel=1e-9)
    # Ritz values lie inside the spectrum; with negative eigenvalues present Lanczos finds one.
    assert len(info.ritz_values) == 8 and info.ritz_values == sorted(info.ritz_values)
    assert float(e.min()) - 1e-10 <= info.ritz_values[0] and info.ritz_values[-1] <= float(e.max()) + 1e-10
    assert info.indefinite
    _, definite = minres_solve(lambda d: split(a.abs().diag().diag() @ cat(d), sizes), split(b, sizes), iters=4,
                               return_info=True, backend=backend)
    assert not definite.indefinite


@pytest.mark.parametrize("backend", cpu_backends())
def test_warm_start_tolerance_and_invariant_space(backend):
    matvec, b, calls = indefinite_system(torch.float64)
    exact = minres_solve(matvec, b, iters=80, backend=backend)
    # Warm start at the solution: r0 = b - A x0 costs one matvec and is ~0, so tol stops at once.
    calls.clear()
    x, info = minres_solve(matvec, b, iters=5, x0=exact, tol=1e-8, return_info=True, backend=backend)
    assert len(calls) == 1 and info.iterations == 0 and info.converged
    assert rel_err(x, exact) < 1e-12
    # A warm start elsewhere: the residuals are relative to ||b|| and x0 + correction solves the system.
    x0 = tuple(0.3 * t for t in b)
    x, info = minres_solve(matvec, b, iters=80, x0=x0, return_info=True, backend=backend)
    assert rel_err(x, exact) < 1e-10 and info.relative_residuals[0] < 1.0
    # Tolerance: stops early once ||r|| / ||b|| <= tol; every iteration spent one matvec.
    calls.clear()
    x, info = minres_solve(matvec, b, iters=50, tol=1e-6, return_info=True, backend=backend)
    assert info.converged and 1 <= info.iterations < 50 and len(calls) == info.iterations
    assert info.relative_residuals[-1] <= 1e-6 < info.relative_residuals[-2]
    # b an eigenvector (A = 2 I): the Krylov space is invariant after one step, which solves the system.
    calls.clear()

    def twice(d):
        calls.append(1)
        return tuple(2 * t for t in d)

    x, info = minres_solve(twice, b, iters=5, return_info=True, backend=backend)
    assert info.converged and info.iterations == 1 and len(calls) == 1
    assert rel_err(x, tuple(t / 2 for t in b)) < 1e-15
    # b = 0: x = 0 without a matvec.
    calls.clear()
    zeros = tuple(torch.zeros_like(t) for t in b)
    assert all(torch.equal(o, z) for o, z in zip(minres_solve(matvec, zeros, backend=backend), zeros))
    assert not calls


@pytest.mark.parametrize("backend", cpu_backends())
def test_nonfinite_products_give_finite_output_and_warning(backend):
    matvec, b, _ = indefinite_system(torch.float32)

    def broken(d):
        out = list(matvec(d))
        out[2] = out[2].clone()
        out[2][5] = float("nan")
        return out

    with pytest.warns(RuntimeWarning, match="minres_solve: the solution contained NaN/inf"):
        x, info = minres_solve(broken, b, iters=3, return_info=True, backend=backend)
    assert info.nonfinite
    assert all(bool(torch.isfinite(t).all()) for t in x)


def test_bad_inputs_raise_clear_errors():
    matvec, b, _ = indefinite_system(torch.float32)
    with pytest.raises(ValueError, match="iters must be >= 1"):
        minres_solve(matvec, b, iters=0)
    with pytest.raises(ValueError, match="tol must be a finite number > 0"):
        minres_solve(matvec, b, tol=-1.0)
    with pytest.raises(TypeError, match="matvec must be callable"):
        minres_solve("A", b)
    with pytest.raises(ValueError, match=r"matvec\(v\)\[1\] must have shape"):
        minres_solve(lambda d: tuple(t.reshape(-1) for t in d), b)
    with pytest.raises(TypeError, match=r"x0\[0\] must be torch.float32"):
        minres_solve(matvec, b, x0=tuple(t.double() for t in b))
    with pytest.raises(ValueError, match="backend must be"):
        minres_solve(matvec, b, backend="fortran")


@pytest.mark.skipif(not backends()["cpp"], reason="needs the C++ extension")
def test_fused_ops_pass_opcheck_and_reject_bad_lists():
    from bissl_fast.solver.cg_vector_ops import FusedOps

    FusedOps("cpp")  # loads the extension and registers the fake implementations
    ops = torch.ops.bissl_fast
    a = [torch.randn(5), torch.randn(4100)]
    utils = ("test_schema", "test_faketensor")
    fresh = lambda: [t.clone() for t in a]  # noqa: E731
    torch.library.opcheck(ops.cg_dot_pair, (fresh(), fresh(), fresh()), test_utils=utils)
    torch.library.opcheck(ops.minres_lanczos, (fresh(), a, a, 0.5, -1.5), test_utils=utils)
    torch.library.opcheck(ops.minres_update, (fresh(), fresh(), fresh(), a, a, 0.1, 0.2, 2.0, 0.7, 0.5),
                          test_utils=utils)
    # The fused results are the plain expressions.
    out = ops.cg_dot_pair(a, [2 * t for t in a], [t + 1 for t in a])
    assert out.shape == (2, 2) and out.dtype == torch.float64
    assert torch.allclose(out[0], torch.stack([2 * (t.double() ** 2).sum() for t in a]))
    assert torch.allclose(out[1], torch.stack([(t.double() * (t.double() + 1)).sum() for t in a]))
    with pytest.raises(RuntimeError, match=r"cg_dot_pair: c has 1 tensors, expected 2"):
        ops.cg_dot_pair(a, a, a[:1])
    with pytest.raises(RuntimeError, match=r"minres_lanczos: r2\[1\] has shape"):
        ops.minres_lanczos(fresh(), a, [a[0], torch.zeros(3)], 1.0, 1.0)
    with pytest.raises(RuntimeError, match=r"minres_update: y\[0\] has dtype"):
        ops.minres_update(fresh(), fresh(), fresh(), a, [a[0].double(), a[1]], 0.0, 0.0, 1.0, 1.0, 1.0)
