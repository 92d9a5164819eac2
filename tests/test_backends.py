"""Backend registry, import hygiene, and the benchmark report pipeline."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bissl_fast
from bissl_fast._backends import (
    BACKEND_NAMES,
    OP_BACKENDS,
    BackendUnavailableError,
    resolve_backend,
    triton_interpret_mode,
)

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


def test_import_probes_nothing():
    code = (
        "import sys, bissl_fast; "
        "assert 'triton' not in sys.modules, 'triton imported at package import'; "
        "assert 'bissl_fast._C' not in sys.modules, 'extension imported at package import'; "
        "import torch; assert not torch.cuda.is_initialized()"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


_EAGER_THEN_COMPILE = """
import sys
import torch
from bissl_fast import byol_loss, nt_xent
from bissl_fast.solver import HessianOperator, ImplicitGradient

z = torch.randn(12, 6, requires_grad=True)
(g,) = torch.autograd.grad(nt_xent(z, temperature=0.3), z, create_graph=True)
torch.autograd.grad(g, z, torch.randn_like(g))
ps = [torch.randn(8, 5, requires_grad=True) for _ in range(4)]
(gp,) = torch.autograd.grad(byol_loss(*ps), ps[0], create_graph=True)
torch.autograd.grad(gp, ps[0], torch.randn_like(gp))
w, x = torch.randn(6, 6, requires_grad=True), torch.randn(12, 6)
with HessianOperator(lambda: nt_xent(x @ w, temperature=0.3), [w]) as op:
    ImplicitGradient([w]).solve(op, [torch.randn(6, 6)])
from bissl_fast import convert_batchnorm
net = convert_batchnorm(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten()))
params = list(net.parameters())
with HessianOperator(lambda: nt_xent(net(torch.randn(8, 3, 5, 5)), temperature=0.3), params) as op:
    op.matvec([torch.randn_like(p) for p in params])
loaded = [m for m in ("torch._dynamo", "torch._inductor", "triton") if m in sys.modules]
assert not loaded, f"the eager path loaded {loaded}"

# The same process can still compile the losses without graph breaks.
for loss in (lambda t: nt_xent(t, temperature=0.3, views=3), lambda t: byol_loss(t, t * 2, t + 1, t - 1)):
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    t = torch.randn(12, 6)
    assert torch.allclose(compiled(t), loss(t), rtol=1e-6, atol=0)
"""


def test_eager_losses_and_solver_do_not_load_the_compiler_stack():
    """torch._dynamo (with sympy and inductor: ~140 MB RSS, 1-2 s) stays unloaded on the eager CPU
    path (fused losses, their double backward, the Hessian operator and CG, the fused BatchNorm),
    and so does triton
    (~50 MB), which cannot run there; torch.compile still traces the losses with fullgraph=True
    afterwards."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", _EAGER_THEN_COMPILE], check=True, timeout=300, env=env)


def test_public_names_are_the_functions_not_their_modules():
    code = (
        "import bissl_fast.ops.nt_xent, bissl_fast.ops.byol, bissl_fast; "
        "from bissl_fast import nt_xent, byol_loss, HessianOperator; "
        "assert callable(nt_xent) and not isinstance(nt_xent, type(bissl_fast)), nt_xent; "
        "assert callable(byol_loss) and callable(HessianOperator)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_backends_reports_every_backend_with_reasons():
    available = bissl_fast.backends()
    assert set(available) == {"torch", "cpp", "triton", "cuda"}
    assert available["torch"] is True
    reasons = bissl_fast.backend_reasons()
    assert set(reasons) == {name for name, ok in available.items() if not ok}
    assert all(isinstance(r, str) and r for r in reasons.values())
    if not torch.cuda.is_available():
        assert not available["cuda"]


def test_resolve_backend_auto_and_explicit():
    cpu = torch.device("cpu")
    expected_auto = "cpp" if bissl_fast.backends()["cpp"] else "torch"
    assert resolve_backend("auto", cpu, "byol") == expected_auto
    assert resolve_backend("auto", cpu, "cg") == expected_auto
    assert resolve_backend("auto", cpu, "nt_xent") == "torch"
    assert resolve_backend("torch", cpu, "byol") == "torch"
    with pytest.raises(BackendUnavailableError, match="no 'triton' backend"):
        resolve_backend("triton", cpu, "cg")
    with pytest.raises(BackendUnavailableError, match="no 'cpp' backend"):
        resolve_backend("cpp", cpu, "nt_xent")
    with pytest.raises(BackendUnavailableError, match="cuda"):
        resolve_backend("cuda", cpu, "cg")
    with pytest.raises(ValueError, match="backend must be"):
        resolve_backend("fast", cpu, "byol")


def test_backend_table_is_consistent():
    """Every op's "auto" order only names backends the op supports, and every op has the torch path."""
    for op, table in OP_BACKENDS.items():
        assert "torch" in table.supported, op
        assert set(table.supported) <= set(BACKEND_NAMES), op
        for device_type, order in table.auto_order.items():
            assert set(order) <= set(table.supported), (op, device_type)


def test_cpp_backend_is_cpu_only():
    if not bissl_fast.backends()["cpp"]:
        pytest.skip("the C++ extension is not built")
    for op in ("byol", "cg"):  # no GPU is needed: the device type alone rules it out
        with pytest.raises(BackendUnavailableError, match="cannot run on cuda tensors.*backend='cuda'"):
            resolve_backend("cpp", torch.device("cuda"), op)


def test_triton_on_cpu_needs_the_interpreter():
    if triton_interpret_mode() or importlib.util.find_spec("triton") is None or torch.cuda.is_available():
        pytest.skip("only meaningful for CPU tensors, with triton installed and no interpreter")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", torch.device("cpu"), "nt_xent")


def test_poisoning_reaches_the_compiled_ops():
    if not bissl_fast.backends()["cpp"]:
        pytest.skip("the C++ extension is not built")
    from bissl_fast._alloc import poison_outputs
    from bissl_fast._backends import extension

    ext = extension()
    assert ext.poison_outputs_enabled()  # the autouse fixture of conftest poisons every test
    with poison_outputs(False):
        assert not ext.poison_outputs_enabled()
    assert ext.poison_outputs_enabled()


def test_unknown_attribute_raises():
    with pytest.raises(AttributeError):
        bissl_fast.does_not_exist  # noqa: B018


def test_bench_report_summarizes_pytest_benchmark_json(tmp_path):
    from bissl_fast.bench.report import markdown_table, plot, summarize

    fake = {
        "benchmarks": [
            {"name": f"t[{p}]", "group": None, "stats": {"median": m, "data": [m * 0.9, m, m * 1.1]},
             "extra_info": {"op": "nt_xent", "provider": p, "mode": "fwd", "size": {"N": 8, "D": 4},
                            "dtype": "float32", "peak_memory_bytes": 1000, "flops": 2e9,
                            "speedup_vs_reference": s}}
            for p, m, s in (("reference", 2e-3, 1.0), ("torch", 1e-3, 2.0))
        ]
    }
    rows = summarize(fake, {"matmul_flops_per_s": 1e12, "copy_bytes_per_s": 1e11})
    assert rows[1]["pct_of_floor"] == pytest.approx(100 * 2e-3 / 1e-3)
    assert rows[0]["p20_s"] == pytest.approx(1.8e-3) and rows[0]["p80_s"] == pytest.approx(2.2e-3)
    table = markdown_table(rows)
    assert "| nt_xent | fwd | N=8 D=4 | float32 | torch | 1.000 |" in table and "2.00x" in table
    assert [p.name for p in plot(rows, tmp_path)] == ["nt_xent_fwd_float32.png"]



def test_bench_plot_orders_sizes_by_number_not_text():
    from bissl_fast.bench.report import _size_sort_key

    sizes = [{"k": k, "N": 2048, "backend": "torch"} for k in (32, 1, 8)]
    assert [s["k"] for s in sorted(sizes, key=_size_sort_key)] == [1, 8, 32]
    assert sorted([{"backend": "torch"}, {"backend": "cpp"}], key=_size_sort_key) == [{"backend": "cpp"}, {"backend": "torch"}]


_TINY_SUITE = """
import torch
from bissl_fast import reference


def test_tiny(benchmark_op):
    z = torch.randn(16, 8)
    benchmark_op(lambda t: reference.nt_xent(t, 0.5), [(z,)], op="nt_xent", provider="reference", mode="fwd",
                 size={"N": 16, "D": 8}, dtype=torch.float32, device=torch.device("cpu"), flops=4 * 16 * 16 * 8)
"""


def test_bench_cli_runs_a_suite(tmp_path):
    suite = tmp_path / "suite"
    suite.mkdir()
    for name in ("conftest.py", "bench_utils.py"):
        shutil.copy(BENCH_DIR / name, suite / name)
    (suite / "bench_tiny.py").write_text(_TINY_SUITE)
    out = tmp_path / "bench"
    proc = subprocess.run(  # a relative --out, resolved against the caller's folder
        [sys.executable, "-m", "bissl_fast.cli", "bench", "--suite-dir", str(suite), "--out", "bench",
         "--device", "cpu", "--max-time", "0.01"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    (row,) = results["results"]
    assert (row["op"], row["provider"], row["speedup_vs_reference"]) == ("nt_xent", "reference", 1.0)
    assert row["peak_memory_bytes"] > 0 and row["pct_of_floor"] > 0
    assert "| nt_xent | fwd | N=16 D=8 | float32 | reference |" in (out / "results.md").read_text()
    assert (out / "nt_xent_fwd_float32.png").stat().st_size > 0
