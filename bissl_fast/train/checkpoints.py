"""Loading pretext checkpoints into a backbone or head, and writing checkpoints atomically.

:func:`load_weights` accepts a plain ``state_dict``, the paper's own backbone / head files
(``torch.save(model.backbone.state_dict())``; heads keyed ``projector.*`` / ``predictor.*``),
PyTorch Lightning containers (lightly, solo-learn: ``{"state_dict": ...}``) and wrapped key names
(``module.``, ``model.``, ``backbone.``, ``encoder.``, any nesting of them). The key prefix is
found as the one under which most keys fit the module. Nothing loads partially: a missing key, a
shape mismatch, or an unexpected key that the caller did not allow raises one ``ValueError``
line; :class:`LoadReport` lists what was loaded and what was ignored.
"""
from __future__ import annotations

import glob
import os
import pickle
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import nn

#: Containers that checkpoint libraries wrap a state dict in (Lightning, solo-learn, DINO-style, ...).
CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "module", "net", "network", "teacher", "student")
#: Keys of the classifier / projection heads that a pretext checkpoint may carry beside the backbone.
HEAD_PREFIXES = ("fc.", "head.", "heads.", "classifier.", "projector.", "predictor.", "prototypes.",
                 "momentum_", "target_", "online_", "queue", "linear.")


@dataclass
class LoadReport:
    """What :func:`load_weights` did: ``prefix`` stripped from the checkpoint's keys, the module
    keys ``loaded``, and checkpoint keys ``ignored`` (allowed extras: heads, other modules)."""

    prefix: str
    loaded: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return f"loaded {len(self.loaded)} tensors (prefix {self.prefix!r}), ignored {len(self.ignored)} checkpoint keys"


def _unpickling_error(path: str, message: str) -> str:
    """One line for a refusal of torch's weights-only unpickler, from its long message (ANSI codes removed)."""
    plain = re.sub(r"\x1b\[[0-9;]*m", "", message)
    code = re.search(r"unsupported (?:global: )?GLOBAL [\w.]+", plain, re.IGNORECASE)
    if code:
        return (f"checkpoint {path!r} holds more than tensors ({code.group(0)}), and a weights-only load runs no code "
                "from a file; if you trust it, load it with torch.load(weights_only=False) and save its state dict")
    found = re.search(r"unsupported operand \d+", plain, re.IGNORECASE)
    reason = found.group(0) if found else plain.strip().splitlines()[0]
    return f"checkpoint {path!r} is not a file torch.save wrote, or is damaged (torch.load(weights_only=True): {reason})"


def load_file(path: str | os.PathLike) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``: no code from the file runs.

    Raises one line: ``FileNotFoundError`` for a missing path, ``IsADirectoryError`` for a folder,
    ``ValueError`` for an empty or damaged file, a file ``torch.save`` did not write, or one that holds
    objects besides tensors and plain containers (only a trusted ``weights_only=False`` load builds those).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"checkpoint {path!r} is a directory; give the checkpoint file inside it")
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if os.path.getsize(path) == 0:
        raise ValueError(f"checkpoint {path!r} is empty (0 bytes)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(_unpickling_error(path, str(exc))) from exc
    except Exception as exc:
        detail = " ".join(str(exc).split()) or "the file ends early"
        raise ValueError(f"cannot read checkpoint {path!r} with torch.load(weights_only=True): {type(exc).__name__}: "
                         f"{detail}") from exc


def read_checkpoint(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` from a file (read by :func:`load_file`) or mapping, unwrapping known containers."""
    state: Any = source if isinstance(source, Mapping) else load_file(source)
    for _ in range(3):
        if not isinstance(state, Mapping):
            break
        if state and all(isinstance(v, torch.Tensor) for v in state.values()):
            return dict(state)
        inner = next((state[k] for k in CONTAINER_KEYS if isinstance(state.get(k), Mapping)), None)
        if inner is None:
            break
        state = inner
    if isinstance(state, Mapping):
        tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise ValueError("checkpoint holds no state dict of tensors (looked inside " + ", ".join(CONTAINER_KEYS) + ")")


def _prefix_candidates(keys: Sequence[str]) -> set[str]:
    found = {""}
    for key in keys:
        parts = key.split(".")
        for depth in range(1, min(len(parts), 4)):
            found.add(".".join(parts[:depth]) + ".")
    return found


def _best_prefix(keys: Sequence[str], wanted: set[str]) -> str:
    """The prefix under which most keys name an entry of ``wanted`` (shortest on ties; two complete fits raise)."""
    def score(prefix: str) -> tuple[int, int]:
        hits = sum(1 for k in keys if k.startswith(prefix) and k[len(prefix):] in wanted)
        return hits, -len(prefix)

    ranked = sorted(_prefix_candidates(keys), key=score, reverse=True)
    if len(ranked) > 1 and score(ranked[0]) == score(ranked[1]) and score(ranked[0])[0] == len(wanted):
        raise ValueError(f"checkpoint keys fit the module under both {ranked[0]!r} and {ranked[1]!r}; pass prefix=...")
    return ranked[0]


def load_weights(
    module: nn.Module,
    source: str | os.PathLike | Mapping[str, Any],
    *,
    prefix: str | None = None,
    allow_unexpected: Sequence[str] = (),
) -> LoadReport:
    """Load ``source`` into ``module`` in full, or raise without changing it.

    Args:
        module: the backbone (or head) to fill; every one of its state-dict entries must be found.
        source: a checkpoint path or a mapping (see :func:`read_checkpoint`).
        prefix: the key prefix to strip (e.g. ``"backbone."``); found automatically when ``None``.
        allow_unexpected: key prefixes of checkpoint entries that may be left out (e.g.
            :data:`HEAD_PREFIXES`), matched against the key with and without ``prefix``. Any other
            unused key raises.
    """
    state = read_checkpoint(source)
    target = module.state_dict()
    if prefix is None:
        prefix = _best_prefix(list(state), set(target))
    mapped = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and k[len(prefix):] in target}
    missing = [k for k in target if k not in mapped]
    if missing:
        raise ValueError(
            f"checkpoint does not fit the {type(module).__name__}: {len(missing)} of {len(target)} keys missing "
            f"after stripping prefix {prefix!r} (first: {missing[0]!r}; checkpoint keys start {list(state)[:3]})"
        )
    for key, value in mapped.items():
        if tuple(value.shape) != tuple(target[key].shape):
            raise ValueError(
                f"checkpoint does not fit the {type(module).__name__}: {prefix + key!r} has shape {tuple(value.shape)}, "
                f"the module {tuple(target[key].shape)}"
            )
    used = {prefix + k for k in mapped}
    ignored = [k for k in state if k not in used]
    allowed = tuple(allow_unexpected)
    rejected = [k for k in ignored if not (k.startswith(allowed) or (k.startswith(prefix) and k[len(prefix):].startswith(allowed)))]
    if rejected:
        raise ValueError(
            f"checkpoint has {len(rejected)} keys that fit nothing in the {type(module).__name__} (first: {rejected[0]!r}); "
            "pass allow_unexpected=(<prefixes>) to ignore them"
        )
    module.load_state_dict(mapped, strict=True)
    return LoadReport(prefix=prefix, loaded=list(mapped), ignored=ignored)


def _temporary(path: str, pid: int) -> str:
    return f"{path}.tmp-{pid}"


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` through a temporary file and ``os.replace``: a kill mid-write leaves the old file
    (and the temporary ``<path>.tmp-<pid>``, which :func:`remove_stale_temporaries` clears)."""
    path = os.fspath(path)
    tmp = _temporary(path, os.getpid())
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a live process of another user
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[tuple[str, int]]:
    """Delete the ``<path>.tmp-<pid>`` files that :func:`save_atomic` left when killed mid-write.

    Only names of exactly that form, and only when process ``pid`` is gone on this machine: a
    process still writing keeps its file. Returns ``(file, bytes)`` of each file removed.
    """
    path = os.fspath(path)
    removed = []
    for tmp in glob.glob(glob.escape(path) + ".tmp-*"):
        pid = tmp[len(path) + len(".tmp-"):]
        if not pid.isdigit() or tmp != _temporary(path, int(pid)) or _process_alive(int(pid)):
            continue
        size = os.path.getsize(tmp)
        os.remove(tmp)
        removed.append((tmp, size))
    return removed


__all__ = ["CONTAINER_KEYS", "HEAD_PREFIXES", "LoadReport", "load_file", "load_weights", "read_checkpoint",
           "remove_stale_temporaries", "save_atomic"]
