// Element loads and stores of the CUDA kernels (csrc/cuda/*_cuda_kernels.cu): every storage type is
// read into and written from its accumulation type (float for float/half/bfloat16, double for
// double). CUDA headers only, so each kernel file still compiles with plain nvcc.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace bissl_fast {
namespace element_io {

template <typename S>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename S>
__device__ __forceinline__ S from_acc(typename AccType<S>::type x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <>
__device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename S>
__device__ __forceinline__ typename AccType<S>::type load(const S* p, int64_t i) {
  return to_acc(p[i]);
}
template <typename S>
__device__ __forceinline__ void store(S* p, int64_t i, typename AccType<S>::type v) {
  p[i] = from_acc<S>(v);
}

}  // namespace element_io
}  // namespace bissl_fast
