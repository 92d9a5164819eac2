// CUDA kernels of the fused multi-tensor vector updates of CG and MINRES (docs/design.md §2.3): ONE
// launch per vector op over all T tensors. Only CUDA headers and our torch-free headers here (this file compiles with
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
// in chunk order into out[t], so the result is deterministic and needs no second launch. An op
// with K dots per pass (cg_dot_pair) lays its partials out as [K][chunks] and its output as [K][T].
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

// Block-wide sum in a fixed order (shared-memory tree), result valid in every thread. The barrier on
// entry lets a second call reuse the buffer after every thread has read the first call's result.
__device__ __forceinline__ double block_sum(double v) {
  __shared__ double buf[kThreads];
  __syncthreads();
  buf[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) buf[threadIdx.x] += buf[threadIdx.x + s];
    __syncthreads();
  }
  return buf[0];
}

// Thread 0 stores this block's K partials; the last block then reduces every tensor's partials.
template <int K>
__device__ __forceinline__ void finish_dots(const double (&partial)[K], const int64_t* table, int64_t T,
                                            double* partials, unsigned int* ticket, double* out) {
  __shared__ bool last;
  const int64_t chunks = gridDim.x;
  if (threadIdx.x == 0) {
    for (int k = 0; k < K; ++k) partials[k * chunks + blockIdx.x] = partial[k];
    __threadfence();
    last = atomicAdd(ticket, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  for (int64_t i = threadIdx.x; i < K * T; i += blockDim.x) {
    const int64_t k = i / T, t = i % T;
    double acc = 0.0;
    for (int64_t c = table[t]; c < table[t + 1]; ++c) acc += static_cast<volatile double*>(partials)[k * chunks + c];
    out[k * T + t] = acc;
  }
}

__device__ __forceinline__ void finish_dot(double partial, const int64_t* table, int64_t T, double* partials,
                                           unsigned int* ticket, double* out) {
  const double one[1] = {partial};
  finish_dots<1>(one, table, T, partials, ticket, out);
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

template <typename S>
__global__ void __launch_bounds__(kThreads) dot_pair_kernel(const int64_t* table, int64_t T, double* partials,
                                                            unsigned int* ticket, double* out) {
  const Chunk c = locate(table, T);
  const S* a = list_ptr<const S>(table, T, 0, c.tensor);
  const S* b = list_ptr<const S>(table, T, 1, c.tensor);
  const S* cc = list_ptr<const S>(table, T, 2, c.tensor);
  double ab = 0.0, ac = 0.0;
  for (int64_t i = c.begin + threadIdx.x; i < c.end; i += kThreads) {
    const double ai = static_cast<double>(load(a, i));
    ab += ai * static_cast<double>(load(b, i));
    ac += ai * static_cast<double>(load(cc, i));
  }
  const double sums[2] = {block_sum(ab), block_sum(ac)};
  finish_dots<2>(sums, table, T, partials, ticket, out);
}

template <typename S>
__global__ void __launch_bounds__(kThreads) lanczos_kernel(const int64_t* table, int64_t T, double c1, double c2,
                                                           double* partials, unsigned int* ticket, double* out) {
  using A = typename AccType<S>::type;
  const Chunk c = locate(table, T);
  S* r1 = list_ptr<S>(table, T, 0, c.tensor);
  const S* av = list_ptr<const S>(table, T, 1, c.tensor);
  const S* r2 = list_ptr<const S>(table, T, 2, c.tensor);
  const A a1 = static_cast<A>(c1), a2 = static_cast<A>(c2);
  double acc = 0.0;
  for (int64_t i = c.begin + threadIdx.x; i < c.end; i += kThreads) {
    store(r1, i, lanczos_next<A>(load(av, i), load(r1, i), load(r2, i), a1, a2));
    // y.y of the stored (rounded) value, as a separate pass over y would see it.
    const double ys = static_cast<double>(load(r1, i));
    acc += ys * ys;
  }
  finish_dot(block_sum(acc), table, T, partials, ticket, out);
}

template <typename S>
__global__ void __launch_bounds__(kThreads) minres_update_kernel(const int64_t* table, int64_t T, MinresScalars s) {
  using A = typename AccType<S>::type;
  const Chunk c = locate(table, T);
  S* w1 = list_ptr<S>(table, T, 0, c.tensor);
  S* x = list_ptr<S>(table, T, 1, c.tensor);
  S* v = list_ptr<S>(table, T, 2, c.tensor);
  const S* w2 = list_ptr<const S>(table, T, 3, c.tensor);
  const S* y = list_ptr<const S>(table, T, 4, c.tensor);
  const A oldeps = static_cast<A>(s.oldeps), delta = static_cast<A>(s.delta), gamma_inv = static_cast<A>(s.gamma_inv);
  const A phi = static_cast<A>(s.phi), beta_inv = static_cast<A>(s.beta_inv);
  for (int64_t i = c.begin + threadIdx.x; i < c.end; i += kThreads) {
    store(w1, i, minres_direction<A>(load(v, i), load(w1, i), load(w2, i), oldeps, delta, gamma_inv));
    // x is updated with the stored (rounded) direction, as the reference's separate step would.
    store(x, i, load(x, i) + phi * load(w1, i));
    store(v, i, load(y, i) * beta_inv);
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

template <typename S>
struct DotPairLaunch {
  static cudaError_t run(const int64_t* table, int64_t T, int64_t chunks, double* partials, unsigned int* ticket,
                         double* out, cudaStream_t stream) {
    cudaError_t err = cudaMemsetAsync(ticket, 0, sizeof(unsigned int), stream);
    if (err != cudaSuccess) return err;
    dot_pair_kernel<S><<<static_cast<unsigned int>(chunks), kThreads, 0, stream>>>(table, T, partials, ticket, out);
    return cudaGetLastError();
  }
};

template <typename S>
struct LanczosLaunch {
  static cudaError_t run(const int64_t* table, int64_t T, int64_t chunks, double c1, double c2, double* partials,
                         unsigned int* ticket, double* out, cudaStream_t stream) {
    cudaError_t err = cudaMemsetAsync(ticket, 0, sizeof(unsigned int), stream);
    if (err != cudaSuccess) return err;
    lanczos_kernel<S><<<static_cast<unsigned int>(chunks), kThreads, 0, stream>>>(table, T, c1, c2, partials, ticket,
                                                                                  out);
    return cudaGetLastError();
  }
};

template <typename S>
struct MinresUpdateLaunch {
  static cudaError_t run(const int64_t* table, int64_t T, int64_t chunks, MinresScalars s, cudaStream_t stream) {
    minres_update_kernel<S><<<static_cast<unsigned int>(chunks), kThreads, 0, stream>>>(table, T, s);
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

cudaError_t launch_cg_dot_pair(DType dtype, const int64_t* table, int64_t T, int64_t chunks, double* partials,
                               unsigned int* ticket, double* out, cudaStream_t stream) {
  return dispatch<DotPairLaunch>(dtype, table, T, chunks, partials, ticket, out, stream);
}

cudaError_t launch_minres_lanczos(DType dtype, const int64_t* table, int64_t T, int64_t chunks, double c1, double c2,
                                  double* partials, unsigned int* ticket, double* out, cudaStream_t stream) {
  return dispatch<LanczosLaunch>(dtype, table, T, chunks, c1, c2, partials, ticket, out, stream);
}

cudaError_t launch_minres_update(DType dtype, const int64_t* table, int64_t T, int64_t chunks, MinresScalars s,
                                 cudaStream_t stream) {
  return dispatch<MinresUpdateLaunch>(dtype, table, T, chunks, s, stream);
}

}  // namespace cg
}  // namespace bissl_fast
