// CUDA kernels of the BatchNorm ops (schemas in csrc/cpu/batch_norm_cpu.cpp, glue in batch_norm_cuda.cpp).
// Only CUDA headers and the shared math header: the per-channel coefficients come from
// bissl_fast/batch_norm_math.h, the same code the CPU kernels and the C++ tests run.
//
// One block per channel: the block sweeps the channel's M = N * L values once for the per-channel sums
// (block reduction: warp shuffles, then one value per warp through shared memory), derives the
// coefficients, then sweeps again to write the elementwise outputs. The batched ops (k tangents, for
// batched Hessian-vector products): the backward runs one block per (channel, tangent); the double
// backward one block per channel that reduces sum g and sum g xc once and then, per cotangent, its three
// sums and its outputs. Per-channel inputs (weight, the
// statistics, the cotangents ggW/ggB) and outputs are in the accumulation type T (float for
// float/bf16/half, double for double); the glue converts them.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "bissl_fast/batch_norm_math.h"
#include "bissl_fast/cuda_launchers.h"
#include "element_io.cuh"

namespace bissl_fast {
namespace batch_norm_cuda {

namespace {

namespace bn = batch_norm;

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

using element_io::AccType;
using element_io::load;
using element_io::store;

// Element j of channel c in an [N, C, L] tensor.
struct Index {
  int64_t c_count, l;
  __device__ __forceinline__ int64_t operator()(int64_t c, int64_t j) const {
    const int64_t n = j / l;
    return (n * c_count + c) * l + (j - n * l);
  }
};

// Sums K values over the block; every thread gets the totals. shm holds K * kWarps values.
template <typename T, int K>
__device__ __forceinline__ void block_sum(T (&v)[K], T* shm) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < K; ++k) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v[k] += __shfl_xor_sync(0xffffffffu, v[k], off);
  }
  __syncthreads();  // shm may still be read by a previous reduction
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) shm[k * kWarps + warp] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) {
    T total = 0;
    for (int w = 0; w < kWarps; ++w) total += shm[k * kWarps + w];
    v[k] = total;
  }
}

template <typename S>
__global__ void __launch_bounds__(kThreads)
    fwd_kernel(const S* __restrict__ x, const typename AccType<S>::type* __restrict__ w,
               const typename AccType<S>::type* __restrict__ b, const typename AccType<S>::type* __restrict__ rm,
               const typename AccType<S>::type* __restrict__ rv, S* __restrict__ y, typename AccType<S>::type* save_mean,
               typename AccType<S>::type* save_invstd, typename AccType<S>::type* new_rm, typename AccType<S>::type* new_rv,
               int64_t n, int64_t c_count, int64_t l, bool training, double momentum, double eps) {
  using T = typename AccType<S>::type;
  __shared__ T shm[kWarps];
  const int64_t c = blockIdx.x, m = n * l;
  const Index at{c_count, l};
  T mean, invstd;
  if (training) {
    // Mean, then the centred sum of squares (as PyTorch): accurate when |mean| >> std.
    T s[1] = {0};
    for (int64_t j = threadIdx.x; j < m; j += blockDim.x) s[0] += load(x, at(c, j));
    block_sum(s, shm);
    mean = s[0] / static_cast<T>(m);
    T q[1] = {0};
    for (int64_t j = threadIdx.x; j < m; j += blockDim.x) {
      const T d = load(x, at(c, j)) - mean;
      q[0] += d * d;
    }
    block_sum(q, shm);
    invstd = bn::inv_sqrt(q[0] / static_cast<T>(m) + static_cast<T>(eps));
    if (threadIdx.x == 0 && new_rm != nullptr) {
      new_rm[c] = bn::running_update(rm[c], mean, static_cast<T>(momentum));
      new_rv[c] = bn::running_update(rv[c], q[0] / static_cast<T>(m - 1), static_cast<T>(momentum));
    }
  } else {
    mean = rm[c];
    invstd = bn::inv_sqrt(rv[c] + static_cast<T>(eps));
  }
  if (threadIdx.x == 0) {
    save_mean[c] = mean;
    save_invstd[c] = invstd;
  }
  const auto k = bn::fwd_coef(mean, invstd, w[c], b[c]);
  for (int64_t j = threadIdx.x; j < m; j += blockDim.x) {
    const int64_t i = at(c, j);
    store(y, i, k.alpha * load(x, i) + k.beta);
  }
}

template <typename S>
__global__ void __launch_bounds__(kThreads)
    bwd_kernel(const S* __restrict__ g, const S* __restrict__ x, const typename AccType<S>::type* __restrict__ w,
               const typename AccType<S>::type* __restrict__ mean_in, const typename AccType<S>::type* __restrict__ invstd_in,
               S* __restrict__ gx, typename AccType<S>::type* gw, typename AccType<S>::type* gb, int64_t n, int64_t c_count,
               int64_t l, bool training) {
  using T = typename AccType<S>::type;
  __shared__ T shm[2 * kWarps];
  const int64_t c = blockIdx.x, m = n * l;
  const Index at{c_count, l};
  const T mean = mean_in[c];
  // Tangent blockIdx.y of the batched op (0 for the op itself): its grad_out and outputs.
  const int64_t tangent = blockIdx.y;
  g += tangent * m * c_count;
  if (gx != nullptr) gx += tangent * m * c_count;
  if (gw != nullptr) gw += tangent * c_count;
  if (gb != nullptr) gb += tangent * c_count;
  T s[2] = {0, 0};  // sum g, sum g (x - mean)
  if (training || gw != nullptr || gb != nullptr) {
    for (int64_t j = threadIdx.x; j < m; j += blockDim.x) {
      const int64_t i = at(c, j);
      const T gv = load(g, i);
      s[0] += gv;
      s[1] += gv * (load(x, i) - mean);
    }
    block_sum(s, shm);
  }
  const auto k = bn::bwd_coef(training, static_cast<T>(m), invstd_in[c], w[c], s[0], s[1]);
  if (threadIdx.x == 0) {
    if (gw != nullptr) gw[c] = k.gw;
    if (gb != nullptr) gb[c] = k.gb;
  }
  if (gx == nullptr) return;
  for (int64_t j = threadIdx.x; j < m; j += blockDim.x) {
    const int64_t i = at(c, j);
    store(gx, i, k.k_g * load(g, i) + k.k_x * (load(x, i) - mean) + k.k_0);
  }
}

// gI and gG of one channel: the per-channel linear combinations of g, xc and ggx (absent ggx: zero).
template <typename S>
__device__ __forceinline__ void dbwd_outputs(const bn::DbwdCoef<typename AccType<S>::type>& k, const S* ggx,
                                             const S* g, const S* x, typename AccType<S>::type mean, S* gi, S* gg,
                                             int64_t c, int64_t m, const Index& at) {
  using T = typename AccType<S>::type;
  if (gi == nullptr && gg == nullptr) return;
  for (int64_t j = threadIdx.x; j < m; j += blockDim.x) {
    const int64_t i = at(c, j);
    const T xc = load(x, i) - mean;
    const T ggv = ggx != nullptr ? load(ggx, i) : T(0);
    if (gi != nullptr) store(gi, i, k.i_g * load(g, i) + k.i_x * xc + k.i_gg * ggv + k.i_0);
    if (gg != nullptr) store(gg, i, k.o_gg * ggv + k.o_x * xc + k.o_0);
  }
}

template <typename S>
__global__ void __launch_bounds__(kThreads)
    dbwd_kernel(const S* __restrict__ ggx, const typename AccType<S>::type* __restrict__ ggw,
                const typename AccType<S>::type* __restrict__ ggb, const S* __restrict__ g, const S* __restrict__ x,
                const typename AccType<S>::type* __restrict__ w, const typename AccType<S>::type* __restrict__ mean_in,
                const typename AccType<S>::type* __restrict__ invstd_in, S* __restrict__ gi, S* __restrict__ gg,
                typename AccType<S>::type* gw, int64_t n, int64_t c_count, int64_t l, bool training) {
  using T = typename AccType<S>::type;
  __shared__ T shm[5 * kWarps];
  const int64_t c = blockIdx.x, m = n * l;
  const Index at{c_count, l};
  const T mean = mean_in[c];
  // sum g, sum g xc, sum ggx, sum ggx xc, sum ggx g
  T s[5] = {0, 0, 0, 0, 0};
  for (int64_t j = threadIdx.x; j < m; j += blockDim.x) {
    const int64_t i = at(c, j);
    const T gv = load(g, i), xc = load(x, i) - mean;
    s[0] += gv;
    s[1] += gv * xc;
    if (ggx != nullptr) {
      const T ggv = load(ggx, i);
      s[2] += ggv;
      s[3] += ggv * xc;
      s[4] += ggv * gv;
    }
  }
  block_sum(s, shm);
  const auto k = bn::dbwd_coef(training, static_cast<T>(m), invstd_in[c], w[c], s[0], s[1], s[2], s[3], s[4], ggw[c],
                               ggb[c]);
  if (threadIdx.x == 0 && gw != nullptr) gw[c] = k.gw;
  dbwd_outputs(k, ggx, g, x, mean, gi, gg, c, m, at);
}

// The double backward of one channel for one cotangent (batched op): the shared sums s_g, s_gx are
// given, the cotangent's three are reduced here; then its outputs.
template <typename S>
__device__ __forceinline__ void dbwd_tangent(const S* ggx, typename AccType<S>::type ggw, typename AccType<S>::type ggb,
                                             const S* g, const S* x, typename AccType<S>::type w,
                                             typename AccType<S>::type mean, typename AccType<S>::type invstd,
                                             typename AccType<S>::type s_g, typename AccType<S>::type s_gx, S* gi,
                                             S* gg, typename AccType<S>::type* gw, int64_t c, int64_t m,
                                             const Index& at, bool training, typename AccType<S>::type* shm) {
  using T = typename AccType<S>::type;
  T s[3] = {0, 0, 0};  // sum ggx, sum ggx xc, sum ggx g
  if (ggx != nullptr) {
    for (int64_t j = threadIdx.x; j < m; j += blockDim.x) {
      const int64_t i = at(c, j);
      const T ggv = load(ggx, i);
      s[0] += ggv;
      s[1] += ggv * (load(x, i) - mean);
      s[2] += ggv * load(g, i);
    }
    block_sum(s, shm);
  }
  const auto k = bn::dbwd_coef(training, static_cast<T>(m), invstd, w, s_g, s_gx, s[0], s[1], s[2], ggw, ggb);
  if (threadIdx.x == 0 && gw != nullptr) gw[c] = k.gw;
  dbwd_outputs(k, ggx, g, x, mean, gi, gg, c, m, at);
}

// One resident block per SM allowed: with the default bound ptxas held the fp64 instance to 64 registers and
// spilled the per-cotangent sums (48-64 B of stack).
template <typename S>
__global__ void __launch_bounds__(kThreads, 1)
    dbwd_batched_kernel(const S* __restrict__ ggx, const typename AccType<S>::type* __restrict__ ggw,
                        const typename AccType<S>::type* __restrict__ ggb, const S* __restrict__ g,
                        const S* __restrict__ x, const typename AccType<S>::type* __restrict__ w,
                        const typename AccType<S>::type* __restrict__ mean_in,
                        const typename AccType<S>::type* __restrict__ invstd_in, S* __restrict__ gi, S* __restrict__ gg,
                        typename AccType<S>::type* gw, int64_t k_count, int64_t n, int64_t c_count, int64_t l,
                        bool training) {
  using T = typename AccType<S>::type;
  __shared__ T shm[3 * kWarps];
  const int64_t c = blockIdx.x, m = n * l, numel = m * c_count;
  const Index at{c_count, l};
  const T mean = mean_in[c];
  T s[2] = {0, 0};  // sum g, sum g xc: the same for every cotangent
  for (int64_t j = threadIdx.x; j < m; j += blockDim.x) {
    const int64_t i = at(c, j);
    const T gv = load(g, i);
    s[0] += gv;
    s[1] += gv * (load(x, i) - mean);
  }
  block_sum(s, shm);
  for (int64_t t = 0; t < k_count; ++t) {
    dbwd_tangent<S>(ggx != nullptr ? ggx + t * numel : nullptr, ggw[t * c_count + c], ggb[t * c_count + c], g, x,
                    w[c], mean, invstd_in[c], s[0], s[1], gi != nullptr ? gi + t * numel : nullptr,
                    gg != nullptr ? gg + t * numel : nullptr, gw != nullptr ? gw + t * c_count : nullptr, c, m, at,
                    training, shm);
  }
}

template <typename S>
using A = typename AccType<S>::type;

template <typename S>
cudaError_t launch_fwd(const void* x, const void* w, const void* b, const void* rm, const void* rv, void* y,
                       void* save_mean, void* save_invstd, void* new_rm, void* new_rv, int64_t n, int64_t c, int64_t l,
                       bool training, double momentum, double eps, cudaStream_t stream) {
  fwd_kernel<S><<<static_cast<unsigned>(c), kThreads, 0, stream>>>(
      static_cast<const S*>(x), static_cast<const A<S>*>(w), static_cast<const A<S>*>(b),
      static_cast<const A<S>*>(rm), static_cast<const A<S>*>(rv), static_cast<S*>(y), static_cast<A<S>*>(save_mean),
      static_cast<A<S>*>(save_invstd), static_cast<A<S>*>(new_rm), static_cast<A<S>*>(new_rv), n, c, l, training,
      momentum, eps);
  return cudaGetLastError();
}

template <typename S>
cudaError_t launch_bwd(const void* g, const void* x, const void* w, const void* mean, const void* invstd, void* gx,
                       void* gw, void* gb, int64_t n, int64_t c, int64_t l, bool training, cudaStream_t stream) {
  bwd_kernel<S><<<static_cast<unsigned>(c), kThreads, 0, stream>>>(
      static_cast<const S*>(g), static_cast<const S*>(x), static_cast<const A<S>*>(w),
      static_cast<const A<S>*>(mean), static_cast<const A<S>*>(invstd), static_cast<S*>(gx), static_cast<A<S>*>(gw),
      static_cast<A<S>*>(gb), n, c, l, training);
  return cudaGetLastError();
}

template <typename S>
cudaError_t launch_bwd_batched(const void* g, const void* x, const void* w, const void* mean, const void* invstd,
                               void* gx, void* gw, void* gb, int64_t k, int64_t n, int64_t c, int64_t l, bool training,
                               cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(c), static_cast<unsigned>(k));
  bwd_kernel<S><<<grid, kThreads, 0, stream>>>(
      static_cast<const S*>(g), static_cast<const S*>(x), static_cast<const A<S>*>(w),
      static_cast<const A<S>*>(mean), static_cast<const A<S>*>(invstd), static_cast<S*>(gx), static_cast<A<S>*>(gw),
      static_cast<A<S>*>(gb), n, c, l, training);
  return cudaGetLastError();
}

template <typename S>
cudaError_t launch_dbwd_batched(const void* ggx, const void* ggw, const void* ggb, const void* g, const void* x,
                                const void* w, const void* mean, const void* invstd, void* gi, void* gg, void* gw,
                                int64_t k, int64_t n, int64_t c, int64_t l, bool training, cudaStream_t stream) {
  dbwd_batched_kernel<S><<<static_cast<unsigned>(c), kThreads, 0, stream>>>(
      static_cast<const S*>(ggx), static_cast<const A<S>*>(ggw), static_cast<const A<S>*>(ggb),
      static_cast<const S*>(g), static_cast<const S*>(x), static_cast<const A<S>*>(w),
      static_cast<const A<S>*>(mean), static_cast<const A<S>*>(invstd), static_cast<S*>(gi), static_cast<S*>(gg),
      static_cast<A<S>*>(gw), k, n, c, l, training);
  return cudaGetLastError();
}

template <typename S>
cudaError_t launch_dbwd(const void* ggx, const void* ggw, const void* ggb, const void* g, const void* x,
                        const void* w, const void* mean, const void* invstd, void* gi, void* gg, void* gw, int64_t n,
                        int64_t c, int64_t l, bool training, cudaStream_t stream) {
  dbwd_kernel<S><<<static_cast<unsigned>(c), kThreads, 0, stream>>>(
      static_cast<const S*>(ggx), static_cast<const A<S>*>(ggw), static_cast<const A<S>*>(ggb),
      static_cast<const S*>(g), static_cast<const S*>(x), static_cast<const A<S>*>(w),
      static_cast<const A<S>*>(mean), static_cast<const A<S>*>(invstd), static_cast<S*>(gi), static_cast<S*>(gg),
      static_cast<A<S>*>(gw), n, c, l, training);
  return cudaGetLastError();
}

}  // namespace

#define BISSL_BN_DISPATCH(dtype, LAUNCH, ...)                                 \
  switch (dtype) {                                                           \
    case DType::kFloat:                                                      \
      return LAUNCH<float>(__VA_ARGS__);                                     \
    case DType::kDouble:                                                     \
      return LAUNCH<double>(__VA_ARGS__);                                    \
    case DType::kHalf:                                                       \
      return LAUNCH<__half>(__VA_ARGS__);                                    \
    case DType::kBFloat16:                                                   \
      return LAUNCH<__nv_bfloat16>(__VA_ARGS__);                             \
  }                                                                          \
  return cudaErrorInvalidValue

cudaError_t fwd(DType dtype, const void* x, const void* w, const void* b, const void* rm, const void* rv, void* y,
                void* save_mean, void* save_invstd, void* new_rm, void* new_rv, int64_t n, int64_t c, int64_t l,
                bool training, double momentum, double eps, cudaStream_t stream) {
  BISSL_BN_DISPATCH(dtype, launch_fwd, x, w, b, rm, rv, y, save_mean, save_invstd, new_rm, new_rv, n, c, l, training,
                    momentum, eps, stream);
}

cudaError_t bwd(DType dtype, const void* g, const void* x, const void* w, const void* mean, const void* invstd,
                void* gx, void* gw, void* gb, int64_t n, int64_t c, int64_t l, bool training, cudaStream_t stream) {
  BISSL_BN_DISPATCH(dtype, launch_bwd, g, x, w, mean, invstd, gx, gw, gb, n, c, l, training, stream);
}

cudaError_t dbwd(DType dtype, const void* ggx, const void* ggw, const void* ggb, const void* g, const void* x,
                 const void* w, const void* mean, const void* invstd, void* gi, void* gg, void* gw, int64_t n,
                 int64_t c, int64_t l, bool training, cudaStream_t stream) {
  BISSL_BN_DISPATCH(dtype, launch_dbwd, ggx, ggw, ggb, g, x, w, mean, invstd, gi, gg, gw, n, c, l, training, stream);
}

cudaError_t bwd_batched(DType dtype, const void* g, const void* x, const void* w, const void* mean, const void* invstd,
                        void* gx, void* gw, void* gb, int64_t k, int64_t n, int64_t c, int64_t l, bool training,
                        cudaStream_t stream) {
  if (k == 0) return cudaSuccess;  // an empty grid is a launch error
  BISSL_BN_DISPATCH(dtype, launch_bwd_batched, g, x, w, mean, invstd, gx, gw, gb, k, n, c, l, training, stream);
}

cudaError_t dbwd_batched(DType dtype, const void* ggx, const void* ggw, const void* ggb, const void* g, const void* x,
                         const void* w, const void* mean, const void* invstd, void* gi, void* gg, void* gw, int64_t k,
                         int64_t n, int64_t c, int64_t l, bool training, cudaStream_t stream) {
  if (k == 0) return cudaSuccess;
  BISSL_BN_DISPATCH(dtype, launch_dbwd_batched, ggx, ggw, ggb, g, x, w, mean, invstd, gi, gg, gw, k, n, c, l, training,
                    stream);
}

#undef BISSL_BN_DISPATCH

}  // namespace batch_norm_cuda
}  // namespace bissl_fast
