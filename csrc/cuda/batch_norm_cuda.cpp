// CUDA implementations of the BatchNorm ops (schemas and semantics in csrc/cpu/batch_norm_cpu.cpp):
// input checks, per-channel conversions, output allocation and launches of the kernels in
// batch_norm_cuda_kernels.cu on the current stream. Compiled only in CUDA builds.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include <cuda_runtime.h>

#include <array>
#include <vector>

#include "../batch_norm_checks.h"
#include "../cuda_dtype.h"
#include "../output_alloc.h"

namespace bissl_fast {
namespace batch_norm_cuda {

namespace {

namespace chk = batch_norm_checks;

DType dtype_of(const at::Tensor& x, const char* op) { return cuda_dtype(x.scalar_type(), op); }

void* data_or_null(at::Tensor& t) { return t.numel() > 0 ? t.mutable_data_ptr() : nullptr; }

at::Tensor empty_channel_output(bool wanted, int64_t c, const at::TensorOptions& opts) {
  return wanted ? empty_output({c}, opts) : at::empty({0}, opts);
}

void check_grid(int64_t c, const char* op) {
  TORCH_CHECK(c <= 2147483647, op, ": at most 2^31 - 1 channels, got ", c);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_fwd_cuda(
    const at::Tensor& input_in, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var, bool training,
    double momentum, double eps) {
  const char* op = "batch_norm_fwd";
  const c10::cuda::CUDAGuard guard(input_in.device());
  const auto a = chk::fwd_args(input_in, weight, bias, running_mean, running_var, training, eps, op);
  const auto &input = a.input, &w = a.w, &b = a.b, &rm = a.rm, &rv = a.rv;
  const auto& ly = a.ly;
  const auto& acc_opts = a.acc_opts;
  const int64_t C = ly.c;
  check_grid(C, op);
  const bool has_running = a.has_running, update = training && has_running;
  auto out = empty_output_like(input);
  auto save_mean = empty_output({C}, acc_opts);
  auto save_invstd = empty_output({C}, acc_opts);
  auto new_rm = empty_channel_output(update, C, acc_opts);
  auto new_rv = empty_channel_output(update, C, acc_opts);
  C10_CUDA_CHECK(fwd(dtype_of(input, op), input.const_data_ptr(), w.const_data_ptr(), b.const_data_ptr(),
                     has_running ? rm.const_data_ptr() : nullptr, has_running ? rv.const_data_ptr() : nullptr,
                     out.mutable_data_ptr(), save_mean.mutable_data_ptr(), save_invstd.mutable_data_ptr(),
                     data_or_null(new_rm), data_or_null(new_rv), ly.n, ly.c, ly.l, training, momentum, eps,
                     c10::cuda::getCurrentCUDAStream()));
  const auto running_dtype = has_running ? running_mean->scalar_type() : chk::acc_type(input);
  return {out, save_mean, save_invstd, new_rm.to(running_dtype), new_rv.to(running_dtype)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_bwd_cuda(const at::Tensor& grad_out_in,
                                                                   const at::Tensor& input_in,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   const at::Tensor& save_mean_in,
                                                                   const at::Tensor& save_invstd_in, bool training,
                                                                   std::array<bool, 3> output_mask) {
  const char* op = "batch_norm_bwd";
  const c10::cuda::CUDAGuard guard(input_in.device());
  const auto a = chk::bwd_args(grad_out_in, input_in, weight, save_mean_in, save_invstd_in, op);
  const auto &input = a.input, &grad_out = a.grad_out, &w = a.w, &mean = a.mean, &invstd = a.invstd;
  const auto& ly = a.ly;
  const auto& acc_opts = a.acc_opts;
  const int64_t C = ly.c;
  check_grid(C, op);
  auto gx = output_mask[0] ? empty_output_like(input) : at::empty({0}, input.options());
  auto gw = empty_channel_output(output_mask[1], C, acc_opts);
  auto gb = empty_channel_output(output_mask[2], C, acc_opts);
  C10_CUDA_CHECK(bwd(dtype_of(input, op), grad_out.const_data_ptr(), input.const_data_ptr(), w.const_data_ptr(),
                     mean.const_data_ptr(), invstd.const_data_ptr(), data_or_null(gx), data_or_null(gw),
                     data_or_null(gb), ly.n, ly.c, ly.l, training, c10::cuda::getCurrentCUDAStream()));
  const auto param_dtype = chk::param_dtype(weight, input);
  return {gx, gw.to(param_dtype), gb.to(param_dtype)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_dbwd_cuda(
    const std::optional<at::Tensor>& ggi_opt, const std::optional<at::Tensor>& ggw_opt,
    const std::optional<at::Tensor>& ggb_opt, const at::Tensor& grad_out_in, const at::Tensor& input_in,
    const std::optional<at::Tensor>& weight, const at::Tensor& save_mean_in, const at::Tensor& save_invstd_in,
    bool training, std::array<bool, 3> output_mask) {
  const char* op = "batch_norm_dbwd";
  const c10::cuda::CUDAGuard guard(input_in.device());
  const auto a = chk::dbwd_args(ggi_opt, ggw_opt, ggb_opt, grad_out_in, input_in, weight, save_mean_in,
                                save_invstd_in, op);
  const auto &input = a.base.input, &grad_out = a.base.grad_out, &w = a.base.w, &mean = a.base.mean,
             &invstd = a.base.invstd, &ggi = a.ggi, &ggw = a.ggw, &ggb = a.ggb;
  const auto& ly = a.base.ly;
  const auto& acc_opts = a.base.acc_opts;
  const int64_t C = ly.c;
  check_grid(C, op);
  auto gi = output_mask[0] ? empty_output_like(input) : at::empty({0}, input.options());
  auto gg = output_mask[1] ? empty_output_like(input) : at::empty({0}, input.options());
  auto gw = empty_channel_output(output_mask[2], C, acc_opts);
  C10_CUDA_CHECK(dbwd(dtype_of(input, op), ggi.defined() ? ggi.const_data_ptr() : nullptr, ggw.const_data_ptr(),
                      ggb.const_data_ptr(), grad_out.const_data_ptr(), input.const_data_ptr(), w.const_data_ptr(),
                      mean.const_data_ptr(), invstd.const_data_ptr(), data_or_null(gi), data_or_null(gg),
                      data_or_null(gw), ly.n, ly.c, ly.l, training, c10::cuda::getCurrentCUDAStream()));
  const auto param_dtype = chk::param_dtype(weight, input);
  return {gi, gg, gw.to(param_dtype)};
}

at::Tensor empty_batch_output(bool wanted, int64_t k, const at::Tensor& like) {
  if (!wanted) return at::empty({0}, like.options());
  std::vector<int64_t> sizes{k};
  sizes.insert(sizes.end(), like.sizes().begin(), like.sizes().end());
  return empty_output(sizes, like.options());
}

at::Tensor empty_batch_channel_output(bool wanted, int64_t k, int64_t c, const at::TensorOptions& opts) {
  return wanted ? empty_output({k, c}, opts) : at::empty({0}, opts);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_bwd_batched_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& input_in, const std::optional<at::Tensor>& weight,
    const at::Tensor& save_mean_in, const at::Tensor& save_invstd_in, bool training, std::array<bool, 3> output_mask) {
  const char* op = "batch_norm_bwd_batched";
  const c10::cuda::CUDAGuard guard(input_in.device());
  const auto b = chk::bwd_batched_args(grad_out_in, input_in, weight, save_mean_in, save_invstd_in, op);
  const auto& a = b.base;
  const auto& ly = a.ly;
  const int64_t C = ly.c, K = b.k;
  check_grid(C, op);
  TORCH_CHECK(K <= 65535, op, ": at most 65535 tangents per call, got ", K);
  auto gx = empty_batch_output(output_mask[0], K, a.input);
  auto gw = empty_batch_channel_output(output_mask[1], K, C, a.acc_opts);
  auto gb = empty_batch_channel_output(output_mask[2], K, C, a.acc_opts);
  C10_CUDA_CHECK(bwd_batched(dtype_of(a.input, op), a.grad_out.const_data_ptr(), a.input.const_data_ptr(),
                             a.w.const_data_ptr(), a.mean.const_data_ptr(), a.invstd.const_data_ptr(), data_or_null(gx),
                             data_or_null(gw), data_or_null(gb), K, ly.n, ly.c, ly.l, training,
                             c10::cuda::getCurrentCUDAStream()));
  const auto param_dtype = chk::param_dtype(weight, a.input);
  return {gx, gw.to(param_dtype), gb.to(param_dtype)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_dbwd_batched_cuda(
    const std::optional<at::Tensor>& ggi_opt, const std::optional<at::Tensor>& ggw_opt,
    const std::optional<at::Tensor>& ggb_opt, const at::Tensor& grad_out_in, const at::Tensor& input_in,
    const std::optional<at::Tensor>& weight, const at::Tensor& save_mean_in, const at::Tensor& save_invstd_in,
    bool training, std::array<bool, 3> output_mask) {
  const char* op = "batch_norm_dbwd_batched";
  const c10::cuda::CUDAGuard guard(input_in.device());
  const auto b = chk::dbwd_batched_args(ggi_opt, ggw_opt, ggb_opt, grad_out_in, input_in, weight, save_mean_in,
                                        save_invstd_in, op);
  const auto& a = b.base;
  const auto& ly = a.ly;
  const int64_t C = ly.c, K = b.k;
  check_grid(C, op);
  auto gi = empty_batch_output(output_mask[0], K, a.input);
  auto gg = empty_batch_output(output_mask[1], K, a.input);
  auto gw = empty_batch_channel_output(output_mask[2], K, C, a.acc_opts);
  C10_CUDA_CHECK(dbwd_batched(dtype_of(a.input, op), b.ggi.defined() ? b.ggi.const_data_ptr() : nullptr,
                              b.ggw.const_data_ptr(), b.ggb.const_data_ptr(), a.grad_out.const_data_ptr(),
                              a.input.const_data_ptr(), a.w.const_data_ptr(), a.mean.const_data_ptr(),
                              a.invstd.const_data_ptr(), data_or_null(gi), data_or_null(gg), data_or_null(gw), K, ly.n,
                              ly.c, ly.l, training, c10::cuda::getCurrentCUDAStream()));
  const auto param_dtype = chk::param_dtype(weight, a.input);
  return {gi, gg, gw.to(param_dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(bissl_fast, CUDA, m) {
  m.impl("batch_norm_fwd", &batch_norm_fwd_cuda);
  m.impl("batch_norm_bwd", &batch_norm_bwd_cuda);
  m.impl("batch_norm_dbwd", &batch_norm_dbwd_cuda);
  m.impl("batch_norm_bwd_batched", &batch_norm_bwd_batched_cuda);
  m.impl("batch_norm_dbwd_batched", &batch_norm_dbwd_batched_cuda);
}

}  // namespace batch_norm_cuda
}  // namespace bissl_fast
