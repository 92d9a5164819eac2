// Element math and work decomposition of the fused multi-tensor vector updates of the Krylov solvers, CG
// and MINRES (docs/design.md §2.3), shared by the CPU kernel (csrc/cpu/cg_cpu.cpp), the CUDA kernels
// (csrc/cuda/cg_cuda_kernels.cu) and the C++ test (csrc/tests/test_cg_math.cpp).
//
// One CG iteration over T tensors (x, r, d owned by the solver, ad = A d from the matvec), with
// per-tensor scalars alpha_t, beta_t (layerwise CG) or one shared value (global CG):
//
//   dAd_t   = d_t . ad_t                               (cg_dot)
//   x_t    += alpha_t d_t,  r_t -= alpha_t ad_t,       (cg_update, one pass; also returns
//   rr_t    = r_t . r_t                                 the new r.r per tensor)
//   d_t     = r_t + beta_t d_t                         (cg_direction)
//
// One MINRES iteration (Paige-Saunders, as SciPy's minres without preconditioner) over the same
// tensors, with global scalars (one Krylov space for the coupled system), av = A v from the matvec:
//
//   v.av, v.r1                                          (cg_dot_pair: two dots in one pass)
//   r1 = av - c1 r1 - c2 r2;  returns r1.r1             (minres_lanczos: the next Lanczos vector,
//                                                        unnormalized, written over r1)
//   w1 = (v - oldeps w1 - delta w2) * gamma_inv;        (minres_update, one pass: the new search
//   x += phi w1;  v = y * beta_inv                       direction over w_{k-2}, the iterate, and
//                                                        the next normalized Lanczos vector)
//
// The element updates are the expressions of the reference loop (x + alpha*d, r - alpha*ad,
// r + beta*d) evaluated in the op type A (float for float/half/bfloat16 storage, double for
// double). Dot products accumulate in double over fixed chunks of kChunk elements (on the CPU in
// kLanes interleaved partial sums per chunk, on CUDA in a fixed block tree); the chunk partials of
// a tensor are then summed in chunk order, so results do not depend on the number of threads or
// blocks that ran.
//
// Work decomposition: every tensor is cut into ceil(numel / kChunk) chunks; chunk_starts[t] is the
// index of tensor t's first chunk (a prefix sum, chunk_starts[T] = total chunks). A CPU task or a
// CUDA block handles one chunk and finds its tensor by binary search over chunk_starts.
#pragma once

#include <cstdint>

#include "bissl_fast/hd.h"

namespace bissl_fast {
namespace cg {

// Elements per chunk: one CUDA block of 256 threads handles 16 elements per thread; on CPU a chunk
// is one unit of parallel work (16 KiB of float32 per operand).
constexpr int64_t kChunk = 4096;

BISSL_HD int64_t num_chunks(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

// The tensor that owns global chunk `chunk`: the largest t with chunk_starts[t] <= chunk.
// chunk_starts has T + 1 non-decreasing entries (empty tensors own no chunk).
BISSL_HD int64_t chunk_tensor(const int64_t* chunk_starts, int64_t T, int64_t chunk) {
  int64_t lo = 0, hi = T;  // invariant: chunk_starts[lo] <= chunk < chunk_starts[hi]
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (chunk_starts[mid] <= chunk) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Element range [begin, end) of `chunk` inside tensor t (numel elements).
BISSL_HD void chunk_range(const int64_t* chunk_starts, int64_t t, int64_t chunk, int64_t numel, int64_t* begin,
                          int64_t* end) {
  *begin = (chunk - chunk_starts[t]) * kChunk;
  const int64_t stop = *begin + kChunk;
  *end = stop < numel ? stop : numel;
}

// x += alpha * d and r -= alpha * ad for one element; returns the updated r.
template <typename A>
BISSL_HD A update_xr(A& x, A& r, A d, A ad, A alpha) {
  x = x + alpha * d;
  r = r - alpha * ad;
  return r;
}

// d = r + beta * d for one element.
template <typename A>
BISSL_HD A direction(A r, A d, A beta) {
  return r + beta * d;
}

// Next (unnormalized) Lanczos vector for one element: av - c1 * r1 - c2 * r2, left to right as the
// reference loop evaluates (y - (beta/oldb) r1) - (alfa/beta) r2.
template <typename A>
BISSL_HD A lanczos_next(A av, A r1, A r2, A c1, A c2) {
  return av - c1 * r1 - c2 * r2;
}

// MINRES search direction for one element: (v - oldeps * w1 - delta * w2) * gamma_inv.
template <typename A>
BISSL_HD A minres_direction(A v, A w1, A w2, A oldeps, A delta, A gamma_inv) {
  return (v - oldeps * w1 - delta * w2) * gamma_inv;
}

// Host-side dot accumulation: sum over i in [begin, end) of body(i) (a double) in kLanes
// interleaved partial sums (lane = (i - begin) % kLanes) combined in a fixed order at the end.
// Independent lanes let the compiler vectorize the loop without reassociating any sum, so the
// result is reproducible and independent of threading.
constexpr int kLanes = 8;

template <typename Body>
inline double lane_sum(int64_t begin, int64_t end, Body&& body) {
  double lane[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) lane[j] += body(i + j);
  }
  for (int j = 0; i < end; ++i, ++j) lane[j] += body(i);
  double s = 0.0;
  for (int j = 0; j < kLanes; ++j) s += lane[j];
  return s;
}

}  // namespace cg
}  // namespace bissl_fast
