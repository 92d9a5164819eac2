// Python module bissl_fast._C. The ops themselves are registered with torch.library
// (TORCH_LIBRARY_FRAGMENT in each op's file) and called through torch.ops.bissl_fast.*.
#include <torch/extension.h>

#include "output_alloc.h"

#ifndef BISSL_FAST_WITH_CUDA
#define BISSL_FAST_WITH_CUDA 0
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "bissl_fast compiled kernels; ops live under torch.ops.bissl_fast";
  m.def("cuda_compiled", []() { return BISSL_FAST_WITH_CUDA != 0; },
        "True when the CUDA kernels were compiled into this build");
  m.def("set_poison_outputs", &bissl_fast::set_poison_outputs,
        "Fill every op output with NaN before kernels write it (tests; see bissl_fast._alloc)");
  m.def("poison_outputs_enabled", &bissl_fast::poison_outputs_enabled);
}
