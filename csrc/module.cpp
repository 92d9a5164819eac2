// Python module bissl_fast._C. The ops themselves are registered with torch.library
// (TORCH_LIBRARY_FRAGMENT in each op's file) and called through torch.ops.bissl_fast.*.
#include <torch/extension.h>

#include "output_alloc.h"

#ifndef BISSL_FAST_WITH_CUDA
#define BISSL_FAST_WITH_CUDA 0
#endif

// The torch this library was compiled against, passed by the build (setup.py, CMakeLists.txt) as bare
// tokens: torch.__version__, and torch.version.cuda for a build with the CUDA kernels ("none" without).
#if !defined(BISSL_FAST_TORCH_VERSION) || !defined(BISSL_FAST_TORCH_CUDA)
#error "define BISSL_FAST_TORCH_VERSION=<torch.__version__> and BISSL_FAST_TORCH_CUDA=<torch.version.cuda or none>"
#endif
#define BISSL_FAST_STR_(x) #x
#define BISSL_FAST_STR(x) BISSL_FAST_STR_(x)

namespace {
// One literal, so that bissl_fast._backends can read it from the library file before loading it: a
// library built against another torch may fail to load or crash in its op registrations (static
// initializers), before any function of this module could be called (docs/design.md §4).
[[gnu::used]] constexpr char kBuildInfo[] =
    "bissl_fast build info: torch=" BISSL_FAST_STR(BISSL_FAST_TORCH_VERSION)
    " cxx11_abi=" BISSL_FAST_STR(_GLIBCXX_USE_CXX11_ABI)
    " cuda=" BISSL_FAST_STR(BISSL_FAST_TORCH_CUDA) ";";
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "bissl_fast compiled kernels; ops live under torch.ops.bissl_fast";
  m.def("cuda_compiled", []() { return BISSL_FAST_WITH_CUDA != 0; },
        "True when the CUDA kernels were compiled into this build");
  m.def("build_info", []() { return std::string(kBuildInfo); },
        "One line naming the torch this build was compiled against: torch.__version__, the C++ ABI flag "
        "and torch.version.cuda (none without the CUDA kernels)");
  m.def("set_poison_outputs", &bissl_fast::set_poison_outputs,
        "Fill every op output with NaN before kernels write it (tests; see bissl_fast._alloc)");
  m.def("poison_outputs_enabled", &bissl_fast::poison_outputs_enabled);
}
