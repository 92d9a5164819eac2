// Host launchers of the CUDA kernels (csrc/cuda/*_cuda_kernels.cu) and the dtype tag they
// dispatch on: the one interface between the torch glue (csrc/cuda/*_cuda.cpp) and the kernels.
// Torch-free, so every kernel file still compiles with plain nvcc; both sides include this header,
// so a signature mismatch is a compile error rather than a link error.
//
// Every launcher enqueues on `stream`, returns the launch status (it never synchronizes), and
// returns cudaErrorInvalidValue for a dtype it does not handle.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace bissl_fast {

// Element type of a kernel's tensors; the glue maps at::ScalarType onto it (csrc/cuda_dtype.h).
enum class DType : int { kFloat = 0, kDouble = 1, kHalf = 2, kBFloat16 = 3 };

namespace byol_cuda {

// BYOL row ops on row-major [B, D] inputs (csrc/cpu/byol_cpu.cpp has the op contract). `dt` may be
// null (targets without gradient); so may `wt` (a zero cotangent).
cudaError_t fwd(DType dtype, const void* p, const void* t, void* out, int64_t B, int64_t D, cudaStream_t stream);
cudaError_t bwd(DType dtype, const void* g, const void* p, const void* t, void* dp, void* dt, int64_t B, int64_t D,
                cudaStream_t stream);
cudaError_t hvp(DType dtype, const void* g, const void* p, const void* t, const void* wp, const void* wt, void* dg,
                void* dp, void* dt, int64_t B, int64_t D, cudaStream_t stream);
// byol_hvp for K cotangents: wp, wt (nullable), dp, dt (nullable) are [K, B, D], dg is [K, B].
cudaError_t hvp_batched(DType dtype, const void* g, const void* p, const void* t, const void* wp, const void* wt,
                        void* dg, void* dp, void* dt, int64_t K, int64_t B, int64_t D, cudaStream_t stream);

}  // namespace byol_cuda

namespace cg {

// Fused multi-tensor CG vector ops over T tensors. `table` is the device table laid out in
// cg_cuda_kernels.cu, `chunks` = table[T]; `partials` holds `chunks` doubles and `ticket` one
// unsigned int (scratch); `out`, `alpha` and `beta` are float64 [T] on the device.
cudaError_t launch_cg_dot(DType dtype, const int64_t* table, int64_t T, int64_t chunks, double* partials,
                          unsigned int* ticket, double* out, cudaStream_t stream);
cudaError_t launch_cg_update(DType dtype, const int64_t* table, int64_t T, int64_t chunks, const double* alpha,
                             double* partials, unsigned int* ticket, double* out, cudaStream_t stream);
cudaError_t launch_cg_direction(DType dtype, const int64_t* table, int64_t T, int64_t chunks, const double* beta,
                                cudaStream_t stream);
// Two dots per pass; `partials` holds 2 * chunks doubles, `out` is float64 [2, T].
cudaError_t launch_cg_dot_pair(DType dtype, const int64_t* table, int64_t T, int64_t chunks, double* partials,
                               unsigned int* ticket, double* out, cudaStream_t stream);
// MINRES's scalars are global (one Krylov space) and travel by value.
cudaError_t launch_minres_lanczos(DType dtype, const int64_t* table, int64_t T, int64_t chunks, double c1, double c2,
                                  double* partials, unsigned int* ticket, double* out, cudaStream_t stream);
struct MinresScalars {
  double oldeps, delta, gamma_inv, phi, beta_inv;
};
cudaError_t launch_minres_update(DType dtype, const int64_t* table, int64_t T, int64_t chunks, MinresScalars s,
                                 cudaStream_t stream);

}  // namespace cg

namespace batch_norm_cuda {

// BatchNorm ops on contiguous [n, c, l] inputs (csrc/cpu/batch_norm_cpu.cpp has the op contract).
// Per-channel tensors (weight, bias, statistics, their outputs) are in the accumulation type: float
// for float/half/bfloat16 inputs, double for double.
cudaError_t fwd(DType dtype, const void* x, const void* w, const void* b, const void* rm, const void* rv, void* y,
                void* save_mean, void* save_invstd, void* new_rm, void* new_rv, int64_t n, int64_t c, int64_t l,
                bool training, double momentum, double eps, cudaStream_t stream);
cudaError_t bwd(DType dtype, const void* g, const void* x, const void* w, const void* mean, const void* invstd,
                void* gx, void* gw, void* gb, int64_t n, int64_t c, int64_t l, bool training, cudaStream_t stream);
cudaError_t dbwd(DType dtype, const void* ggx, const void* ggw, const void* ggb, const void* g, const void* x,
                 const void* w, const void* mean, const void* invstd, void* gi, void* gg, void* gw, int64_t n,
                 int64_t c, int64_t l, bool training, cudaStream_t stream);
// The batched ops for k tangents: g, gx (bwd) and ggx, gi, gg (dbwd) are [k, n, c, l]; gw, gb, ggw, ggb
// are [k, c] (ggw, ggb always given; ggx may be null). k <= 65535 for bwd_batched (a grid dimension).
cudaError_t bwd_batched(DType dtype, const void* g, const void* x, const void* w, const void* mean, const void* invstd,
                        void* gx, void* gw, void* gb, int64_t k, int64_t n, int64_t c, int64_t l, bool training,
                        cudaStream_t stream);
cudaError_t dbwd_batched(DType dtype, const void* ggx, const void* ggw, const void* ggb, const void* g, const void* x,
                         const void* w, const void* mean, const void* invstd, void* gi, void* gg, void* gw, int64_t k,
                         int64_t n, int64_t c, int64_t l, bool training, cudaStream_t stream);

}  // namespace batch_norm_cuda
}  // namespace bissl_fast
