"""Build of bissl_fast and its C++/CUDA extension bissl_fast._C.

- Always builds the C++ extension from csrc/ (CPU kernels + shared host/device math headers).
- Adds the CUDA sources (csrc/cuda/) when torch is a CUDA build and nvcc is found, or FORCE_CUDA=1.
  TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0" when no GPU is visible.
- BISSL_FAST_SKIP_EXT=1 gives a pure-Python install.

Install with ``pip install --no-build-isolation -e .`` so the build uses the installed torch.
"""
import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("BISSL_FAST_SKIP_EXT", "0") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    def rel(pattern):
        return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))

    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    cxx_flags = ["-O3", "-std=c++20"]
    with_cuda = os.environ.get("FORCE_CUDA", "0") == "1" or (
        torch.version.cuda is not None and CUDA_HOME is not None
    )
    if not with_cuda:
        ext = CppExtension("bissl_fast._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx_flags})
        return [ext], {"build_ext": BuildExtension}
    if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    ext = CUDAExtension(
        "bissl_fast._C",
        sources + rel("csrc/cuda/*.cpp") + rel("csrc/cuda/*.cu"),
        include_dirs=include_dirs,
        define_macros=[("BISSL_FAST_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
