"""Checkpointable data positions and RNG states, so a resumed run continues bit-identically.

:class:`BatchStream` turns any iterable of batches into an endless stream whose position can be
saved and restored; :func:`rng_state` / :func:`set_rng_state` capture every global generator
(torch, CUDA, Python, NumPy) that augmentations or samplers draw from.
"""
from __future__ import annotations

import random
from typing import Any, Iterable, Iterator

import numpy as np
import torch


def _loader_generators(loader: Any) -> list[torch.Generator]:
    found = []
    for owner in (loader, getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        gen = getattr(owner, "generator", None)
        if isinstance(gen, torch.Generator) and all(gen is not g for g in found):
            found.append(gen)
    return found


def _epoch_setters(loader: Any) -> list[Any]:
    """The ``set_epoch`` methods of a loader's sampler and batch sampler (e.g. ``DistributedSampler``)."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    owners = (loader, getattr(loader, "sampler", None), batch_sampler, getattr(batch_sampler, "sampler", None))
    setters, seen = [], []
    for owner in owners:
        setter = getattr(owner, "set_epoch", None)
        if owner is not None and callable(setter) and all(owner is not s for s in seen):
            seen.append(owner)
            setters.append(setter)
    return setters


class BatchStream:
    """Endless batches from a loader, with a checkpointable position.

    Loaders with ``state_dict``/``load_state_dict`` (e.g. :class:`bissl_fast.data.tensors.TensorLoader`)
    save their own position. For any other iterable (e.g. ``torch.utils.data.DataLoader``) the
    stream records torch's global RNG state and the loader's generators at the moment the current
    pass started (a shuffling sampler and worker seeds draw from them in ``iter()``) plus the
    number of batches consumed; resuming replays that ``iter()`` and skips the consumed batches.

    Every new pass over a non-stateful loader first calls ``set_epoch(pass_index)`` on its
    sampler and batch sampler when they have one, so a ``DistributedSampler`` reshuffles per pass
    as in a hand-written epoch loop.
    """

    def __init__(self, loader: Iterable[Any], name: str) -> None:
        if not isinstance(loader, Iterable):
            raise TypeError(f"{name} must be an iterable of batches, got {type(loader).__name__}")
        self.loader, self.name = loader, name
        self.stateful = callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None))
        self._it: Iterator[Any] | None = None
        self._pass_rng: dict[str, Any] | None = None
        self.consumed = 0
        #: Index of the current (or next, between passes) pass over a non-stateful loader.
        self.epoch = 0

    def _begin_iteration(self) -> None:
        for set_epoch in _epoch_setters(self.loader):
            set_epoch(self.epoch)
        self._it = iter(self.loader)

    def _start_pass(self) -> None:
        if self.stateful:
            self._it = iter(self.loader)
            return
        self._pass_rng = {
            "torch": torch.get_rng_state(),
            "generators": [g.get_state() for g in _loader_generators(self.loader)],
        }
        self.consumed = 0
        self._begin_iteration()

    def next(self) -> Any:
        """The next batch, starting a new pass when the current one ends."""
        for _ in range(2):
            if self._it is None:
                self._start_pass()
            try:
                batch = next(self._it)  # type: ignore[arg-type]
            except StopIteration:
                self._it = None
                if not self.stateful:
                    self.epoch += 1
                continue
            self.consumed += 1
            return batch
        raise ValueError(f"{self.name} yielded no batches")

    def state_dict(self) -> dict[str, Any]:
        if self.stateful:
            return {"loader": self.loader.state_dict()}  # type: ignore[attr-defined]
        return {"active": self._it is not None, "pass_rng": self._pass_rng, "consumed": self.consumed, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._it = None
        if self.stateful:
            self.loader.load_state_dict(state["loader"])  # type: ignore[attr-defined]
            return
        self.consumed = 0
        self.epoch = int(state.get("epoch", 0))
        if not state["active"]:
            return
        # Replay the interrupted pass: same RNG at iter() time, then skip what was consumed.
        # The caller restores the global RNG state after this, so the replay leaves no trace.
        self._pass_rng = state["pass_rng"]
        torch.set_rng_state(self._pass_rng["torch"])
        gens = _loader_generators(self.loader)
        if len(gens) != len(self._pass_rng["generators"]):
            raise ValueError(f"{self.name} has {len(gens)} generators, the checkpoint {len(self._pass_rng['generators'])}")
        for g, s in zip(gens, self._pass_rng["generators"]):
            g.set_state(s)
        self._begin_iteration()
        for i in range(int(state["consumed"])):
            try:
                next(self._it)  # type: ignore[arg-type]
            except StopIteration as exc:
                raise ValueError(f"{self.name} ended after {i} batches while resuming at batch {state['consumed']}") from exc
        self.consumed = int(state["consumed"])


def rng_state() -> dict[str, Any]:
    """The global generators' states: torch (CPU, and CUDA when initialized), Python, NumPy.

    Only tensors, numbers, strings and tuples, so a checkpoint holding it loads with
    ``torch.load(..., weights_only=True)``.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore a :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((kind, keys.astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


__all__ = ["BatchStream", "rng_state", "set_rng_state"]
