"""cg_solve (all vector backends) vs the paper's plain loop, warm start, tolerance, CGInfo, NaN handling.

ImplicitGradient is tested in test_solver_implicit.py, the spectrum estimates in test_solver_spectrum.py."""
from __future__ import annotations

import pytest
import torch
from helpers import rel_err

from bissl_fast import reference as R
from bissl_fast._backends import BackendUnavailableError, backends
from bissl_fast.solver import CGInfo, cg_solve


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

# Awkward sizes: one tensor spans several 4096-element chunks and ends mid-chunk.
SHAPES = [(37,), (3, 17), (4099,), (2, 3, 5, 5), (9001,)]


def spd_system(dtype: torch.dtype, device: str = "cpu"):
    """A = diag(m) + (0.3 / n) 1 1^T over the concatenated n-vector, split like SHAPES; and b.

    SPD with eigenvalues in [0.5, 1.8]: well conditioned, so the comparison measures the solver's
    arithmetic, not the amplification of rounding by an ill-conditioned Krylov basis.
    """
    gen = torch.Generator().manual_seed(0)
    diags = [(torch.rand(s, generator=gen, dtype=torch.float64) + 0.5).to(dtype).to(device) for s in SHAPES]
    b = tuple(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).to(device) for s in SHAPES)
    calls = []
    coupling = 0.3 / sum(t.numel() for t in b)

    def matvec(d):
        calls.append(1)
        total = coupling * sum(t.sum() for t in d)
        return tuple(m * t + total for m, t in zip(diags, d))

    return matvec, b, calls


def cpu_backends():
    return ["torch"] + (["cpp"] if backends()["cpp"] else [])


def _check_against_reference(backend: str, device: str, dtype: torch.dtype, layerwise: bool):
    matvec64, b64, _ = spd_system(torch.float64, device)
    matvec, b, calls = spd_system(dtype, device)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for iters in range(1, 6):
        ref = R.cg_solve(matvec64, b64, iters=iters, layerwise=layerwise)
        calls.clear()
        out = cg_solve(matvec, b, iters=iters, layerwise=layerwise, backend=backend)
        assert len(calls) == iters, "x0=None must not spend a matvec"
        assert all(o.dtype == dtype and o.shape == t.shape for o, t in zip(out, b))
        assert rel_err(out, ref) < tol, (iters, rel_err(out, ref))


@pytest.mark.parametrize("layerwise", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", cpu_backends())
def test_cg_matches_reference_loop_every_iteration(backend, dtype, layerwise):
    _check_against_reference(backend, "cpu", dtype, layerwise)


@pytest.mark.cuda
@pytest.mark.parametrize("layerwise", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", ["cuda", "torch"])
def test_cg_matches_reference_loop_every_iteration_cuda(backend, dtype, layerwise):
    _check_against_reference(backend, "cuda", dtype, layerwise)


@pytest.mark.parametrize("backend", cpu_backends())
def test_fused_ops_match_foreach_ops_bf16(backend):
    """Half-precision storage: the element math runs in float32 (the op type), rounded on store."""
    matvec, b, _ = spd_system(torch.bfloat16)
    ref = R.cg_solve(spd_system(torch.float64)[0], tuple(t.double() for t in b), iters=3)
    assert rel_err(cg_solve(matvec, b, iters=3, backend=backend), ref) < 1e-2


@pytest.mark.parametrize("backend", cpu_backends())
def test_inputs_untouched_and_noncontiguous_inputs_accepted(backend):
    matvec, b, _ = spd_system(torch.float64)
    snapshot = [t.clone() for t in b]
    ref = cg_solve(matvec, b, iters=3, backend=backend)
    assert all(torch.equal(t, s) for t, s in zip(b, snapshot))
    # Transposed (non-contiguous) right-hand side and products: same solution.
    bt = tuple(t.T.contiguous().T if t.dim() == 2 else t for t in b)
    assert not bt[1].is_contiguous()
    out = cg_solve(lambda d: tuple(o.T.contiguous().T if o.dim() == 2 else o for o in matvec(d)), bt, iters=3,
                   backend=backend)
    assert all(torch.equal(o, r) for o, r in zip(out, ref))


@pytest.mark.skipif(not backends()["cpp"], reason="needs the C++ extension")
def test_fused_ops_pass_opcheck():
    """Schemas (declared mutations), fake implementations and dispatcher registration."""
    from bissl_fast.solver.cg_vector_ops import FusedOps

    FusedOps("cpp")  # loads the extension and registers the fake implementations
    ops = torch.ops.bissl_fast
    a = [torch.randn(5), torch.randn(4100)]
    alpha = torch.tensor([0.5, -2.0], dtype=torch.float64)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(ops.cg_dot, ([t.clone() for t in a], [t.clone() for t in a]), test_utils=utils)
    torch.library.opcheck(ops.cg_update, ([t.clone() for t in a], [t.clone() for t in a], a, a, alpha),
                          test_utils=utils)
    torch.library.opcheck(ops.cg_direction, ([t.clone() for t in a], a, alpha), test_utils=utils)


@pytest.mark.skipif(not backends()["cpp"], reason="needs the C++ extension")
def test_fused_ops_reject_bad_lists():
    ops = torch.ops.bissl_fast
    a = [torch.zeros(3), torch.zeros(2, 2)]
    alpha = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"cg_dot: b has 1 tensors, expected 2"):
        ops.cg_dot(a, a[:1])
    with pytest.raises(RuntimeError, match=r"cg_dot: b\[1\] has shape"):
        ops.cg_dot(a, [torch.zeros(3), torch.zeros(4)])
    with pytest.raises(RuntimeError, match="one dtype for all tensors"):
        ops.cg_dot(a, [torch.zeros(3), torch.zeros(2, 2, dtype=torch.float64)])
    with pytest.raises(RuntimeError, match=r"cg_update: ad\[1\] must be contiguous"):
        ops.cg_update(a, [t.clone() for t in a], a, [torch.zeros(3), torch.zeros(2, 2).T], alpha)
    with pytest.raises(RuntimeError, match="alpha must be float64"):
        ops.cg_update(a, [t.clone() for t in a], a, a, alpha.float())
    with pytest.raises(RuntimeError, match=r"beta must be \[T\] = \[2\]"):
        ops.cg_direction(a, a, torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("backend", cpu_backends())
def test_warm_start_tolerance_and_info(backend):
    matvec, b, calls = spd_system(torch.float64)
    exact = cg_solve(matvec, b, iters=60, layerwise=False, backend=backend)
    # Warm start at the solution: r0 = b - A x0 costs one matvec and is ~0, so tol stops at once.
    calls.clear()
    x, info = cg_solve(matvec, b, iters=5, x0=exact, tol=1e-8, return_info=True, backend=backend)
    assert len(calls) == 1 and info.iterations == 0 and info.converged
    assert rel_err(x, exact) < 1e-12
    # x0 = 0 is the cold start, bit for bit (same iterations), but spends the r0 matvec.
    cold = cg_solve(matvec, b, iters=3, backend=backend)
    warm0 = cg_solve(matvec, b, iters=3, x0=tuple(torch.zeros_like(t) for t in b), backend=backend)
    assert all(torch.equal(c, w) for c, w in zip(cold, warm0))
    # Tolerance: stops early once ||r|| / ||b|| <= tol, and the recorded residuals are the true ones.
    calls.clear()
    x, info = cg_solve(matvec, b, iters=50, layerwise=False, tol=1e-6, return_info=True, backend=backend)
    assert isinstance(info, CGInfo) and info.converged and info.backend == backend
    assert 1 <= info.iterations < 50 and len(calls) == info.iterations
    assert len(info.residual_norms) == info.iterations + 1
    assert info.relative_residuals[0] == pytest.approx(1.0)
    assert info.relative_residuals[-1] <= 1e-6 < info.relative_residuals[-2]
    true_res = torch.cat([(t - ax).reshape(-1) for t, ax in zip(b, matvec(x))]).norm()
    assert float(true_res) == pytest.approx(info.residual_norms[-1], rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("backend", cpu_backends())
def test_nonfinite_products_give_finite_output_and_warning(backend):
    matvec, b, _ = spd_system(torch.float32)

    def broken(d):
        out = list(matvec(d))
        out[2] = out[2].clone()
        out[2][5] = float("nan")
        out[4] = out[4].clone()
        out[4][0] = float("inf")
        return out

    with pytest.warns(RuntimeWarning, match="NaN/inf"):
        x, info = cg_solve(broken, b, iters=3, return_info=True, backend=backend)
    assert info.nonfinite
    assert all(bool(torch.isfinite(t).all()) for t in x)


def test_bad_inputs_raise_clear_errors():
    matvec, b, _ = spd_system(torch.float32)
    with pytest.raises(ValueError, match="iters must be >= 1"):
        cg_solve(matvec, b, iters=0)
    with pytest.raises(TypeError, match="iters must be an int"):
        cg_solve(matvec, b, iters=2.0)
    with pytest.raises(ValueError, match="tol must be a finite number > 0"):
        cg_solve(matvec, b, tol=0.0)
    with pytest.raises(TypeError, match="matvec must be callable"):
        cg_solve(None, b)
    with pytest.raises(ValueError, match=r"matvec\(d\)\[1\] must have shape"):
        cg_solve(lambda d: tuple(t.reshape(-1) for t in d), b)
    with pytest.raises(TypeError, match=r"matvec\(d\)\[0\] must be torch.float32"):
        cg_solve(lambda d: tuple(t.double() for t in d), b)
    with pytest.raises(ValueError, match=r"x0\[0\] must have shape"):
        cg_solve(matvec, b, x0=tuple(t.reshape(-1)[:1] for t in b))
    with pytest.raises(ValueError, match="backend must be"):
        cg_solve(matvec, b, backend="fortran")
    with pytest.raises(BackendUnavailableError):
        cg_solve(matvec, b, backend="cuda")
    if backends()["cpp"]:
        with pytest.raises(TypeError, match="one dtype"):
            cg_solve(lambda d: d, (b[0], b[1].double()), backend="cpp")
