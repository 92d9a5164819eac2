"""Helpers for benchmark suites (import as ``from bench_utils import ...``)."""
from __future__ import annotations

import os

import pytest
import torch

from bissl_fast._backends import backends

SIZES_ENV = "BISSL_BENCH_SIZES"
SIZE_CHOICES = ("auto", "small", "full", "quick")


def bench_sizes(device: torch.device) -> str:
    """The grid timed on ``device``: ``full`` on CUDA, ``small`` on CPU; ``BISSL_BENCH_SIZES`` overrides.

    ``quick`` is one size per op (``sizes_timed``'s ``quick``): what ``bissl-fast bench --quick`` and the
    regression test of the benchmark flow run.
    """
    choice = os.environ.get(SIZES_ENV, "auto")
    if choice not in SIZE_CHOICES:
        raise ValueError(f"{SIZES_ENV} must be one of {', '.join(SIZE_CHOICES)}, got {choice!r}")
    if choice == "auto":
        return "full" if device.type == "cuda" else "small"
    return choice


def bench_sizes_full(device: torch.device) -> bool:
    """Whether the full grid is timed on ``device`` (see ``bench_sizes``)."""
    return bench_sizes(device) == "full"


def sizes_timed(device: torch.device, small: list, full: list, quick=None) -> list:
    """The sizes of an op timed on ``device``: ``full`` or ``small`` (``bench_sizes``), or in quick mode
    the one size ``quick`` (default: the first of ``small``)."""
    choice = bench_sizes(device)
    if choice == "quick":
        return [small[0] if quick is None else quick]
    return full if choice == "full" else small


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


def skip_unless_timed(
    device: torch.device, provider: str, size, small: list, full: list, quick=None
) -> None:
    """Skip (with the reason) a row whose size is not timed on this device (``sizes_timed``) or whose
    provider is not timed here."""
    if size not in sizes_timed(device, small, full, quick):
        pytest.skip(f"size not in this device's grid ({SIZES_ENV}=small|full|quick)")
    reason = provider_skip_reason(provider, device)
    if reason:
        pytest.skip(reason)
