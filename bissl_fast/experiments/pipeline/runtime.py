"""The pipeline's process runtime: the ``torchrun`` process group, the device, DDP-style gradient
averaging, bf16 autocast, and the JSON-lines / TensorBoard log written by rank 0."""
from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist

from ..._dist import bucketed_mean
from .config import PipelineConfig


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """Join the ``torchrun`` group (gloo on CPU, NCCL on CUDA) when launched with ``WORLD_SIZE > 1``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        yield
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device cuda was requested but torch sees no CUDA device")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


def average_gradients(params: Sequence[torch.Tensor]) -> None:
    """What DDP does to gradients: one bucketed rank-mean (nothing on a single process)."""
    with_grad = [p for p in params if p.grad is not None]
    for p, g in zip(with_grad, bucketed_mean([p.grad for p in with_grad])):
        p.grad = g


class RunLog:
    """JSON lines (and optional TensorBoard scalars) on rank 0; other ranks write nothing."""

    def __init__(self, out: str, lines: int, tensorboard: bool, rank: int) -> None:
        self.path = os.path.join(out, "log.jsonl")
        self.rank = rank
        self.lines = lines
        self.writer = None
        if rank != 0:
            return
        # Drop lines written after the checkpoint a resumed run starts from.
        if os.path.exists(self.path):
            with open(self.path) as f:
                kept = f.readlines()[:lines]
            with open(self.path, "w") as f:
                f.writelines(kept)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(out, "tensorboard"))

    def write(self, record: dict[str, Any], step: int | None = None) -> None:
        self.lines += 1
        if self.rank != 0:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None and step is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "stage", "epoch"):
                    self.writer.add_scalar(f"{record['phase']}/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def check_tensorboard() -> None:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise ImportError("tensorboard=True needs the tensorboard package: pip install tensorboard") from None


def autocast(cfg: PipelineConfig) -> contextlib.AbstractContextManager:
    return torch.autocast("cuda", dtype=torch.bfloat16) if cfg.bf16 else contextlib.nullcontext()


__all__ = ["RunLog", "autocast", "average_gradients", "check_tensorboard", "process_group", "resolve_device", "rank_and_world"]
