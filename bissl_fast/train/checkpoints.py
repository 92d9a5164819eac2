"""Loading pretext checkpoints into a backbone or head, and writing checkpoints atomically.

:func:`load_weights` accepts a plain ``state_dict`` (torchvision, timm, the paper's backbone / head
files), PyTorch Lightning containers (lightly, solo-learn: ``{"state_dict": ...}``) and wrapped key
names (``module.`` of DDP, ``model.``, ``backbone.``, ``encoder.``, any nesting of them). It finds
where the module's tensors sit in the file: under which key prefix, and whether the keys name the
module's children by position, as lightly's usual ``nn.Sequential(*resnet.children()[:-1])`` backbone
does (``backbone.4.0.conv1.weight`` is ``layer1.0.conv1.weight``). The choice is deterministic: most
tensors that fit (name and shape), then names over positions, then the online network over a
momentum / target copy (BYOL, MoCo), then the shortest prefix; two equally good complete fits raise.
Classifier and pretext-head keys (:data:`HEAD_PREFIXES`) are left out and reported; anything else that
fits nothing, a missing tensor or a shape mismatch raises one ``ValueError`` line naming the layers
and their shapes. Nothing loads partially; :class:`LoadReport` lists what was loaded and ignored.
"""
from __future__ import annotations

import glob
import os
import pickle
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import nn

#: Containers that checkpoint libraries wrap a state dict in (Lightning, solo-learn, DINO-style, ...).
CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "module", "net", "network", "teacher", "student")
#: Key prefixes of what a checkpoint carries beside the backbone, left out by default: classifiers
#: (torchvision, timm), pretext heads (the paper's and solo-learn's ``projector`` / ``predictor``,
#: lightly's ``projection_head`` / ``prediction_head`` and their ``_momentum`` copies) and momentum /
#: target networks (solo-learn's ``momentum_*``, lightly's ``backbone_momentum``, MoCo's queue).
HEAD_PREFIXES = ("fc.", "head.", "heads.", "classifier.", "linear.", "projector.", "predictor.", "prototypes.",
                 "projection_head", "prediction_head", "backbone_momentum", "momentum_", "target_", "online_",
                 "queue")
#: Words of a prefix that names a momentum (EMA) copy of the network, which loses ties to the online one.
_MOMENTUM_WORDS = frozenset({"momentum", "target", "ema"})
#: Entries listed per kind of misfit in an error (the count says how many there are).
_LISTED = 3


@dataclass
class LoadReport:
    """What :func:`load_weights` did: ``prefix`` stripped from the checkpoint's keys, whether the keys
    named the module's children ``by_position``, the module keys ``loaded``, and the checkpoint keys
    ``ignored`` (heads and other networks matched by the ignore-list)."""

    prefix: str
    by_position: bool = False
    loaded: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def summary(self) -> str:
        layout = ", children by position" if self.by_position else ""
        groups = Counter(key.split(".")[0] for key in self.ignored)
        ignored = ", ".join(f"{name}.* ({count})" for name, count in sorted(groups.items()))
        return (f"loaded {len(self.loaded)} tensors (prefix {self.prefix!r}{layout}), "
                f"ignored {len(self.ignored)} checkpoint keys" + (f": {ignored}" if ignored else ""))


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


@dataclass
class _Layout:
    """One reading of the checkpoint: ``names`` maps module keys to the checkpoint keys under ``prefix``."""

    prefix: str
    by_position: bool
    names: dict[str, str]
    fits: int = 0  # module tensors found with their shape

    def rank(self) -> tuple[int, bool, bool, int, str]:
        """Sort key, best first (see the module docstring); the prefix itself last, so the order is total."""
        return -self.fits, self.by_position, _is_momentum_copy(self.prefix), len(self.prefix), self.prefix


def _is_momentum_copy(prefix: str) -> bool:
    return bool(_MOMENTUM_WORDS.intersection(prefix.replace(".", "_").split("_")))


def _prefix_candidates(keys: Sequence[str]) -> list[str]:
    found = {""}
    for key in keys:
        parts = key.split(".")
        for depth in range(1, min(len(parts), 4)):
            found.add(".".join(parts[:depth]) + ".")
    return sorted(found)


def _read_layout(keys: Sequence[str], prefix: str, children: Sequence[str] | None) -> dict[str, str]:
    """Module key -> checkpoint key for ``keys`` under ``prefix``; with ``children``, the first part
    of each key is a position among them (a ``Sequential`` built from the module's children)."""
    names: dict[str, str] = {}
    for key in keys:
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if children is not None:
            index, dot, rest = name.partition(".")
            if not (dot and index.isdigit() and int(index) < len(children)):
                continue
            name = f"{children[int(index)]}.{rest}"
        names.setdefault(name, key)
    return names


def _find_layout(state: Mapping[str, torch.Tensor], module: nn.Module, target: Mapping[str, torch.Tensor],
                 prefix: str | None) -> _Layout:
    """The best :class:`_Layout` of ``state`` for ``module`` (whose state dict is ``target``)."""
    keys = list(state)
    children = None if isinstance(module, nn.Sequential) else [name for name, _ in module.named_children()]
    layouts = []
    for candidate in _prefix_candidates(keys) if prefix is None else [prefix]:
        for by_position in (False, True) if children else (False,):
            names = _read_layout(keys, candidate, children if by_position else None)
            layout = _Layout(candidate, by_position, names)
            layout.fits = sum(1 for name, key in names.items()
                              if name in target and state[key].shape == target[name].shape)
            layouts.append(layout)
    layouts.sort(key=_Layout.rank)
    best = layouts[0]
    if len(layouts) > 1 and best.fits == len(target):
        runner_up = layouts[1]
        if runner_up.rank()[:3] == best.rank()[:3]:
            raise ValueError(f"checkpoint keys fit the module under both {best.prefix!r} and {runner_up.prefix!r}; "
                             "pass prefix=... to pick one")
    return best


def _listed(items: Sequence[str]) -> str:
    more = f", ... {len(items) - _LISTED} more" if len(items) > _LISTED else ""
    return "; ".join(items[:_LISTED]) + more


def _misfit_message(module: nn.Module, target: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
                    layout: _Layout, unused: Sequence[str]) -> str:
    """One line naming the layers that do not fit, with their shapes, and what to do about it."""
    kind = type(module).__name__
    reshaped = [f"{layout.names[n]} {tuple(state[layout.names[n]].shape)} vs the module's {n} {tuple(t.shape)}"
                for n, t in target.items() if n in layout.names and state[layout.names[n]].shape != t.shape]
    missing = [f"{n} {tuple(t.shape)}" for n, t in target.items() if n not in layout.names]
    parts = []
    if reshaped:
        parts.append(f"{len(reshaped)} tensors differ in shape ({_listed(reshaped)})")
    if missing:
        parts.append(f"{len(missing)} of the {kind}'s {len(target)} tensors are not in it ({_listed(missing)})")
    if unused:
        parts.append(f"{len(unused)} checkpoint tensors fit nothing "
                     f"({_listed([f'{k} {tuple(state[k].shape)}' for k in unused])})")
    where = f"read under prefix {layout.prefix!r}" + (", children by position" if layout.by_position else "")
    message = f"checkpoint does not fit the {kind} ({where}): " + ", ".join(parts)
    if layout.fits == 0:
        return message + f"; no tensor fits: checkpoint keys start {list(state)[:3]}, the module's {list(target)[:3]}"
    top_level = {name.split(".")[0] for name in target}
    own_names = any(k[len(layout.prefix):].split(".")[0] in top_level for k in unused if k.startswith(layout.prefix))
    if reshaped or missing or own_names:
        return message + "; it holds another architecture or width than this backbone"
    return message + ("; if they belong to a head or another network, add their key prefixes to ignore=... "
                      "(bissl-fast run: --pretext-checkpoint-ignore)")


def load_weights(
    module: nn.Module,
    source: str | os.PathLike | Mapping[str, Any],
    *,
    prefix: str | None = None,
    ignore: Sequence[str] = HEAD_PREFIXES,
) -> LoadReport:
    """Load ``source`` into ``module`` in full, or raise one ``ValueError`` line without changing it.

    Args:
        module: the backbone (or head) to fill; every one of its state-dict entries must be found,
            with its shape.
        source: a checkpoint path or a mapping (see :func:`read_checkpoint`).
        prefix: the key prefix to strip (e.g. ``"backbone."``); found automatically when ``None``
            (see the module docstring).
        ignore: key prefixes of checkpoint entries to leave out (reported in ``LoadReport.ignored``),
            matched against each key with and without the found ``prefix``; default
            :data:`HEAD_PREFIXES`. Any other entry that fits nothing raises.
    """
    state = read_checkpoint(source)
    target = module.state_dict()
    layout = _find_layout(state, module, target, prefix)
    mapped = {name: state[key] for name, key in layout.names.items() if name in target}
    used = {layout.names[name] for name in mapped}
    ignore = tuple(ignore)
    start = len(layout.prefix)
    left_over = [k for k in state if k not in used]
    ignored = [k for k in left_over if k.startswith(ignore) or (k.startswith(layout.prefix) and k[start:].startswith(ignore))]
    ignored_keys = set(ignored)
    unused = [k for k in left_over if k not in ignored_keys]
    if layout.fits != len(target) or unused:
        raise ValueError(_misfit_message(module, target, state, layout, unused))
    module.load_state_dict(mapped, strict=True)
    return LoadReport(prefix=layout.prefix, by_position=layout.by_position, loaded=list(mapped), ignored=ignored)


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
