"""The benchmark report: README table generated from the committed results, table notes, CLI errors."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from bissl_fast import cli
from bissl_fast.bench import report as bench_report
from bissl_fast.bench import suite_runs
from bissl_fast.bench.report import (
    FLOOR_NOTE,
    README_END,
    BenchError,
    markdown_table,
    readme_block_source,
    render_readme_block,
    summarize,
    update_readme,
)

ROOT = Path(__file__).resolve().parents[1]


def test_readme_cpu_table_is_what_the_committed_results_render():
    text = (ROOT / "README.md").read_text()
    block, source = readme_block_source(text)
    results = ROOT / source
    assert results.is_file(), f"the README's benchmark block points at {source}, which is not committed"
    assert block == render_readme_block(json.loads(results.read_text()), source), (
        "README benchmark block is stale: regenerate it with "
        "python -c 'from bissl_fast.bench.report import update_readme; update_readme(\"README.md\", \"" + source + "\")'"
    )


def _bench(provider, median, ratio=None, floor_s=None):
    return {
        "name": f"t[{provider}]", "group": None, "stats": {"median": median, "data": [median] * 5},
        "extra_info": {
            "op": "byol", "provider": provider, "mode": "fwd", "size": {"B": 8, "D": 4}, "dtype": "float32",
            "threads": 1, "peak_memory_bytes": 2_000_000, "floor_s": floor_s, "floor_method": "read 1.0 MB",
            "speedup_vs_reference": 1.0 if provider == "reference" else ratio["median"], "ratio": ratio,
        },
    }


def _results(stable: bool, loaded: bool) -> dict:
    ratio = {"median": 2.5, "p20": 2.4, "p80": 2.6, "rounds": 12, "stable": stable, "spread": 0.08,
             "reference_median_s": 5e-3, "fast_median_s": 2e-3}
    fake = {"benchmarks": [_bench("reference", 5e-3, floor_s=1e-3), _bench("cpp", 2e-3, ratio, floor_s=3e-3)]}
    load = {"loaded": loaded, "reasons": ["calibration kernel after the suite: median 3.00x its best"] if loaded else []}
    return {"device": "cpu (x86_64, 2 cores)", "torch": "2.13.0", "threads": 1, "machine_load": load,
            "results": summarize(fake)}


def test_render_readme_block_rows_bands_and_warnings(tmp_path):
    block = render_readme_block(_results(stable=True, loaded=False), "bench/results.json")
    assert block.startswith("<!-- bench-cpu:start source=bench/results.json -->") and block.endswith(README_END)
    assert "| BYOL, `cpp` | B=8 D=4 | fwd | 1 | 5 ms | 2 ms | 2.50x (2.40-2.60) | 2.0 → 2.0 MB |" in block
    assert "WARNING" not in block and "unstable" not in block
    loaded = render_readme_block(_results(stable=False, loaded=True), "bench/results.json")
    assert "WARNING: the machine was loaded" in loaded and "median 3.00x its best" in loaded
    assert "2.50x (2.40-2.60) unstable" in loaded

    readme = tmp_path / "README.md"
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "results.json").write_text(json.dumps(_results(stable=True, loaded=False)))
    readme.write_text("intro\n<!-- bench-cpu:start source=old.json -->\nstale\n<!-- bench-cpu:end -->\noutro\n")
    update_readme(readme, tmp_path / "bench" / "results.json")
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("\noutro\n") and "stale" not in text
    assert readme_block_source(text) == (block, "bench/results.json")
    with pytest.raises(BenchError, match="block"):
        readme_block_source("no markers here")


def test_table_states_threads_band_and_explains_floors_above_100_percent():
    table = markdown_table(_results(stable=False, loaded=False)["results"])
    assert "| byol | fwd | B=8 D=4 | float32 | cpp | 2.000 |" in table
    assert "2.50x unstable | 2.40-2.60 (12) | 1 | 150.0% (a) | read 1.0 MB |" in table
    assert "| 1.00x | - | 1 | 20.0% | read 1.0 MB |" in table
    assert table.endswith(FLOOR_NOTE)


def _run_cli(args, capsys):
    code = cli.main(["bench", *args])
    err = capsys.readouterr().err
    return code, err


def test_bench_cli_errors_are_one_line_with_exit_code_2(tmp_path, monkeypatch, capsys):
    code, err = _run_cli(["--suite-dir", str(tmp_path / "missing"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and err.count("\n") == 1 and "benchmark suites not found" in err and "Traceback" not in err
    code, err = _run_cli(["--device", "tpu", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and err.count("\n") == 1 and "--device must be cpu or cuda" in err
    (tmp_path / "notes.md").write_text("no generated block here\n")
    code, err = _run_cli(["--update-readme", str(tmp_path / "notes.md"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and err.count("\n") == 1 and "block" in err  # checked before any suite runs
    (tmp_path / "empty").mkdir()
    code, err = _run_cli(["--suite-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "no bench_*.py suites" in err

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(suite_runs.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("pytest", "pytest_benchmark") else real_find_spec(name, *a))
    code, err = _run_cli(["--out", str(tmp_path / "o")], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "needs pytest, pytest_benchmark: pip install 'bissl_fast[test]'" in err and "Traceback" not in err


def test_suites_ship_inside_the_package():
    suites = bench_report.DEFAULT_SUITE_DIR
    assert suites.parent == Path(bench_report.__file__).resolve().parent
    names = {p.name for p in suites.glob("*.py")}
    assert {"conftest.py", "bench_utils.py", "bench_byol.py", "bench_nt_xent.py", "bench_solver.py"} <= names
    assert (suites / "__init__.py").is_file()  # a package, so setuptools puts it in the wheel
