"""What a pip install of bissl_fast ships: the wheel's files and metadata, and the Python it declares."""
from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Standard-library modules the package imports that older Python 3 releases lack, with the release that added them.
_STDLIB_ADDED = {"tomllib": (3, 11)}


def _declared_floor() -> tuple[int, int]:
    spec = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    match = re.fullmatch(r">=\s*3\.(\d+)", spec)
    assert match, f"requires-python {spec!r} is not of the form '>=3.N'"
    return 3, int(match.group(1))


def test_the_declared_python_has_every_standard_module_the_package_imports():
    imported = set()
    for path in (ROOT / "bissl_fast").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    assert "tomllib" in imported  # `bissl-fast run --config`
    too_new = {m: v for m, v in _STDLIB_ADDED.items() if m in imported and v > _declared_floor()}
    assert not too_new, f"requires-python is >={'.'.join(map(str, _declared_floor()))} but the package imports {too_new}"


@pytest.mark.slow
def test_the_wheel_ships_the_license_the_type_marker_and_the_metadata(tmp_path):
    """A pure-Python wheel (BISSL_FAST_SKIP_EXT=1: nothing compiles) built from a copy of the sources."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("*.so", "__pycache__", "results")
    shutil.copytree(ROOT / "bissl_fast", source / "bissl_fast", symlinks=True, ignore=ignore)
    shutil.copytree(ROOT / "benchmarks", source / "benchmarks", ignore=ignore)  # bissl_fast/bench/suites links here
    env = dict(os.environ, BISSL_FAST_SKIP_EXT="1", PYTHONWARNINGS="ignore")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
                            "-w", str(tmp_path / "dist"), str(source)], env=env, capture_output=True, text=True,
                           timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("bissl_fast-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = Parser().parsestr(archive.read(metadata_name).decode())
        (license_name,) = [n for n in names if ".dist-info/" in n and n.rsplit("/", 1)[1] == "LICENSE"]
        license_text = archive.read(license_name).decode()
    assert "bissl_fast/py.typed" in names and "bissl_fast/__main__.py" in names
    assert license_text.startswith("MIT License") and "Copyright (c) 2026 the bissl_fast authors" in license_text
    assert metadata["Author"] == "the bissl_fast authors" and metadata["License"] == "MIT"
    assert "License :: OSI Approved :: MIT License" in metadata.get_all("Classifier")
    assert metadata["Requires-Python"] == f">={_declared_floor()[0]}.{_declared_floor()[1]}"
    assert "Paper, https://arxiv.org/abs/2410.02387" in metadata.get_all("Project-URL")
