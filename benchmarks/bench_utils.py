"""Helpers for benchmark suites (import as ``from bench_utils import ...``)."""
from __future__ import annotations

import os

import pytest
import torch

from bissl_fast._backends import backends


def bench_sizes_full(device: torch.device) -> bool:
    """Full size grid on CUDA; the small grid on CPU. BISSL_BENCH_SIZES=small|full overrides."""
    choice = os.environ.get("BISSL_BENCH_SIZES", "auto")
    if choice == "auto":
        return device.type == "cuda"
    return choice == "full"


def provider_skip_reason(provider: str, device: torch.device) -> str | None:
    """Why ``provider`` is not timed on ``device`` here (None: it is). ``reference`` and ``torch`` run anywhere."""
    if provider == "cpp" and device.type != "cpu":
        return "the cpp provider is the CPU kernel (CUDA tensors use the cuda provider)"
    if provider in ("cpp", "cuda") and not backends()[provider]:
        return f"backend {provider!r} is unavailable here"
    if provider == "cuda" and device.type != "cuda":
        return "the cuda provider needs CUDA tensors"
    if provider == "triton" and not (backends()["triton"] and device.type == "cuda"):
        return "the Triton provider is timed on CUDA only (the CPU interpreter is for testing)"
    return None


def size_grid(small: list[tuple], full: list[tuple]) -> list[tuple]:
    """Every size of either grid, in a stable order, for ``pytest.mark.parametrize`` (dtypes sort by name)."""
    return sorted(set(small) | set(full), key=lambda size: tuple(str(v) if isinstance(v, torch.dtype) else v for v in size))


def skip_unless_timed(device: torch.device, provider: str, size: tuple, small: list[tuple], full: list[tuple]) -> None:
    """Skip (with the reason) a row whose size is not in this device's grid or whose provider is not timed here."""
    if size not in (full if bench_sizes_full(device) else small):
        pytest.skip("size not in this device's grid (BISSL_BENCH_SIZES=small|full)")
    reason = provider_skip_reason(provider, device)
    if reason:
        pytest.skip(reason)
