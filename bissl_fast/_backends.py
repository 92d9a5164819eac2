"""Which compute backends exist on this machine, and how ``backend="auto"`` picks one.

Nothing here runs at import time: availability is probed on first use and cached, so importing
``bissl_fast`` works without the C++ extension, without triton and without a GPU.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

#: ``torch``: plain PyTorch (every device); ``cpp``: the extension's CPU kernels; ``cuda``: the
#: extension's CUDA kernels; ``triton``: Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1).
BACKEND_NAMES = ("torch", "cpp", "triton", "cuda")


@dataclasses.dataclass(frozen=True)
class OpBackends:
    """The backends one op implements, and the order ``backend="auto"`` tries them per device type."""

    supported: tuple[str, ...]
    auto_order: Mapping[str, tuple[str, ...]]


#: One row per op. ``auto_order`` lists the fastest first, as measured in ``benchmarks/``; a device
#: type that is not listed gets ``torch``.
OP_BACKENDS: Mapping[str, OpBackends] = {
    "nt_xent": OpBackends(("torch", "triton"), {"cuda": ("triton", "torch"), "cpu": ("torch",)}),
    # The CUDA order awaits a GPU measurement in benchmarks/bench_byol.py.
    "byol": OpBackends(("torch", "cpp", "cuda", "triton"), {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")}),
    # cpp: one C++ call instead of ~6T small torch ops per CG iteration (benchmarks/bench_solver.py).
    "cg": OpBackends(("torch", "cpp", "cuda"), {"cuda": ("cuda", "torch"), "cpu": ("cpp", "torch")}),
    # cpp: the fused double backward is ~10-27x PyTorch's (benchmarks/bench_batch_norm.py). The CUDA
    # kernels have never run on a GPU, so auto keeps PyTorch's there until they are measured.
    "batch_norm": OpBackends(("torch", "cpp", "cuda"), {"cuda": ("torch",), "cpu": ("cpp", "torch")}),
}

_BUILD_FIX = (
    "build it with `pip install --no-build-isolation -e .` from the repository root "
    "(and without BISSL_FAST_SKIP_EXT=1)"
)
# The literal csrc/module.cpp compiles in (its build_info()): torch.__version__, _GLIBCXX_USE_CXX11_ABI and
# torch.version.cuda ("none" without the CUDA kernels) of the torch the library was compiled against.
_BUILD_INFO = re.compile(rb"bissl_fast build info: torch=([\w.+]+) cxx11_abi=([01]) cuda=([\w.]+);")


class BackendUnavailableError(RuntimeError):
    """Raised when a requested backend cannot run here; the message names the fix."""


def triton_interpret_mode() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _running_build() -> tuple[str, int, str]:
    """``(torch version, C++ ABI flag, CUDA version or "none")`` of the torch in this process."""
    return torch.__version__, int(torch._C._GLIBCXX_USE_CXX11_ABI), torch.version.cuda or "none"


def _rebuild_command(library: Path) -> str:
    """The command that rebuilds the extension at ``library`` against the running torch."""
    source = library.parent.parent
    if (source / "setup.py").is_file() and (source / "csrc").is_dir():  # built in place in a checkout
        return f"cd {source} && {sys.executable} setup.py build_ext --inplace"
    # pip rebuilds a local folder on every install; --no-deps leaves the running torch alone.
    return f"{sys.executable} -m pip install --no-build-isolation --no-deps <bissl_fast source folder>"


def build_mismatch(library: str | Path) -> str | None:
    """Why the extension file ``library`` cannot load into this process's torch, in one line naming the
    rebuild command, or None when it was compiled against this very torch (version, C++ ABI, CUDA).

    The record is read from the file, not from the loaded module: a library compiled against another
    torch can fail to load, or crash in its op registrations while loading, before it could be asked.
    """
    library = Path(library)
    # The compiler may keep more than one copy of the literal (build_info() copies it into a std::string).
    found = set(_BUILD_INFO.findall(library.read_bytes()))
    rebuild = f"rebuild it against this torch: `{_rebuild_command(library)}`"
    running = _running_build()
    if len(found) != 1:
        return f"{library} records no torch version (built before bissl_fast recorded one); {rebuild}"
    version, abi, cuda = (part.decode() for part in found.pop())
    built = (version, int(abi), cuda)
    if built[:2] == running[:2] and cuda in ("none", running[2]):
        return None

    def describe(build: tuple[str, int, str]) -> str:
        return f"torch {build[0]} (C++ ABI {build[1]}, CUDA {build[2]})"

    return f"bissl_fast._C was compiled against {describe(built)} but this is {describe(running)}; {rebuild}"


@functools.lru_cache(maxsize=None)
def _extension_mismatch() -> str | None:
    """:func:`build_mismatch` of the installed extension (None also when there is none)."""
    spec = importlib.util.find_spec("bissl_fast._C")
    if spec is None or spec.origin is None:
        return None
    return build_mismatch(spec.origin)


@functools.lru_cache(maxsize=None)
def _status(name: str) -> tuple[bool, str]:
    """``(available, why not)`` of one backend, probed on first use: resolving an op's backend
    loads only what its candidates need (triton alone adds ~50 MB to a process)."""
    if name == "torch":
        return True, ""
    if name == "cpp":
        mismatch = _extension_mismatch()
        if mismatch is not None:
            return False, mismatch
        try:
            importlib.import_module("bissl_fast._C")
        except ImportError as exc:
            return False, f"the C++ extension bissl_fast._C is not importable ({exc}); {_BUILD_FIX}"
        from ._alloc import sync_extension

        sync_extension()
        return True, ""
    if name == "triton":
        if not (torch.cuda.is_available() or triton_interpret_mode()):
            if importlib.util.find_spec("triton") is None:
                return False, "triton is not installed; `pip install triton`"
            return False, (
                "triton is installed but there is no CUDA GPU; set TRITON_INTERPRET=1 before "
                "importing triton to run the kernels on CPU tensors (slow, for testing)"
            )
        try:
            importlib.import_module("triton")
        except ImportError as exc:
            return False, f"triton is not importable ({exc}); `pip install triton`"
        return True, ""
    cpp_ok, cpp_why = _status("cpp")
    if not cpp_ok:
        return False, cpp_why
    if not importlib.import_module("bissl_fast._C").cuda_compiled():
        return False, (
            "bissl_fast._C was built without CUDA sources; rebuild on a machine with a CUDA build "
            "of torch and nvcc (or FORCE_CUDA=1): `pip install --no-build-isolation -e .`"
        )
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible to torch"
    return True, ""


def _probe() -> dict[str, tuple[bool, str]]:
    return {name: _status(name) for name in BACKEND_NAMES}


def backends() -> dict[str, bool]:
    """Availability of each backend on this machine, e.g. ``{"torch": True, "cpp": True, ...}``."""
    return {name: ok for name, (ok, _) in _probe().items()}


def backend_reasons() -> dict[str, str]:
    """For each unavailable backend, why it is missing and how to get it."""
    return {name: why for name, (ok, why) in _probe().items() if not ok}


def _runs_on(name: str, device: torch.device) -> bool:
    if name == "torch":
        return True
    if name == "cpp":
        return device.type == "cpu"
    if name == "cuda":
        return device.type == "cuda"
    return device.type == "cuda" or (device.type == "cpu" and triton_interpret_mode())


_RUN_HINTS = {
    "triton": " (set TRITON_INTERPRET=1 before importing triton to run it on CPU tensors)",
    "cpp": " (it is the CPU kernel; the extension's CUDA kernels are backend='cuda')",
}


def resolve_backend(requested: str, device: torch.device, op: str) -> str:
    """Pick the backend that runs ``op`` (a key of :data:`OP_BACKENDS`) on tensors of ``device``.

    ``"auto"`` takes the first backend of the op's order for ``device.type`` that is available and
    runs there, else ``"torch"``. An explicit request that cannot run raises
    :class:`BackendUnavailableError`; there is no silent fallback, nor one from an extension compiled
    against another torch (``auto`` raises then too, naming the rebuild command).
    """
    if requested != "auto" and requested not in BACKEND_NAMES:
        raise ValueError(f"backend must be 'auto' or one of {BACKEND_NAMES}, got {requested!r}")
    supported = OP_BACKENDS[op].supported
    if requested == "auto":
        for name in OP_BACKENDS[op].auto_order.get(device.type, ("torch",)):
            if name in ("cpp", "cuda") and _runs_on(name, device) and _extension_mismatch() is not None:
                raise BackendUnavailableError(_extension_mismatch())
            if _runs_on(name, device) and _status(name)[0]:
                return name
        return "torch"
    if requested not in supported:
        raise BackendUnavailableError(
            f"this op has no {requested!r} backend; it supports {tuple(supported)}"
        )
    available, why_not = _status(requested)
    if not available:
        raise BackendUnavailableError(f"backend {requested!r} is unavailable: {why_not}")
    if not _runs_on(requested, device):
        raise BackendUnavailableError(
            f"backend {requested!r} cannot run on {device.type} tensors{_RUN_HINTS.get(requested, '')}"
        )
    return requested


def extension():
    """The compiled ``bissl_fast._C`` module (its ops live under ``torch.ops.bissl_fast``)."""
    available, why_not = _status("cpp")
    if not available:
        raise BackendUnavailableError(why_not)
    return importlib.import_module("bissl_fast._C")
