// Maps a tensor's dtype onto the kernels' DType tag (bissl_fast/cuda_launchers.h) for the CUDA
// glue of every op, so they accept the same dtypes and reject the rest with one message.
#pragma once

#include <ATen/ATen.h>

#include "bissl_fast/cuda_launchers.h"

namespace bissl_fast {

inline DType cuda_dtype(at::ScalarType s, const char* op) {
  switch (s) {
    case at::kFloat:
      return DType::kFloat;
    case at::kDouble:
      return DType::kDouble;
    case at::kHalf:
      return DType::kHalf;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      break;
  }
  TORCH_CHECK(false, op, ": expected float32/float64/float16/bfloat16, got ", s);
}

}  // namespace bissl_fast
