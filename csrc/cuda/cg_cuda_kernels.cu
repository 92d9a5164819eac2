// CUDA kernels of the fused multi-tensor CG vector updates (docs/design.md §2.3): ONE launch per vector
// op over all T tensors. Only CUDA headers and our torch-free headers here (this file compiles with
// nvcc on machines without torch's CUDA headers); the torch glue is csrc/cuda/cg_cuda.cpp.
//
// Tensor lists travel as a device table of int64 words (apex multi_tensor_apply style, but the
// table lives in device memory, so one launch covers any number of tensors):
//
//   table[0 .. T]                    chunk_starts (prefix sum of chunks per tensor, see cg_math.h)
//   table[T+1 .. 2T]                 numel per tensor
//   table[2T+1 + l*T .. +T)          data pointers of list l (l = 0 .. lists-1)
//
// One block handles one chunk of kChunk elements (blockDim = 256, 16 strided elements per thread:
// coalesced). Dot products: each block writes its chunk's partial (double, fixed tree order) to
// `partials`; the last block to finish (threadfence + atomic ticket) sums each tensor's partials
// in chunk order into out[t], so the result is deterministic and needs no second launch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "bissl_fast/cg_math.h"
#include "bissl_fast/cuda_launchers.h"
#include "element_io.cuh"

namespace bissl_fast {
namespace cg {
namespace {

constexpr int kThreads = 256;

using element_io::AccType;
using element_io::load;
using element_io::store;

struct Chunk {
  int64_t tensor, begin, end;
};

__device__ __forceinline__ Chunk locate(const int64_t* table, int64_t T) {
  Chunk c;
  const int64_t chunk = blockIdx.x;
  c.tensor = chunk_tensor(table, T, chunk);
  chunk_range(table, c.tensor, chunk, table[T + 1 + c.tensor], &c.begin, &c.end);
  return c;
}

template <typename S>
__device__ __forceinline__ S* list_ptr(const int64_t* table, int64_t T, int list, int64_t t) {
  return reinterpret_cast<S*>(static_cast<uintptr_t>(table[2 * T + 1 + list * T + t]));
}

// Block-wide sum in a fixed order (shared-memory tree), result valid in thread 0.
__device__ __forceinline__ double block_sum(double v) {
  __shared__ double buf[kThreads];
  buf[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) buf[threadIdx.x] += buf[threadIdx.x + s];
    __syncthreads();
  }
  return buf[0];
}

// Thread 0 stores this block's partial; the last block then reduces every tensor's partials.
__device__ __forceinline__ void finish_dot(double partial, const int64_t* table, int64_t T, double* partials,
                                           unsigned int* ticket, double* out) {
  __shared__ bool last;
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = partial;
    __threadfence();
    last = atomicAdd(ticket, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  for (int64_t t = threadIdx.x; t < T; t += blockDim.x) {
    double acc = 0.0;
    for (int64_t c = table[t]; c < table[t + 1]; ++c) acc += static_cast<volatile double*>(partials)[c];
    out[t] = acc;
  }
}

template <typename S>
__global__ void __launch_bounds__(kThreads) dot_kernel(const int64_t* table, int64_t T, double* partials,
                                                       unsigned int* ticket, double* out) {
  const Chunk c = locate(table, T);
  const S* a = list_ptr<const S>(table, T, 0, c.tensor);
  const S* b = list_ptr<const S>(table, T, 1, c.tensor);
  double acc = 0.0;
  for (int64_t i = c.begin + threadIdx.x; i < c.end; i += kThreads) {
    acc += static_cast<double>(load(a, i)) * static_cast<double>(load(b, i));
  }
  finish_dot(block_sum(acc), table, T, partials, ticket, out);
}

template <typename S>
__global__ void __launch_bounds__(kThreads) update_kernel(const int64_t* table, int64_t T, const double* alpha,
                                                          double* partials, unsigned int* ticket, double* out) {
  using A = typename AccType<S>::type;
  const Chunk c = locate(table, T);
  S* x = list_ptr<S>(table, T, 0, c.tensor);
  S* r = list_ptr<S>(table, T, 1, c.tensor);
  const S* d = list_ptr<const S>(table, T, 2, c.tensor);
  const S* ad = list_ptr<const S>(table, T, 3, c.tensor);
  const A a = static_cast<A>(alpha[c.tensor]);
  double acc = 0.0;
  for (int64_t i = c.begin + threadIdx.x; i < c.end; i += kThreads) {
    A xi = load(x, i), ri = load(r, i);
    update_xr<A>(xi, ri, load(d, i), load(ad, i), a);
    store(x, i, xi);
    store(r, i, ri);
    // r.r of the stored (rounded) value, as a separate pass over r would see it.
    const double rs = static_cast<double>(load(r, i));
    acc += rs * rs;
  }
  finish_dot(block_sum(acc), table, T, partials, ticket, out);
}

template <typename S>
__global__ void __launch_bounds__(kThreads) direction_kernel(const int64_t* table, int64_t T, const double* beta) {
  using A = typename AccType<S>::type;
  const Chunk c = locate(table, T);
  S* d = list_ptr<S>(table, T, 0, c.tensor);
  const S* r = list_ptr<const S>(table, T, 1, c.tensor);
  const A b = static_cast<A>(beta[c.tensor]);
  for (int64_t i = c.begin + threadIdx.x; i < c.end; i += kThreads) {
    store(d, i, direction<A>(load(r, i), load(d, i), b));
  }
}

template <template <typename> class Launch, typename... Args>
cudaError_t dispatch(DType dtype, Args... args) {
  switch (dtype) {
    case DType::kFloat: return Launch<float>::run(args...);
    case DType::kDouble: return Launch<double>::run(args...);
    case DType::kHalf: return Launch<__half>::run(args...);
    case DType::kBFloat16: return Launch<__nv_bfloat16>::run(args...);
  }
  return cudaErrorInvalidValue;
}

template <typename S>
struct DotLaunch {
  static cudaError_t run(const int64_t* table, int64_t T, int64_t chunks, double* partials, unsigned int* ticket,
                         double* out, cudaStream_t stream) {
    cudaError_t err = cudaMemsetAsync(ticket, 0, sizeof(unsigned int), stream);
    if (err != cudaSuccess) return err;
    dot_kernel<S><<<static_cast<unsigned int>(chunks), kThreads, 0, stream>>>(table, T, partials, ticket, out);
    return cudaGetLastError();
  }
};

template <typename S>
struct UpdateLaunch {
  static cudaError_t run(const int64_t* table, int64_t T, int64_t chunks, const double* alpha, double* partials,
                         unsigned int* ticket, double* out, cudaStream_t stream) {
    cudaError_t err = cudaMemsetAsync(ticket, 0, sizeof(unsigned int), stream);
    if (err != cudaSuccess) return err;
    update_kernel<S><<<static_cast<unsigned int>(chunks), kThreads, 0, stream>>>(table, T, alpha, partials, ticket,
                                                                                  out);
    return cudaGetLastError();
  }
};

template <typename S>
struct DirectionLaunch {
  static cudaError_t run(const int64_t* table, int64_t T, int64_t chunks, const double* beta, cudaStream_t stream) {
    direction_kernel<S><<<static_cast<unsigned int>(chunks), kThreads, 0, stream>>>(table, T, beta);
    return cudaGetLastError();
  }
};

}  // namespace

// Host launchers declared in bissl_fast/cuda_launchers.h, called by csrc/cuda/cg_cuda.cpp.
cudaError_t launch_cg_dot(DType dtype, const int64_t* table, int64_t T, int64_t chunks, double* partials,
                          unsigned int* ticket, double* out, cudaStream_t stream) {
  return dispatch<DotLaunch>(dtype, table, T, chunks, partials, ticket, out, stream);
}

cudaError_t launch_cg_update(DType dtype, const int64_t* table, int64_t T, int64_t chunks, const double* alpha,
                             double* partials, unsigned int* ticket, double* out, cudaStream_t stream) {
  return dispatch<UpdateLaunch>(dtype, table, T, chunks, alpha, partials, ticket, out, stream);
}

cudaError_t launch_cg_direction(DType dtype, const int64_t* table, int64_t T, int64_t chunks, const double* beta,
                                cudaStream_t stream) {
  return dispatch<DirectionLaunch>(dtype, table, T, chunks, beta, stream);
}

}  // namespace cg
}  // namespace bissl_fast
