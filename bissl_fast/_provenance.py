"""Where a result came from: the code, the software, the machine and the command (docs/design.md §4).

Every committed result file (the demo's and the pipeline's ``summary.json``, the benchmarks'
``results.json``) carries :func:`provenance`. Its ``source_sha256`` is a hash of the code that
produced the numbers; :func:`older_code_note` compares it with the code of today, so a README block
generated from an old file says so instead of passing it off as current.

Importing this module is cheap: versions come from package metadata, never by importing triton or
scikit-learn.
"""
from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent
# The code a result depends on: the package's Python sources (not the benchmark suites it ships, which a
# benchmark result adds with `extra`), the C++/CUDA sources and the build script that sets compiler flags.
SOURCE_PATTERNS: tuple[str, ...] = ("bissl_fast/**/*.py", "csrc/**/*.h", "csrc/**/*.cuh", "csrc/**/*.cpp",
                                    "csrc/**/*.cu", "setup.py")
BENCHMARK_SUITE_PATTERNS: tuple[str, ...] = ("benchmarks/*.py",)
_VERSIONED = ("torch", "numpy", "scikit-learn", "triton", "torchvision", "bissl_fast")


def source_files(patterns: Sequence[str] = SOURCE_PATTERNS, root: Path = REPO_DIR) -> list[Path]:
    """The files ``patterns`` match under ``root``, sorted; the shipped-suites link is not followed twice."""
    found: set[Path] = set()
    for pattern in patterns:
        for path in root.glob(pattern):
            relative = path.relative_to(root)
            if path.is_file() and relative.parts[:3] != ("bissl_fast", "bench", "suites") and "__pycache__" not in relative.parts:
                found.add(relative)
    return sorted(found)


def source_hash(patterns: Sequence[str] = SOURCE_PATTERNS, root: Path = REPO_DIR) -> str:
    """SHA-256 over the relative path and bytes of every file of :func:`source_files`, in sorted order."""
    digest = hashlib.sha256()
    for relative in source_files(patterns, root):
        digest.update(relative.as_posix().encode() + b"\0")
        digest.update((root / relative).read_bytes() + b"\0")
    return digest.hexdigest()


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(REPO_DIR), *args], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(extra_patterns: Iterable[str] = (), command: Sequence[str] | None = None) -> dict[str, Any]:
    """What produced a result, as a JSON-ready dict (see the module docstring).

    ``extra_patterns``: files besides the package's sources that determine the result (the benchmark
    suites for benchmark results). ``command``: the command line (default ``sys.argv``).
    """
    patterns = (*SOURCE_PATTERNS, *extra_patterns)
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit is not None else None
    return {
        "git_commit": commit,
        "git_dirty": None if status is None else bool(status),
        "source_sha256": source_hash(patterns),
        "source_patterns": list(patterns),
        "source_files": len(source_files(patterns)),
        "versions": {"python": platform.python_version(), **{name: _version(name) for name in _VERSIONED}},
        "torch_build": {"version": str(torch.__version__), "cuda": torch.version.cuda, "debug": torch.version.debug},
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_model": _cpu_model(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": {
            "intra_op": torch.get_num_threads(),
            "inter_op": torch.get_num_interop_threads(),
            **{name: os.environ.get(name) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ATEN_CPU_CAPABILITY")},
        },
        "command": shlex.join(sys.argv if command is None else command),
        "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def short_form(record: dict[str, Any] | None) -> str:
    """``commit 0123456789 (dirty), CPU AVX512, torch 2.14.1`` for reports and README blocks."""
    if not record:
        return "provenance not recorded (produced before results carried it)"
    commit = record.get("git_commit")
    commit_text = "not a git checkout" if commit is None else f"commit {commit[:10]}" + (" (dirty)" if record.get("git_dirty") else "")
    return f"{commit_text}, CPU {record.get('cpu_capability')}, torch {record.get('torch_build', {}).get('version')}"


def older_code_note(record: dict[str, Any] | None) -> str | None:
    """``None`` when ``record`` was produced by today's code, else one sentence saying it was not."""
    if not record:
        return "**Results from older code**: this file records no source hash, so it predates the current code."
    today = source_hash(record.get("source_patterns", SOURCE_PATTERNS))
    if record.get("source_sha256") == today:
        return None
    return (f"**Results from older code**: produced by sources {record.get('source_sha256', '?')[:12]}, the code "
            f"today hashes to {today[:12]}; re-run the command above to refresh them.")


__all__ = ["BENCHMARK_SUITE_PATTERNS", "SOURCE_PATTERNS", "older_code_note", "provenance", "short_form", "source_files",
           "source_hash"]
