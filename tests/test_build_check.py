"""The extension records the torch it was compiled against, and bissl_fast refuses to load it into another one."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bissl_fast._backends import backend_reasons, backends, build_mismatch, extension

needs_cpp = pytest.mark.skipif(not backends()["cpp"], reason=backend_reasons().get("cpp", ""))
RECORD = re.compile(r"bissl_fast build info: torch=([\w.+]+) cxx11_abi=([01]) cuda=([\w.]+);")
RUNNING_ABI = int(torch._C._GLIBCXX_USE_CXX11_ABI)
RUNNING_CUDA = torch.version.cuda or "none"


def _library(folder: Path, record: str) -> Path:
    """A stand-in for the compiled library: bytes around the one record the build compiles in."""
    library = folder / "bissl_fast" / "_C.cpython-311-x86_64-linux-gnu.so"
    library.parent.mkdir(parents=True, exist_ok=True)
    library.write_bytes(b"\x7fELF\x00" + record.encode() + b"\x00other strings\x00")
    return library


@needs_cpp
def test_extension_records_the_torch_it_runs_with():
    ext = extension()
    record = RECORD.fullmatch(ext.build_info())
    assert record is not None, ext.build_info()
    cuda = torch.version.cuda if ext.cuda_compiled() else "none"
    assert record.groups() == (torch.__version__, str(RUNNING_ABI), cuda)
    # The copy read from the file before loading is the same literal.
    assert set(RECORD.findall(Path(ext.__file__).read_bytes().decode("latin-1"))) == {record.groups()}
    assert build_mismatch(ext.__file__) is None


@pytest.mark.parametrize("cuda", ["none", RUNNING_CUDA])
def test_same_torch_loads(tmp_path, cuda):
    library = _library(tmp_path, f"bissl_fast build info: torch={torch.__version__} cxx11_abi={RUNNING_ABI} "
                                 f"cuda={cuda};")
    assert build_mismatch(library) is None


@pytest.mark.parametrize("version, abi, cuda", [
    ("2.99.0+cu130", RUNNING_ABI, "none"),   # another torch release
    (torch.__version__, 1 - RUNNING_ABI, "none"),   # another C++ ABI
    (torch.__version__, RUNNING_ABI, "99.9"),   # CUDA kernels built for another CUDA
])
def test_other_torch_is_one_line_naming_the_rebuild(tmp_path, version, abi, cuda):
    library = _library(tmp_path, f"bissl_fast build info: torch={version} cxx11_abi={abi} cuda={cuda};")
    message = build_mismatch(library)
    assert message == (
        f"bissl_fast._C was compiled against torch {version} (C++ ABI {abi}, CUDA {cuda}) but this is torch "
        f"{torch.__version__} (C++ ABI {RUNNING_ABI}, CUDA {RUNNING_CUDA}); rebuild it against this torch: "
        f"`{sys.executable} -m pip install --no-build-isolation --no-deps <bissl_fast source folder>`"
    )


def test_library_built_in_a_checkout_names_the_in_place_rebuild(tmp_path):
    (tmp_path / "setup.py").write_text("")
    (tmp_path / "csrc").mkdir()
    library = _library(tmp_path, f"bissl_fast build info: torch=2.99.0 cxx11_abi={RUNNING_ABI} cuda=none;")
    message = build_mismatch(library)
    assert "\n" not in message
    assert message.endswith(f"rebuild it against this torch: `cd {tmp_path} && {sys.executable} setup.py build_ext "
                            "--inplace`"), message


def test_library_without_a_record_is_refused(tmp_path):
    library = _library(tmp_path, "no record here")
    message = build_mismatch(library)
    assert "\n" not in message
    assert message.startswith(f"{library} records no torch version (built before bissl_fast recorded one); "
                              "rebuild it against this torch: `"), message


_UPGRADED_TORCH = """
import sys
import torch

built = torch.__version__
torch.__version__ = "2.99.0"  # as if torch had been upgraded after the build
import bissl_fast
from bissl_fast import BackendUnavailableError, byol_loss, nt_xent

expected = f"bissl_fast._C was compiled against torch {built} "
assert not bissl_fast.backends()["cpp"] and not bissl_fast.backends()["cuda"]
assert bissl_fast.backend_reasons()["cpp"].startswith(expected), bissl_fast.backend_reasons()["cpp"]
ps = [torch.randn(4, 3) for _ in range(4)]
for backend in ("auto", "cpp"):
    try:
        byol_loss(*ps, backend=backend)
    except BackendUnavailableError as exc:
        assert expected in str(exc) and "\\n" not in str(exc), str(exc)
    else:
        raise AssertionError(f"backend={backend!r} ran an extension compiled against another torch")
assert "bissl_fast._C" not in sys.modules, "the mismatched library was loaded"
nt_xent(torch.randn(6, 3), temperature=0.5)  # paths without the extension still run
"""


@needs_cpp
def test_upgraded_torch_stops_every_extension_path_before_loading_it():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", _UPGRADED_TORCH], check=True, timeout=120, env=env)
