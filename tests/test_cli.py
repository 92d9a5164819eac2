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
