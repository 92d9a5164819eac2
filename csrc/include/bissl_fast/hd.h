// Shared host/device qualifiers: kernel math in these headers compiles into the CUDA kernels
// and into the CPU kernels and C++ tests, so CPU CI runs the arithmetic the GPU runs.
#pragma once

#if defined(__CUDACC__)
#define BISSL_HD __host__ __device__ __forceinline__
#else
#define BISSL_HD inline
#endif
