// CUDA implementations of the BYOL row ops (schemas in csrc/cpu/byol_cpu.cpp): input checks,
// output allocation and launches of the kernels in byol_cuda_kernels.cu on the current stream.
// Compiled only in CUDA builds (setup.py adds csrc/cuda/ with -DBISSL_FAST_WITH_CUDA=1).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include <cuda_runtime.h>

#include "../byol_checks.h"
#include "../cuda_dtype.h"
#include "../output_alloc.h"

namespace bissl_fast {
namespace byol_cuda {

namespace {

using byol_checks::check_batch_like;
using byol_checks::check_grad;
using byol_checks::check_like;
using byol_checks::check_rows;

at::Tensor byol_fwd_cuda(const at::Tensor& p_in, const at::Tensor& t_in) {
  check_rows(p_in, t_in, "byol_fwd");
  const c10::cuda::CUDAGuard guard(p_in.device());
  const auto p = p_in.contiguous(), t = t_in.contiguous();
  const int64_t B = p.size(0), D = p.size(1);
  auto out = empty_output({B}, p.options());
  const DType dtype = cuda_dtype(p.scalar_type(), "byol_fwd");
  C10_CUDA_CHECK(fwd(dtype, p.const_data_ptr(), t.const_data_ptr(), out.mutable_data_ptr(), B, D,
                     c10::cuda::getCurrentCUDAStream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor> byol_bwd_cuda(const at::Tensor& grad_in, const at::Tensor& p_in,
                                                 const at::Tensor& t_in, bool t_grad) {
  check_rows(p_in, t_in, "byol_bwd");
  check_grad(grad_in, p_in, "byol_bwd");
  const c10::cuda::CUDAGuard guard(p_in.device());
  const auto p = p_in.contiguous(), t = t_in.contiguous(), grad = grad_in.contiguous();
  const int64_t B = p.size(0), D = p.size(1);
  auto dp = empty_output_like(p);
  auto dt = t_grad ? empty_output_like(t) : at::empty({0}, p.options());
  const DType dtype = cuda_dtype(p.scalar_type(), "byol_bwd");
  C10_CUDA_CHECK(bwd(dtype, grad.const_data_ptr(), p.const_data_ptr(), t.const_data_ptr(),
                     dp.mutable_data_ptr(), t_grad ? dt.mutable_data_ptr() : nullptr, B, D,
                     c10::cuda::getCurrentCUDAStream()));
  return {dp, dt};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> byol_hvp_cuda(const at::Tensor& grad_in, const at::Tensor& p_in,
                                                             const at::Tensor& t_in, const at::Tensor& wp_in,
                                                             const std::optional<at::Tensor>& wt_opt, bool t_grad) {
  check_rows(p_in, t_in, "byol_hvp");
  check_grad(grad_in, p_in, "byol_hvp");
  check_like(wp_in, p_in, "wp", "byol_hvp");
  if (wt_opt.has_value()) check_like(*wt_opt, p_in, "wt", "byol_hvp");
  const c10::cuda::CUDAGuard guard(p_in.device());
  const auto p = p_in.contiguous(), t = t_in.contiguous(), grad = grad_in.contiguous(), wp = wp_in.contiguous();
  const at::Tensor wt = wt_opt.has_value() ? wt_opt->contiguous() : at::Tensor();
  const int64_t B = p.size(0), D = p.size(1);
  auto dgrad = empty_output({B}, p.options());
  auto dp = empty_output_like(p);
  auto dt = t_grad ? empty_output_like(t) : at::empty({0}, p.options());
  const DType dtype = cuda_dtype(p.scalar_type(), "byol_hvp");
  C10_CUDA_CHECK(hvp(dtype, grad.const_data_ptr(), p.const_data_ptr(), t.const_data_ptr(),
                     wp.const_data_ptr(), wt.defined() ? wt.const_data_ptr() : nullptr, dgrad.mutable_data_ptr(),
                     dp.mutable_data_ptr(), t_grad ? dt.mutable_data_ptr() : nullptr, B, D,
                     c10::cuda::getCurrentCUDAStream()));
  return {dgrad, dp, dt};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> byol_hvp_batched_cuda(const at::Tensor& grad_in,
                                                                     const at::Tensor& p_in, const at::Tensor& t_in,
                                                                     const at::Tensor& wp_in,
                                                                     const std::optional<at::Tensor>& wt_opt,
                                                                     bool t_grad) {
  const char* op = "byol_hvp_batched";
  check_rows(p_in, t_in, op);
  check_grad(grad_in, p_in, op);
  check_batch_like(wp_in, p_in, "wp", op);
  if (wt_opt.has_value()) {
    check_batch_like(*wt_opt, p_in, "wt", op);
    TORCH_CHECK(wt_opt->size(0) == wp_in.size(0), op, ": wp and wt must hold the same number of cotangents, got ",
                wp_in.size(0), " and ", wt_opt->size(0));
  }
  const c10::cuda::CUDAGuard guard(p_in.device());
  const auto p = p_in.contiguous(), t = t_in.contiguous(), grad = grad_in.contiguous(), wp = wp_in.contiguous();
  const at::Tensor wt = wt_opt.has_value() ? wt_opt->contiguous() : at::Tensor();
  const int64_t K = wp.size(0), B = p.size(0), D = p.size(1);
  auto dgrad = empty_output({K, B}, p.options());
  auto dp = empty_output({K, B, D}, p.options());
  auto dt = t_grad ? empty_output({K, B, D}, p.options()) : at::empty({0}, p.options());
  const DType dtype = cuda_dtype(p.scalar_type(), op);
  C10_CUDA_CHECK(hvp_batched(dtype, grad.const_data_ptr(), p.const_data_ptr(), t.const_data_ptr(),
                             wp.const_data_ptr(), wt.defined() ? wt.const_data_ptr() : nullptr,
                             dgrad.mutable_data_ptr(), dp.mutable_data_ptr(),
                             t_grad ? dt.mutable_data_ptr() : nullptr, K, B, D, c10::cuda::getCurrentCUDAStream()));
  return {dgrad, dp, dt};
}

}  // namespace

TORCH_LIBRARY_IMPL(bissl_fast, CUDA, m) {
  m.impl("byol_fwd", &byol_fwd_cuda);
  m.impl("byol_bwd", &byol_bwd_cuda);
  m.impl("byol_hvp", &byol_hvp_cuda);
  m.impl("byol_hvp_batched", &byol_hvp_batched_cuda);
}

}  // namespace byol_cuda
}  // namespace bissl_fast
