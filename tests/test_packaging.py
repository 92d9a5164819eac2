"""setup.py's early, one-line failures and its CUDA toolkit lookup, without compiling anything; the test
configuration's warning filters."""
from __future__ import annotations

import ast
import os
import re
import shutil
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _setup_functions() -> dict:
    """setup.py's module-level definitions, without running its setup() call."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    runs = ("setup(", "_extensions()", "_check_wheel_support()")
    tree.body = [node for node in tree.body if not any(call in ast.unparse(node) for call in runs)
                 or isinstance(node, ast.FunctionDef)]
    namespace = {"__file__": str(ROOT / "setup.py")}
    exec(compile(tree, "setup.py", "exec"), namespace)
    return namespace


def test_two_sources_with_one_stem_stop_the_build_in_one_line(tmp_path):
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    (tmp_path / "csrc" / "cuda" / "clash_cuda.cpp").write_text("")
    (tmp_path / "csrc" / "cuda" / "clash_cuda.cu").write_text("")
    proc = subprocess.run([sys.executable, "setup.py", "build_ext"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("bissl_fast build: csrc/cuda/clash_cuda.cpp and csrc/cuda/clash_cuda.cu compile to the "
                               "same object"), lines[0]


def test_torch_lower_bound_matches_pyproject_and_has_no_upper_bound():
    low = ".".join(map(str, _setup_functions()["TORCH_MIN"]))
    deps = re.search(r'^dependencies = \[(.*)\]$', (ROOT / "pyproject.toml").read_text(), re.MULTILINE).group(1)
    assert f'"torch>={low}"' in deps, deps


@pytest.mark.parametrize("version", ["2.10.0", "2.9.1+cu126", "1.13.1"])
def test_torch_older_than_supported_is_refused_in_one_line(version):
    with pytest.raises(SystemExit) as exc:
        _setup_functions()["_check_torch_version"](version)
    message = str(exc.value.code)
    assert "\n" not in message
    assert message.startswith(f"bissl_fast build: torch {version} is older than the oldest supported 2.11;"), message


@pytest.mark.parametrize("version", ["2.11.0", "2.11.0+cu130", "2.13.0+cpu", "2.14.1"])
def test_tested_torch_builds_silently(version, capsys):
    _setup_functions()["_check_torch_version"](version)
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("version", ["2.15.0", "2.16.0.dev20260101+cpu", "3.0.0"])
def test_torch_newer_than_tested_builds_with_one_warning_line(version, capsys):
    setup = _setup_functions()
    setup["_check_torch_version"](version)
    tested = f"2.11-{'.'.join(map(str, setup['TORCH_NEWEST_TESTED']))}"
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (f"bissl_fast build: warning: torch {version} is newer than the tested range {tested}; "
                   "building against it anyway\n"), err


def test_cuda_home_found_behind_an_nvcc_wrapper(tmp_path, monkeypatch):
    real_nvcc = shutil.which("nvcc")
    if real_nvcc is None:
        pytest.skip("no nvcc on this machine")
    setup = _setup_functions()
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    toolkit = setup["_find_cuda_home"]()
    assert (Path(toolkit) / "include" / "cuda_runtime.h").is_file()
    wrapper = tmp_path / "bin" / "nvcc"  # like the machine's /usr/local/bin/nvcc: its parent is no toolkit
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {Path(toolkit) / "bin" / "nvcc"} "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}")
    assert shutil.which("nvcc") == str(wrapper)
    assert setup["_find_cuda_home"]() == toolkit


def test_warnings_raised_from_bissl_fast_fail_the_test():
    with pytest.raises(FutureWarning, match="probe"):
        warnings.warn_explicit("probe", FutureWarning, "ops/probe.py", 1, module="bissl_fast.ops.probe")
    with pytest.warns(FutureWarning, match="probe"):  # elsewhere a warning stays a warning
        warnings.warn_explicit("probe", FutureWarning, "probe.py", 1, module="somebody_else")


def test_tested_torch_range_is_the_pinned_one():
    """setup.py's oldest supported and newest tested minor releases are the torch pins scripts/setup.sh tests."""
    setup = _setup_functions()
    pins = (ROOT / "scripts" / "setup.sh").read_text()
    newest = re.search(r'^PINS=\(\s*"torch==(\d+)\.(\d+)\.', pins, re.MULTILINE)
    oldest = re.search(r'^OLDEST_PINS=\(\s*"torch==(\d+)\.(\d+)\.', pins, re.MULTILINE)
    assert tuple(map(int, newest.groups())) == setup["TORCH_NEWEST_TESTED"]
    assert tuple(map(int, oldest.groups())) == setup["TORCH_MIN"]
