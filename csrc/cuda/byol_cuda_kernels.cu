// CUDA kernels of the BYOL row ops (byol_fwd / byol_bwd / byol_hvp, see csrc/cpu/byol_cpu.cpp for
// the op contract). One warp per row: each lane reduces a strided slice of the row's dot products
// with 16-byte vector loads, a butterfly shuffle gives every lane the row sums, the coefficients
// come from the shared row math header (the same code the CPU kernel and the C++ test run), and
// a second pass over the row streams the outputs out. byol_hvp_batched (k cotangents) keeps one warp
// per row: the row's norms are reduced once and each cotangent adds its own dot products and output
// pass. Accumulation is fp32 for float/half/bf16 and fp64 for double.
//
// Includes only CUDA headers and our math headers (no torch), so it compiles with plain nvcc;
// the torch-facing launch glue is csrc/cuda/byol_cuda.cpp, the interface
// bissl_fast/cuda_launchers.h.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "bissl_fast/byol_math.h"
#include "bissl_fast/cuda_launchers.h"
#include "element_io.cuh"

namespace bissl_fast {
namespace byol_cuda {

namespace {

namespace bm = ::bissl_fast::byol;

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 8;  // 256 threads: one warp per row

using element_io::AccType;
using element_io::from_acc;
using element_io::to_acc;

// VEC consecutive elements moved as one load/store (16 bytes when VEC = 16 / sizeof(S)).
template <typename S, int VEC>
struct alignas(sizeof(S) * VEC) Pack {
  static constexpr int kVec = VEC;
  S v[VEC];
};

template <typename S, int VEC, typename T>
__device__ __forceinline__ void load(const S* __restrict__ base, int64_t i, T (&out)[VEC]) {
  const Pack<S, VEC> pk = *reinterpret_cast<const Pack<S, VEC>*>(base + i);
#pragma unroll
  for (int k = 0; k < VEC; ++k) out[k] = to_acc(pk.v[k]);
}

template <typename S, int VEC, typename T>
__device__ __forceinline__ void store(S* __restrict__ base, int64_t i, const T (&in)[VEC]) {
  Pack<S, VEC> pk;
#pragma unroll
  for (int k = 0; k < VEC; ++k) pk.v[k] = from_acc<S>(in[k]);
  *reinterpret_cast<Pack<S, VEC>*>(base + i) = pk;
}

// Butterfly all-reduce: every lane ends with the warp's sum.
template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

__device__ __forceinline__ int64_t warp_row() {
  return static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
}

// Warp-reduced p.p, t.t and p.t of one row, as the shared header's row record (every lane gets it).
template <typename S, int VEC>
__device__ __forceinline__ auto warp_row_stats(const S* pr, const S* tr, int64_t D, int lane) {
  using T = typename AccType<S>::type;
  T pp = 0, tt = 0, pt = 0;
  for (int64_t i = static_cast<int64_t>(lane) * VEC; i < D; i += kWarp * VEC) {
    T x[VEC], y[VEC];
    load<S, VEC>(pr, i, x);
    load<S, VEC>(tr, i, y);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      pp += x[k] * x[k];
      tt += y[k] * y[k];
      pt += x[k] * y[k];
    }
  }
  return bm::make_row<T>(warp_sum(pp), warp_sum(tt), warp_sum(pt));
}

template <typename S, int VEC>
__global__ void __launch_bounds__(kWarp* kRowsPerBlock)
    fwd_kernel(const S* __restrict__ p, const S* __restrict__ t, S* __restrict__ out, int64_t B, int64_t D) {
  const int64_t row = warp_row();
  if (row >= B) return;  // whole warps exit together, so the shuffles below see full warps
  const int lane = threadIdx.x % kWarp;
  const S* pr = p + row * D;
  const S* tr = t + row * D;
  const auto r = warp_row_stats<S, VEC>(pr, tr, D, lane);
  if (lane == 0) out[row] = from_acc<S>(bm::loss(r));
}

template <typename S, int VEC>
__global__ void __launch_bounds__(kWarp* kRowsPerBlock)
    bwd_kernel(const S* __restrict__ g, const S* __restrict__ p, const S* __restrict__ t, S* __restrict__ dp,
               S* __restrict__ dt, int64_t B, int64_t D) {
  using T = typename AccType<S>::type;
  const int64_t row = warp_row();
  if (row >= B) return;
  const int lane = threadIdx.x % kWarp;
  const S* pr = p + row * D;
  const S* tr = t + row * D;
  const auto r = warp_row_stats<S, VEC>(pr, tr, D, lane);
  const auto c = bm::grad_coef(r, to_acc(g[row]));
  S* dpr = dp + row * D;
  S* dtr = dt ? dt + row * D : nullptr;
  // Second pass: the row was just read by this warp, so these loads mostly hit L1/L2.
  for (int64_t i = static_cast<int64_t>(lane) * VEC; i < D; i += kWarp * VEC) {
    T x[VEC], y[VEC], o[VEC];
    load<S, VEC>(pr, i, x);
    load<S, VEC>(tr, i, y);
#pragma unroll
    for (int k = 0; k < VEC; ++k) o[k] = c.p_p * x[k] + c.p_t * y[k];
    store<S, VEC>(dpr, i, o);
    if (dtr) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) o[k] = c.t_t * y[k] + c.t_p * x[k];
      store<S, VEC>(dtr, i, o);
    }
  }
}

// The double backward's output pass of one row for one cotangent: dp (and dt) as the per-row linear
// combinations of p, t, Wp, Wt given by the coefficients (an absent wt is a zero cotangent).
template <typename S, int VEC, typename T>
__device__ __forceinline__ void hvp_row_outputs(const bm::HvpCoef<T>& c, const S* pr, const S* tr, const S* wpr,
                                                const S* wtr, S* dpr, S* dtr, int64_t D, int lane) {
  for (int64_t i = static_cast<int64_t>(lane) * VEC; i < D; i += kWarp * VEC) {
    T x[VEC], y[VEC], w[VEC], z[VEC], o[VEC];
    load<S, VEC>(pr, i, x);
    load<S, VEC>(tr, i, y);
    load<S, VEC>(wpr, i, w);
    if (wtr) {
      load<S, VEC>(wtr, i, z);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) z[k] = 0;
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) o[k] = c.p_p * x[k] + c.p_t * y[k] + c.p_wp * w[k] + c.p_wt * z[k];
    store<S, VEC>(dpr, i, o);
    if (dtr) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) o[k] = c.t_p * x[k] + c.t_t * y[k] + c.t_wp * w[k] + c.t_wt * z[k];
      store<S, VEC>(dtr, i, o);
    }
  }
}

template <typename S, int VEC>
__global__ void __launch_bounds__(kWarp* kRowsPerBlock)
    hvp_kernel(const S* __restrict__ g, const S* __restrict__ p, const S* __restrict__ t, const S* __restrict__ wp,
               const S* __restrict__ wt, S* __restrict__ dg, S* __restrict__ dp, S* __restrict__ dt, int64_t B,
               int64_t D) {
  using T = typename AccType<S>::type;
  const int64_t row = warp_row();
  if (row >= B) return;
  const int lane = threadIdx.x % kWarp;
  const S* pr = p + row * D;
  const S* tr = t + row * D;
  const S* wpr = wp + row * D;
  const S* wtr = wt ? wt + row * D : nullptr;
  T pp = 0, tt = 0, pt = 0, p_wp = 0, t_wp = 0, p_wt = 0, t_wt = 0;
  for (int64_t i = static_cast<int64_t>(lane) * VEC; i < D; i += kWarp * VEC) {
    T x[VEC], y[VEC], w[VEC];
    load<S, VEC>(pr, i, x);
    load<S, VEC>(tr, i, y);
    load<S, VEC>(wpr, i, w);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      pp += x[k] * x[k];
      tt += y[k] * y[k];
      pt += x[k] * y[k];
      p_wp += x[k] * w[k];
      t_wp += y[k] * w[k];
    }
    if (wtr) {
      T z[VEC];
      load<S, VEC>(wtr, i, z);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        p_wt += x[k] * z[k];
        t_wt += y[k] * z[k];
      }
    }
  }
  const auto r = bm::make_row<T>(warp_sum(pp), warp_sum(tt), warp_sum(pt));
  const auto c = bm::hvp_coef(r, to_acc(g[row]), warp_sum(p_wp), warp_sum(t_wp), warp_sum(p_wt), warp_sum(t_wt));
  if (lane == 0) dg[row] = from_acc<S>(c.dg);
  hvp_row_outputs<S, VEC>(c, pr, tr, wpr, wtr, dp + row * D, dt ? dt + row * D : nullptr, D, lane);
}

// byol_hvp for K cotangents (wp, wt, dp, dt hold K consecutive [B, D] blocks, dg K blocks of [B]): one warp
// per row reduces the row's norms once, then, per cotangent, its four dot products and the output pass.
// One resident block per SM allowed: with the default bound ptxas held the fp64 one-vector-per-lane
// instance to 80 registers on sm_80 and spilled 8 B.
template <typename S, int VEC>
__global__ void __launch_bounds__(kWarp* kRowsPerBlock, 1)
    hvp_batched_kernel(const S* __restrict__ g, const S* __restrict__ p, const S* __restrict__ t,
                       const S* __restrict__ wp, const S* __restrict__ wt, S* __restrict__ dg, S* __restrict__ dp,
                       S* __restrict__ dt, int64_t K, int64_t B, int64_t D) {
  using T = typename AccType<S>::type;
  const int64_t row = warp_row();
  if (row >= B) return;
  const int lane = threadIdx.x % kWarp;
  const S* pr = p + row * D;
  const S* tr = t + row * D;
  const auto r = warp_row_stats<S, VEC>(pr, tr, D, lane);
  const T gr = to_acc(g[row]);
  for (int64_t j = 0; j < K; ++j) {
    const int64_t off = (j * B + row) * D;
    const S* wpr = wp + off;
    const S* wtr = wt ? wt + off : nullptr;
    T p_wp = 0, t_wp = 0, p_wt = 0, t_wt = 0;
    for (int64_t i = static_cast<int64_t>(lane) * VEC; i < D; i += kWarp * VEC) {
      T x[VEC], y[VEC], w[VEC];
      load<S, VEC>(pr, i, x);
      load<S, VEC>(tr, i, y);
      load<S, VEC>(wpr, i, w);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        p_wp += x[k] * w[k];
        t_wp += y[k] * w[k];
      }
      if (wtr) {
        T z[VEC];
        load<S, VEC>(wtr, i, z);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          p_wt += x[k] * z[k];
          t_wt += y[k] * z[k];
        }
      }
    }
    const auto c = bm::hvp_coef(r, gr, warp_sum(p_wp), warp_sum(t_wp), warp_sum(p_wt), warp_sum(t_wt));
    if (lane == 0) dg[j * B + row] = from_acc<S>(c.dg);
    hvp_row_outputs<S, VEC>(c, pr, tr, wpr, wtr, dp + off, dt ? dt + off : nullptr, D, lane);
  }
}

bool aligned16(const void* ptr) { return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// Runs `launch.template operator()<S, VEC>()` with 16-byte vectors when D and every pointer allow it.
template <typename S, typename F>
cudaError_t with_vec(int64_t D, bool all_aligned, F&& launch) {
  constexpr int kVec = 16 / sizeof(S);
  if (all_aligned && D % kVec == 0) {
    launch(Pack<S, kVec>{});
  } else {
    launch(Pack<S, 1>{});
  }
  return cudaGetLastError();
}

template <typename F>
cudaError_t dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat:
      return f(float{});
    case DType::kDouble:
      return f(double{});
    case DType::kHalf:
      return f(__half{});
    case DType::kBFloat16:
      return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

dim3 grid_for(int64_t B) { return dim3(static_cast<unsigned>((B + kRowsPerBlock - 1) / kRowsPerBlock)); }
constexpr int kThreads = kWarp * kRowsPerBlock;

}  // namespace

cudaError_t fwd(DType dtype, const void* p, const void* t, void* out, int64_t B, int64_t D, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;  // an empty grid is a launch error
  return dispatch(dtype, [&](auto tag) {
    using S = decltype(tag);
    return with_vec<S>(D, aligned16(p) && aligned16(t), [&](auto pack) {
      constexpr int V = decltype(pack)::kVec;
      fwd_kernel<S, V><<<grid_for(B), kThreads, 0, stream>>>(static_cast<const S*>(p), static_cast<const S*>(t),
                                                             static_cast<S*>(out), B, D);
    });
  });
}

cudaError_t bwd(DType dtype, const void* g, const void* p, const void* t, void* dp, void* dt, int64_t B, int64_t D,
                cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using S = decltype(tag);
    const bool al = aligned16(p) && aligned16(t) && aligned16(dp) && aligned16(dt);
    return with_vec<S>(D, al, [&](auto pack) {
      constexpr int V = decltype(pack)::kVec;
      bwd_kernel<S, V><<<grid_for(B), kThreads, 0, stream>>>(static_cast<const S*>(g), static_cast<const S*>(p),
                                                             static_cast<const S*>(t), static_cast<S*>(dp),
                                                             static_cast<S*>(dt), B, D);
    });
  });
}

cudaError_t hvp(DType dtype, const void* g, const void* p, const void* t, const void* wp, const void* wt, void* dg,
                void* dp, void* dt, int64_t B, int64_t D, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using S = decltype(tag);
    const bool al = aligned16(p) && aligned16(t) && aligned16(wp) && aligned16(wt) && aligned16(dp) && aligned16(dt);
    return with_vec<S>(D, al, [&](auto pack) {
      constexpr int V = decltype(pack)::kVec;
      hvp_kernel<S, V><<<grid_for(B), kThreads, 0, stream>>>(
          static_cast<const S*>(g), static_cast<const S*>(p), static_cast<const S*>(t), static_cast<const S*>(wp),
          static_cast<const S*>(wt), static_cast<S*>(dg), static_cast<S*>(dp), static_cast<S*>(dt), B, D);
    });
  });
}

cudaError_t hvp_batched(DType dtype, const void* g, const void* p, const void* t, const void* wp, const void* wt,
                        void* dg, void* dp, void* dt, int64_t K, int64_t B, int64_t D, cudaStream_t stream) {
  if (B == 0 || K == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using S = decltype(tag);
    const bool al = aligned16(p) && aligned16(t) && aligned16(wp) && aligned16(wt) && aligned16(dp) && aligned16(dt);
    return with_vec<S>(D, al, [&](auto pack) {
      constexpr int V = decltype(pack)::kVec;
      hvp_batched_kernel<S, V><<<grid_for(B), kThreads, 0, stream>>>(
          static_cast<const S*>(g), static_cast<const S*>(p), static_cast<const S*>(t), static_cast<const S*>(wp),
          static_cast<const S*>(wt), static_cast<S*>(dg), static_cast<S*>(dp), static_cast<S*>(dt), K, B, D);
    });
  });
}

}  // namespace byol_cuda
}  // namespace bissl_fast
