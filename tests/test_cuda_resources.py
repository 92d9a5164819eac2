"""scripts/cuda_resources.py: the CUDA kernels' resource report and its checks (no GPU, no nvcc needed).

``scripts/test.sh`` runs the script itself wherever nvcc is installed (CI); here its parsing of ptxas'
report, the PTX launch bounds and the launch sites, and each of its failure checks, are tested on
fixed text.
"""
from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "scripts" / "cuda_resources.py"
_spec = importlib.util.spec_from_file_location("cuda_resources", _PATH)
cuda_resources = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = cuda_resources  # dataclasses look their module up there
_spec.loader.exec_module(cuda_resources)

PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'
ptxas info    : Function properties for _Z3fooPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 2049 bytes smem
ptxas info    : Compiling entry function '_Z3barPd' for 'sm_90'
ptxas info    : Function properties for _Z3barPd
    24 bytes stack frame, 16 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers
"""

PTX = """\
.visible .entry _Z3fooPf(
\t.param .u64 _Z3fooPf_param_0
)
.maxntid 256, 1, 1
{
\tret;
}
.visible .entry _Z3barPd(
\t.param .u64 _Z3barPd_param_0
)
{
\tret;
}
"""

SOURCE = """\
constexpr int kWarp = 32;
constexpr int kRows = 8;
constexpr int kThreads = kWarp * kRows;
constexpr int kVec = 16 / sizeof(S);
void launch() {
  foo_kernel<S><<<grid_for(B), kThreads, 0, stream>>>(x);
  bar_kernel<<<static_cast<unsigned>(c), 512, 0, stream>>>(y);
}
"""


def test_parses_ptxas_report():
    stats = cuda_resources.parse_ptxas(PTXAS_LOG)
    assert stats["_Z3fooPf"] == {"registers": 40, "smem": 2049, "stack": 0, "spill_stores": 0, "spill_loads": 0}
    assert stats["_Z3barPd"] == {"registers": 255, "smem": 0, "stack": 24, "spill_stores": 16, "spill_loads": 8}


def test_parses_launch_bounds_and_launch_sites():
    assert cuda_resources.parse_maxntid(PTX) == {"_Z3fooPf": 256}
    assert cuda_resources.launch_blocks(SOURCE) == {"foo_kernel": {256}, "bar_kernel": {512}}
    assert cuda_resources.int_expr("16 / sizeof(S)", {}) is None


def _kernel(**changes):
    fields = dict(file="csrc/cuda/x.cu", arch="sm_90", name="ns::foo_kernel<float>", registers=32, smem=0, stack=0,
                  spill_stores=0, spill_loads=0, max_threads=256, block=256)
    fields.update(changes)
    k = cuda_resources.Kernel(**fields)
    k.blocks_per_sm = cuda_resources.blocks_per_sm(k)
    return k


def test_occupancy_from_registers_threads_and_shared_memory():
    assert _kernel().blocks_per_sm == 8  # 2048 threads per SM / 256
    assert _kernel(registers=59, max_threads=512, block=512).blocks_per_sm == 2  # 64 regs x 512 = 32 K of 64 K
    assert _kernel(registers=107, max_threads=512, block=512).blocks_per_sm == 1
    assert _kernel(smem=100 * 1024).blocks_per_sm == 2  # 228 KiB per SM on sm_90, 1 KiB reserved per block


@pytest.mark.parametrize(
    "changes,problem",
    [({}, None), ({"spill_stores": 4, "stack": 8}, "spills"), ({"max_threads": None}, "no __launch_bounds__"),
     ({"block": 512}, "launched with 512 threads"), ({"block": None}, "no launch site"),
     ({"smem": 64 * 1024}, "static shared memory"), ({"registers": 255, "max_threads": 1024, "block": 1024},
                                                     "does not fit")],
)
def test_each_check_fails_the_report(changes, problem):
    found = cuda_resources.problems(_kernel(**changes))
    if problem is None:
        assert found == []
    else:
        assert any(problem in p for p in found), found


@pytest.mark.skipif(shutil.which("c++filt") is None, reason="needs binutils' c++filt")
def test_demangles_to_kernel_names():
    names = cuda_resources.demangle(["_ZN10bissl_fast2cg12_GLOBAL__N_110dot_kernelIfEEvPKllPdPjS5_"])
    assert names == ["cg::dot_kernel<float>"]
