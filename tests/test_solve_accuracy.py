"""The exact-solution tool (bissl_fast.experiments.solve_accuracy) on a backbone small enough to check by hand."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import rel_err

from bissl_fast.experiments import solve_accuracy as sa
from bissl_fast.solver import HessianOperator

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def test_dense_hessian_is_the_operators_products():
    prob = sa.build_problem((2, 3), pretrain_steps=1, batch=8)
    with HessianOperator(prob.loss, prob.params) as op:
        h = sa.dense_hessian(op, block=17)  # blocks that do not divide P
        n = h.shape[0]
        assert n == sum(p.numel() for p in prob.params) and torch.equal(h, h.T)
        gen = torch.Generator().manual_seed(0)
        d = torch.randn(n, generator=gen, dtype=torch.float64)
        pieces, offset = [], 0
        for p in prob.params:
            pieces.append(d[offset : offset + p.numel()].reshape(p.shape))
            offset += p.numel()
        hd = torch.cat([t.reshape(-1) for t in op.matvec(tuple(pieces))])
    assert rel_err(h @ d, hd) < 1e-12


def test_methods_against_the_exact_solution():
    n = sum(p.numel() for p in sa.build_problem((2, 3), 0, batch=8).params)
    long = f"minres:{4 * n}"
    result = sa.solve_accuracy((2, 3), 0, ["none", "cg-layerwise:3", "cg-global:3", "minres:3", long], batch=8)
    m = result.methods
    assert result.parameters == n and m["none"]["rel_res"] > 0
    # The system is indefinite (condition ~2.6e3): in floating point MINRES needs more products than unknowns
    # (its Lanczos basis loses orthogonality) and then solves it; its residual never exceeds no solve's.
    assert result.lambda_min < -(0.001 + 10.0)
    assert m[long]["rel_err"] < 1e-10 and m[long]["rel_res"] < 1e-10
    assert m["minres:3"]["rel_res"] <= m["none"]["rel_res"]
    # Global CG's recursion is its residual; layerwise CG's own number is recorded beside the true one.
    assert m["cg-global:3"]["recursive_res"] == pytest.approx(m["cg-global:3"]["rel_res"], rel=1e-6)
    assert "recursive_res" in m["cg-layerwise:3"] and "recursive_res" not in m["minres:3"]
    assert result.system_condition >= 1 and result.lambda_min <= result.lanczos_lambda_min["10 products"]
    table = sa.format_table([result])
    assert table.splitlines()[0] == "| method (Hessian products) | widths 2-3, init |"
    assert f"| minres ({4 * n}) |" in table and "| no solve, x = v (0) |" in table


def test_cli_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "sub" / "results.json"
    assert sa.main(["--widths", "2,3", "--pretrain-steps", "0", "--batch", "8", "--methods", "none", "minres:2",
                    "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| minres (2) |" in printed and "widths 2-3, init" in printed
    saved = json.loads(out.read_text())
    assert saved["provenance"]["source_sha256"] and saved["args"]["batch"] == 8
    assert saved["results"][0]["methods"]["minres:2"]["rel_res"] <= saved["results"][0]["methods"]["none"]["rel_res"]
    with pytest.raises(SystemExit):
        sa.main(["--methods", "gmres:5"])
    assert "method must be 'none' or <cg-layerwise|cg-global|minres>:<iterations>" in capsys.readouterr().err
