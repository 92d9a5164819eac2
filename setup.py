"""Build of bissl_fast and its C++/CUDA extension bissl_fast._C.

- Always builds the C++ extension from csrc/ (CPU kernels + shared host/device math headers).
- Adds every csrc/cuda/*.cpp and *.cu when torch is a CUDA build and a CUDA toolkit is found, or when
  FORCE_CUDA=1 (a machine without a GPU). TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0" when no GPU is visible.
- The toolkit is CUDA_HOME when set; otherwise the folder of the real nvcc, also when the `nvcc` on PATH is a
  wrapper script (torch would guess the wrapper's parent folder and miss cuda_runtime.h).
- BISSL_FAST_SKIP_EXT=1 gives a pure-Python install.
- No debug info (-g0): the extension is a few hundred KB instead of 15 MB; nvcc keeps -lineinfo for profilers.

The extension compiles against the torch you run, so install with ``pip install --no-build-isolation .``
(``-e`` for development). Under pip's default build isolation torch is absent and the build stops with a
one-line message saying so, instead of compiling against a different torch (a silent ABI mismatch at import).
Every failure of this script is one line: ``bissl_fast build: <what is wrong and the fix>``.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# The oldest supported torch (pyproject.toml's dependencies: torch>=TORCH_MIN, no upper bound) and the newest
# minor release the test scripts run (scripts/test_torch_range.sh); a newer torch builds with a warning.
TORCH_MIN = (2, 11)
TORCH_NEWEST_TESTED = (2, 14)


def _fail(message: str) -> None:
    sys.exit(f"bissl_fast build: {message}")


def _dotted(version: tuple[int, int]) -> str:
    return ".".join(map(str, version))


def _check_torch_version(version: str) -> None:
    """Refuse a torch older than TORCH_MIN; warn (one line) for one newer than the newest tested minor release."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        _fail(f"cannot read torch's version {version!r}; reinstall torch>={_dotted(TORCH_MIN)}")
    minor = (int(match.group(1)), int(match.group(2)))
    if minor < TORCH_MIN:
        _fail(f"torch {version} is older than the oldest supported {_dotted(TORCH_MIN)}; "
              f"install torch>={_dotted(TORCH_MIN)}, then `pip install --no-build-isolation .`")
    if minor > TORCH_NEWEST_TESTED:
        print(f"bissl_fast build: warning: torch {version} is newer than the tested range "
              f"{_dotted(TORCH_MIN)}-{_dotted(TORCH_NEWEST_TESTED)}; building against it anyway", file=sys.stderr)


def _rel(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _check_unique_stems(sources: list[str]) -> None:
    """Two sources in one folder with one stem (x.cpp, x.cu) would compile to the same x.o (ninja fails late)."""
    seen: dict[str, str] = {}
    for source in sources:
        key = os.path.splitext(source)[0]
        if key in seen:
            _fail(f"{seen[key]} and {source} compile to the same object {key}.o; rename one "
                  "(CUDA: torch glue csrc/cuda/<op>_cuda.cpp, kernels csrc/cuda/<op>_cuda_kernels.cu)")
        seen[key] = source


def _is_toolkit(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "include", "cuda_runtime.h"))


def _find_cuda_home() -> str | None:
    """The CUDA toolkit folder, or None when there is no nvcc (nor /usr/local/cuda)."""
    configured = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if configured:
        if not _is_toolkit(configured):
            _fail(f"CUDA_HOME={configured} has no include/cuda_runtime.h; point it at the CUDA toolkit folder")
        return configured
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return "/usr/local/cuda" if _is_toolkit("/usr/local/cuda") else None
    beside = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if _is_toolkit(beside):
        return beside
    # A wrapper script that execs the real nvcc: nvcc's dry run names the folder it runs from.
    dry_run = subprocess.run([nvcc, "--dryrun", "-c", "probe.cu", "-o", os.devnull],
                             capture_output=True, text=True, check=False)
    here = re.search(r"^#\$ _HERE_=(.+)$", dry_run.stdout + dry_run.stderr, re.MULTILINE)
    if here and _is_toolkit(os.path.dirname(here.group(1).strip())):
        return os.path.dirname(here.group(1).strip())
    _fail(f"found {nvcc} but no CUDA toolkit around it (no include/cuda_runtime.h); "
          "set CUDA_HOME to the toolkit folder")
    return None


def _check_wheel_support() -> None:
    """setuptools < 70.1 builds wheels only with the `wheel` package, which --no-build-isolation does not install."""
    import setuptools

    wheel_commands = {"bdist_wheel", "dist_info", "editable_wheel"}
    if not wheel_commands.intersection(sys.argv[1:]):
        return
    version = tuple(int(part) for part in re.findall(r"\d+", setuptools.__version__)[:2])
    if version < (70, 1):
        try:
            import wheel  # noqa: F401
        except ImportError:
            _fail(f"setuptools {setuptools.__version__} needs the `wheel` package to build a wheel: "
                  "`pip install wheel` (or setuptools>=70.1), then install again")


def _extensions():
    if os.environ.get("BISSL_FAST_SKIP_EXT", "0") == "1":
        return [], {}
    sources = _rel("csrc/*.cpp") + _rel("csrc/cpu/*.cpp")
    cuda_sources = _rel("csrc/cuda/*.cpp") + _rel("csrc/cuda/*.cu")
    _check_unique_stems(sources + cuda_sources)
    try:
        import torch
    except ImportError:
        if any("pip-build-env-" in path for path in sys.path):
            _fail("pip's build isolation hides torch, and the extension must compile against the torch you run: "
                  f"install torch>={_dotted(TORCH_MIN)}, then `pip install --no-build-isolation .` "
                  "(BISSL_FAST_SKIP_EXT=1: pure Python)")
        _fail(f"torch is not installed; install torch>={_dotted(TORCH_MIN)} first, then "
              "`pip install --no-build-isolation .` (BISSL_FAST_SKIP_EXT=1: pure Python)")

    _check_torch_version(torch.__version__)

    force_cuda = os.environ.get("FORCE_CUDA", "0") == "1"
    cuda_home = _find_cuda_home() if (force_cuda or torch.version.cuda is not None) else None
    with_cuda = force_cuda or (torch.version.cuda is not None and cuda_home is not None)
    if with_cuda:
        if torch.version.cuda is None:
            _fail(f"FORCE_CUDA=1 needs a CUDA build of torch, this torch {torch.__version__} is CPU-only")
        if cuda_home is None:
            _fail("FORCE_CUDA=1 but no CUDA toolkit found: put nvcc on PATH or set CUDA_HOME")
        # torch.utils.cpp_extension reads CUDA_HOME once, when it is first imported (below).
        os.environ["CUDA_HOME"] = cuda_home
        if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    # The torch this build compiles against, recorded in the library (csrc/module.cpp) and compared with the
    # running torch when bissl_fast first loads it. Bare tokens, stringified in C++: a quoted value would
    # not survive the shell that ninja runs each compile command in.
    if not re.fullmatch(r"[\w.+]+", torch.__version__):
        _fail(f"torch's version {torch.__version__!r} has characters the build cannot record; reinstall torch")
    build_info = [("BISSL_FAST_TORCH_VERSION", torch.__version__),
                  ("BISSL_FAST_TORCH_CUDA", torch.version.cuda if with_cuda else "none")]
    # Headers are not sources: listing them makes build_ext rebuild when only a header changed.
    depends = _rel("csrc/*.h") + _rel("csrc/include/bissl_fast/*.h")
    # Python's own CFLAGS carry -g; -g0 after them drops the debug info.
    cxx_flags = ["-O3", "-std=c++20", "-g0"]
    if not with_cuda:
        ext = CppExtension("bissl_fast._C", sources, include_dirs=include_dirs, depends=depends,
                           define_macros=build_info, extra_compile_args={"cxx": cxx_flags})
        return [ext], {"build_ext": BuildExtension}
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "(torch default)")
    print(f"bissl_fast build: CUDA kernels for TORCH_CUDA_ARCH_LIST={arch_list}, toolkit {cuda_home}", file=sys.stderr)
    ext = CUDAExtension(
        "bissl_fast._C",
        sources + cuda_sources,
        include_dirs=include_dirs,
        depends=depends,
        define_macros=[("BISSL_FAST_WITH_CUDA", "1"), *build_info],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]},
    )
    return [ext], {"build_ext": BuildExtension}


_check_wheel_support()
ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
