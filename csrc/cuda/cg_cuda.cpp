// Torch glue of the CUDA CG and MINRES vector kernels (csrc/cuda/cg_cuda_kernels.cu); compiled only in CUDA builds.
// Validates the lists (same checks as the CPU ops), builds the device table of chunk starts,
// sizes and data pointers (one pinned host buffer, one async copy on the current stream), and
// calls the launchers. Schemas and semantics: csrc/cpu/cg_cpu.cpp.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <utility>
#include <vector>

#include "../cg_checks.h"
#include "../cuda_dtype.h"
#include "../output_alloc.h"
#include "bissl_fast/cg_math.h"

namespace bissl_fast {
namespace cg {

using cg_checks::check_lists;
using cg_checks::check_scalars;
using cg_checks::chunk_starts;

namespace {

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

// Device table (layout in cg_cuda_kernels.cu): chunk_starts[T+1], numel[T], then T pointers per list.
at::Tensor device_table(const std::vector<at::TensorList>& lists, const std::vector<int64_t>& starts) {
  const int64_t T = static_cast<int64_t>(lists[0].size());
  const int64_t words = 2 * T + 1 + static_cast<int64_t>(lists.size()) * T;
  auto host = at::empty({words}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* h = host.data_ptr<int64_t>();
  for (int64_t t = 0; t <= T; ++t) h[t] = starts[t];
  for (int64_t t = 0; t < T; ++t) h[T + 1 + t] = lists[0][t].numel();
  for (size_t l = 0; l < lists.size(); ++l) {
    for (int64_t t = 0; t < T; ++t) {
      h[2 * T + 1 + static_cast<int64_t>(l) * T + t] =
          static_cast<int64_t>(reinterpret_cast<uintptr_t>(lists[l][t].const_data_ptr()));
    }
  }
  // The caching host allocator records the copy's stream, so the pinned buffer is not reused early.
  return host.to(at::TensorOptions().device(lists[0][0].device()), /*non_blocking=*/true);
}

struct Scratch {
  at::Tensor partials, ticket, out;
};

// Scratch of an op with K dots per pass: partials [K * chunks], the ticket, and the output ([T], or [K, T]).
Scratch scratch(const at::Tensor& like, int64_t chunks, int64_t T, int64_t K = 1) {
  const auto opts = at::TensorOptions().device(like.device());
  // partials and ticket are scratch; out is the op's output (NaN-poisoned under the test suite).
  const auto out_shape = K == 1 ? std::vector<int64_t>{T} : std::vector<int64_t>{K, T};
  return {at::empty({K * chunks}, opts.dtype(at::kDouble)), at::empty({1}, opts.dtype(at::kInt)),
          empty_output(out_shape, opts.dtype(at::kDouble))};
}

at::Tensor cg_dot_cuda(at::TensorList a, at::TensorList b) {
  check_lists("cg_dot", {{"a", a}, {"b", b}});
  const c10::cuda::CUDAGuard guard(a[0].device());
  const auto starts = chunk_starts(a);
  const int64_t T = static_cast<int64_t>(a.size()), chunks = starts.back();
  if (chunks == 0) return at::zeros({T}, a[0].options().dtype(at::kDouble));
  const auto table = device_table({a, b}, starts);
  auto s = scratch(a[0], chunks, T);
  check_launch(launch_cg_dot(cuda_dtype(a[0].scalar_type(), "cg_dot"), table.const_data_ptr<int64_t>(), T, chunks,
                             s.partials.data_ptr<double>(), reinterpret_cast<unsigned int*>(s.ticket.data_ptr<int>()),
                             s.out.data_ptr<double>(), c10::cuda::getCurrentCUDAStream().stream()),
               "cg_dot");
  return s.out;
}

at::Tensor cg_update_cuda(at::TensorList x, at::TensorList r, at::TensorList d, at::TensorList ad,
                          const at::Tensor& alpha) {
  check_lists("cg_update", {{"x", x}, {"r", r}, {"d", d}, {"ad", ad}});
  check_scalars("cg_update", "alpha", alpha, x);
  const c10::cuda::CUDAGuard guard(x[0].device());
  const auto starts = chunk_starts(x);
  const int64_t T = static_cast<int64_t>(x.size()), chunks = starts.back();
  if (chunks == 0) return at::zeros({T}, x[0].options().dtype(at::kDouble));
  const auto table = device_table({x, r, d, ad}, starts);
  const auto alpha_c = alpha.contiguous();
  auto s = scratch(x[0], chunks, T);
  check_launch(launch_cg_update(cuda_dtype(x[0].scalar_type(), "cg_update"), table.const_data_ptr<int64_t>(), T, chunks,
                                alpha_c.const_data_ptr<double>(), s.partials.data_ptr<double>(),
                                reinterpret_cast<unsigned int*>(s.ticket.data_ptr<int>()), s.out.data_ptr<double>(),
                                c10::cuda::getCurrentCUDAStream().stream()),
               "cg_update");
  return s.out;
}

void cg_direction_cuda(at::TensorList d, at::TensorList r, const at::Tensor& beta) {
  check_lists("cg_direction", {{"d", d}, {"r", r}});
  check_scalars("cg_direction", "beta", beta, d);
  const c10::cuda::CUDAGuard guard(d[0].device());
  const auto starts = chunk_starts(d);
  const int64_t T = static_cast<int64_t>(d.size()), chunks = starts.back();
  if (chunks == 0) return;
  const auto table = device_table({d, r}, starts);
  const auto beta_c = beta.contiguous();
  const DType dtype = cuda_dtype(d[0].scalar_type(), "cg_direction");
  check_launch(launch_cg_direction(dtype, table.const_data_ptr<int64_t>(), T, chunks, beta_c.const_data_ptr<double>(),
                                   c10::cuda::getCurrentCUDAStream().stream()),
               "cg_direction");
}

at::Tensor cg_dot_pair_cuda(at::TensorList a, at::TensorList b, at::TensorList c) {
  check_lists("cg_dot_pair", {{"a", a}, {"b", b}, {"c", c}});
  const c10::cuda::CUDAGuard guard(a[0].device());
  const auto starts = chunk_starts(a);
  const int64_t T = static_cast<int64_t>(a.size()), chunks = starts.back();
  if (chunks == 0) return at::zeros({2, T}, a[0].options().dtype(at::kDouble));
  const auto table = device_table({a, b, c}, starts);
  auto s = scratch(a[0], chunks, T, 2);
  check_launch(launch_cg_dot_pair(cuda_dtype(a[0].scalar_type(), "cg_dot_pair"), table.const_data_ptr<int64_t>(), T,
                                  chunks, s.partials.data_ptr<double>(),
                                  reinterpret_cast<unsigned int*>(s.ticket.data_ptr<int>()), s.out.data_ptr<double>(),
                                  c10::cuda::getCurrentCUDAStream().stream()),
               "cg_dot_pair");
  return s.out;
}

at::Tensor minres_lanczos_cuda(at::TensorList r1, at::TensorList av, at::TensorList r2, double c1, double c2) {
  check_lists("minres_lanczos", {{"r1", r1}, {"av", av}, {"r2", r2}});
  const c10::cuda::CUDAGuard guard(r1[0].device());
  const auto starts = chunk_starts(r1);
  const int64_t T = static_cast<int64_t>(r1.size()), chunks = starts.back();
  if (chunks == 0) return at::zeros({T}, r1[0].options().dtype(at::kDouble));
  const auto table = device_table({r1, av, r2}, starts);
  auto s = scratch(r1[0], chunks, T);
  check_launch(launch_minres_lanczos(cuda_dtype(r1[0].scalar_type(), "minres_lanczos"), table.const_data_ptr<int64_t>(),
                                     T, chunks, c1, c2, s.partials.data_ptr<double>(),
                                     reinterpret_cast<unsigned int*>(s.ticket.data_ptr<int>()),
                                     s.out.data_ptr<double>(), c10::cuda::getCurrentCUDAStream().stream()),
               "minres_lanczos");
  return s.out;
}

void minres_update_cuda(at::TensorList w1, at::TensorList x, at::TensorList v, at::TensorList w2, at::TensorList y,
                        double oldeps, double delta, double gamma_inv, double phi, double beta_inv) {
  check_lists("minres_update", {{"w1", w1}, {"x", x}, {"v", v}, {"w2", w2}, {"y", y}});
  const c10::cuda::CUDAGuard guard(w1[0].device());
  const auto starts = chunk_starts(w1);
  const int64_t T = static_cast<int64_t>(w1.size()), chunks = starts.back();
  if (chunks == 0) return;
  const auto table = device_table({w1, x, v, w2, y}, starts);
  check_launch(launch_minres_update(cuda_dtype(w1[0].scalar_type(), "minres_update"), table.const_data_ptr<int64_t>(),
                                    T, chunks, MinresScalars{oldeps, delta, gamma_inv, phi, beta_inv},
                                    c10::cuda::getCurrentCUDAStream().stream()),
               "minres_update");
}

}  // namespace
}  // namespace cg
}  // namespace bissl_fast

TORCH_LIBRARY_IMPL(bissl_fast, CUDA, m) {
  m.impl("cg_dot", &bissl_fast::cg::cg_dot_cuda);
  m.impl("cg_update", &bissl_fast::cg::cg_update_cuda);
  m.impl("cg_direction", &bissl_fast::cg::cg_direction_cuda);
  m.impl("cg_dot_pair", &bissl_fast::cg::cg_dot_pair_cuda);
  m.impl("minres_lanczos", &bissl_fast::cg::minres_lanczos_cuda);
  m.impl("minres_update", &bissl_fast::cg::minres_update_cuda);
}
