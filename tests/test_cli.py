"""``bissl-fast`` command line: every error is one line on stderr with exit code 2; ``--debug`` shows tracebacks."""
from __future__ import annotations

import subprocess
import sys

import pytest

from bissl_fast import cli


@pytest.mark.parametrize(
    "argv,message",
    [
        ([], "the following arguments are required: COMMAND"),
        (["frob"], "invalid choice: 'frob'"),
        (["bench", "--nope"], "unrecognized arguments: --nope"),
        (["--nope", "bench"], "unrecognized arguments: --nope"),
        (["bench", "--max-time", "abc"], "invalid float value: 'abc'"),
        (["bench", "--suite-dir", "/nonexistent/suites"], "benchmark suites not found at /nonexistent/suites"),
        (["bench", "--select", "byol,moco"], "--select: no suite name contains 'moco' (suites: bench_batch_norm, "),
        (["bench", "--quick", "--threads", "0"], "--threads must be >= 1, got 0"),
    ],
)
def test_errors_are_one_line_with_exit_code_2(capsys, argv, message):
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("bissl-fast: error: ") and message in lines[0]


def test_exceptions_of_a_command_are_one_line_and_traceback_only_with_debug(capsys, monkeypatch):
    def broken(args, rest):
        raise KeyError("missing\nkey")

    monkeypatch.setattr(cli, "_bench", broken)
    assert cli.main(["bench"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == ["bissl-fast: error: KeyError: 'missing\\nkey' (run `bissl-fast --debug ...` for the traceback)"]
    with pytest.raises(KeyError, match="missing"):
        cli.main(["--debug", "bench"])


def test_entry_point_exit_code_and_stderr_in_a_real_process():
    proc = subprocess.run(
        [sys.executable, "-m", "bissl_fast.cli", "bench", "--suite-dir", "/nonexistent/suites"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
    debug = subprocess.run(
        [sys.executable, "-m", "bissl_fast.cli", "--debug", "bench", "--suite-dir", "/nonexistent/suites"],
        capture_output=True, text=True, timeout=120,
    )
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "BenchError: benchmark suites not found" in debug.stderr


def test_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    assert "--debug" in capsys.readouterr().out


def _cli(*args, module="bissl_fast.cli"):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("argv", [
    ["--debug", "run", "--config", "/no/such.toml"],
    ["run", "--debug", "--config", "/no/such.toml"],
    ["run", "--config", "/no/such.toml", "--debug"],
])
def test_debug_before_or_after_the_command_shows_the_traceback(argv):
    shown = _cli(*argv)
    assert shown.returncode != 0 and "Traceback" in shown.stderr, shown.stderr
    assert shown.stderr.strip().splitlines()[-1] == "FileNotFoundError: config file '/no/such.toml' does not exist"
    plain = _cli(*[a for a in argv if a != "--debug"])
    assert plain.returncode == 2
    assert plain.stderr == "bissl-fast run: error: config file '/no/such.toml' does not exist\n"


def test_debug_after_a_command_that_does_not_take_it():
    shown = _cli("bench", "--suite-dir", "/nonexistent/suites", "--debug")
    assert "Traceback" in shown.stderr and "BenchError: benchmark suites not found" in shown.stderr


def test_version_and_python_dash_m():
    import torch

    import bissl_fast

    version = _cli("--version", module="bissl_fast")
    assert version.returncode == 0 and version.stderr == ""
    assert version.stdout.startswith(f"bissl-fast {bissl_fast.__version__} (torch {torch.__version__}, Python ")
    error = _cli("run", "--config", "/no/such.toml", module="bissl_fast")
    assert error.returncode == 2 and error.stderr == "bissl-fast run: error: config file '/no/such.toml' does not exist\n"


@pytest.mark.parametrize("command", [[], ["run"], ["demo"], ["bench"]])
def test_help_is_plain_text(capsys, command):
    """No reStructuredText markup (double backticks) from docstrings in what --help prints."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: bissl-fast" in out and "``" not in out


def _public_children(package_dir) -> set[str]:
    """The modules and subpackages of a package folder whose names are not private (nor ``__main__``)."""
    children = {p.stem for p in package_dir.glob("*.py")} | {p.name for p in package_dir.iterdir() if (p / "__init__.py").is_file()}
    return {name for name in children if not name.startswith("_") and name != "suites"}


def _attribute_children(package_dir) -> set[str]:
    """What importing a package makes an attribute of it: lazy submodule names (``lazy_submodules(__name__, (...))``
    or the top level's ``_SUBMODULES``), and the submodules its ``__init__`` imports (``from .x import ...``,
    ``from . import x``), with those they import in turn."""
    import ast

    found: set[str] = set()
    pending = [package_dir / "__init__.py"]
    while pending:
        for node in ast.walk(ast.parse(pending.pop().read_text())):
            lazy_call = isinstance(node, ast.Call) and getattr(node.func, "id", None) == "lazy_submodules"
            lazy_table = isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_SUBMODULES" for t in node.targets)
            if lazy_call or lazy_table:
                found |= {c.value for c in ast.walk(node) if isinstance(c, ast.Constant) and isinstance(c.value, str)}
            elif isinstance(node, ast.ImportFrom) and node.level == 1:
                for name in {node.module.split(".")[0]} if node.module else {alias.name for alias in node.names}:
                    if name not in found and (package_dir / f"{name}.py").is_file():
                        pending.append(package_dir / f"{name}.py")
                    found.add(name)
    return found


def test_every_public_module_is_an_attribute_of_its_package():
    """After `import bissl_fast`, `bissl_fast.a.b` reaches every public module (imported on first access)."""
    from pathlib import Path

    root = Path(cli.__file__).parent
    packages = [root, *(p.parent for p in root.rglob("*/__init__.py") if "suites" not in p.parts)]
    unreachable = [f"{'.'.join(package.relative_to(root.parent).parts)}.{name}"
                   for package in packages if not any(part.startswith("_") for part in package.relative_to(root).parts)
                   for name in sorted(_public_children(package) - _attribute_children(package))]
    assert not unreachable, unreachable
    # The mechanism itself, each in a fresh interpreter (nothing imported by anything else first).
    for name in ("bissl_fast.train.backbones", "bissl_fast.ops.byol", "bissl_fast.kernels.nt_xent_torch",
                 "bissl_fast.experiments.pipeline.runner"):
        script = f"import functools, bissl_fast; m = functools.reduce(getattr, {name.split('.')[1:]!r}, bissl_fast); print(m.__name__)"
        reached = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert reached.stdout.strip() == name, reached.stderr[-2000:]
