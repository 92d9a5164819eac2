"""Helpers for benchmark suites (import as ``from bench_utils import ...``)."""
from __future__ import annotations

import os

import torch


def bench_sizes_full(device: torch.device) -> bool:
    """Full size grid on CUDA; the small grid on CPU. BISSL_BENCH_SIZES=small|full overrides."""
    choice = os.environ.get("BISSL_BENCH_SIZES", "auto")
    if choice == "auto":
        return device.type == "cuda"
    return choice == "full"
