"""The pipeline's process runtime: the ``torchrun`` process group, the device, DDP-style gradient
averaging, bf16 autocast, and what rank 0 tells the user: the JSON-lines / TensorBoard log, progress
bars and one-line notices."""
from __future__ import annotations

import contextlib
import json
import os
import sys
from types import TracebackType
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist

from ..._dist import bucketed_mean
from ..._progress import progress_bar
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


# The TensorBoard step of each phase's records (other phases: the record's line number).
_TENSORBOARD_STEP = {"pretext": "epoch", "warmup": "epoch", "bissl": "stage", "lr_search": "trial", "finetune": "epoch",
                     "test": "seed"}
_LABELS = ("stage", "epoch", "trial", "seed")


def tensorboard_scalars(record: dict[str, Any], line: int) -> tuple[int, dict[str, float]]:
    """The TensorBoard step and ``{tag: value}`` of the log record on ``line``.

    Tags are ``<phase>[/<init>][/seed<k>]/<key>`` for every number of the record (fine-tuning runs
    of each initialization and seed apart; the test and search records step over seeds and trials),
    and ``bissl/cg_relative_residual_max``: the largest relative residual of a stage's CG solves.
    """
    step_key = _TENSORBOARD_STEP.get(record["phase"])
    tag = record["phase"] + (f"/{record['init']}" if "init" in record else "")
    if "seed" in record and step_key != "seed":
        tag += f"/seed{record['seed']}"
    scalars = {f"{tag}/{key}": float(value) for key, value in record.items()
               if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in _LABELS}
    if record.get("cg_relative_residuals"):
        scalars[f"{tag}/cg_relative_residual_max"] = float(max(record["cg_relative_residuals"]))
    return (line if step_key is None else int(record[step_key])), scalars


class Bar:
    """A stage's progress bar (or nothing); ``update(n, **postfix)`` advances it and shows ``postfix``; a context
    manager that closes it."""

    def __init__(self, bar: Any) -> None:
        self._bar = bar

    def update(self, n: int = 1, **postfix: float) -> None:
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(**{k: f"{v:.4f}" for k, v in postfix.items()})
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class RunLog:
    """What rank 0 writes and shows: JSON lines, TensorBoard scalars, progress bars, notices; other ranks nothing.

    A resumed run starts from the first ``lines`` lines of ``<out>/log.jsonl`` (those its checkpoint
    saw); the TensorBoard files are rebuilt from them.
    """

    def __init__(self, out: str, lines: int, tensorboard: bool, rank: int, progress: bool = False) -> None:
        self.path = os.path.join(out, "log.jsonl")
        self.rank = rank
        self.lines = lines
        self.progress = progress
        self.writer = None
        self._noted_tqdm = False
        if rank != 0:
            return
        kept: list[str] = []
        if os.path.exists(self.path):
            with open(self.path) as f:
                kept = f.readlines()[:lines]
            with open(self.path, "w") as f:
                f.writelines(kept)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # Event files are append-only: what a killed run logged after its checkpoint cannot be cut
            # from them as from log.jsonl, and the resumed run logs it again. So they are rebuilt from
            # the kept lines, and every record is in TensorBoard exactly once.
            folder = os.path.join(out, "tensorboard")
            if os.path.isdir(folder):
                for name in os.listdir(folder):
                    if name.startswith("events.out.tfevents."):
                        os.remove(os.path.join(folder, name))
            self.writer = SummaryWriter(folder)
            for line, text in enumerate(kept):
                self._add_scalars(json.loads(text), line)

    def _add_scalars(self, record: dict[str, Any], line: int) -> None:
        step, scalars = tensorboard_scalars(record, line)
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)

    def write(self, record: dict[str, Any]) -> None:
        self.lines += 1
        if self.rank != 0:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            self._add_scalars(record, self.lines - 1)

    def say(self, message: str) -> None:
        """One line on stderr (rank 0)."""
        if self.rank == 0:
            print(message, file=sys.stderr, flush=True)

    def bar(self, total: int, desc: str, unit: str, initial: int = 0) -> Bar:
        """A progress bar on rank 0 counting ``unit`` from ``initial`` (work a resumed run has done) to ``total``;
        none for work that is done already."""
        if self.rank != 0 or not self.progress or initial >= total:
            return Bar(None)
        bar = progress_bar(total, desc, True, initial=initial, unit=unit, note=not self._noted_tqdm)
        self._noted_tqdm = True
        return Bar(bar)

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


__all__ = ["Bar", "RunLog", "autocast", "average_gradients", "check_tensorboard", "process_group", "resolve_device", "rank_and_world", "tensorboard_scalars"]
