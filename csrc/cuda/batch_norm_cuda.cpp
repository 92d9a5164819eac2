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
  const int64_t C = chk::check_input(input_in, op);
  chk::check_optional_channel(weight, input_in, C, "weight", op);
  chk::check_optional_channel(bias, input_in, C, "bias", op);
  chk::check_optional_channel(running_mean, input_in, C, "running_mean", op);
  chk::check_optional_channel(running_var, input_in, C, "running_var", op);
  const bool has_running = chk::present(running_mean);
  TORCH_CHECK(has_running == chk::present(running_var), op,
              ": running_mean and running_var must be given together");
  TORCH_CHECK(training || has_running, op, ": eval mode (training=False) needs running_mean and running_var");
  TORCH_CHECK(eps >= 0, op, ": eps must be >= 0, got ", eps);
  check_grid(C, op);
  const c10::cuda::CUDAGuard guard(input_in.device());
  const auto input = input_in.contiguous();
  const auto ly = chk::layout_of(input);
  TORCH_CHECK(!training || ly.n * ly.l > 1, op,
              ": expected more than 1 value per channel when training, got input shape ", input.sizes());
  const bool update = training && has_running;
  const auto acc_opts = input.options().dtype(chk::acc_type(input));
  const auto w = chk::channel_acc(weight, input, C, 1.0);
  const auto b = chk::channel_acc(bias, input, C, 0.0);
  const auto rm = has_running ? chk::channel_acc(running_mean, input, C, 0.0) : at::Tensor();
  const auto rv = has_running ? chk::channel_acc(running_var, input, C, 1.0) : at::Tensor();
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
  const int64_t C = chk::check_input(input_in, op);
  chk::check_like(grad_out_in, input_in, "grad_out", op);
  chk::check_optional_channel(weight, input_in, C, "weight", op);
  chk::check_channel(save_mean_in, input_in, C, "save_mean", op);
  chk::check_channel(save_invstd_in, input_in, C, "save_invstd", op);
  check_grid(C, op);
  const c10::cuda::CUDAGuard guard(input_in.device());
  const auto input = input_in.contiguous(), grad_out = grad_out_in.contiguous();
  const auto ly = chk::layout_of(input);
  const auto acc_opts = input.options().dtype(chk::acc_type(input));
  const auto w = chk::channel_acc(weight, input, C, 1.0);
  const auto mean = chk::channel_acc(save_mean_in, input, C, 0.0);
  const auto invstd = chk::channel_acc(save_invstd_in, input, C, 1.0);
  auto gx = output_mask[0] ? empty_output_like(input) : at::empty({0}, input.options());
  auto gw = empty_channel_output(output_mask[1], C, acc_opts);
  auto gb = empty_channel_output(output_mask[2], C, acc_opts);
  C10_CUDA_CHECK(bwd(dtype_of(input, op), grad_out.const_data_ptr(), input.const_data_ptr(), w.const_data_ptr(),
                     mean.const_data_ptr(), invstd.const_data_ptr(), data_or_null(gx), data_or_null(gw),
                     data_or_null(gb), ly.n, ly.c, ly.l, training, c10::cuda::getCurrentCUDAStream()));
  const auto param_dtype = chk::present(weight) ? weight->scalar_type() : input.scalar_type();
  return {gx, gw.to(param_dtype), gb.to(param_dtype)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_dbwd_cuda(
    const std::optional<at::Tensor>& ggi_opt, const std::optional<at::Tensor>& ggw_opt,
    const std::optional<at::Tensor>& ggb_opt, const at::Tensor& grad_out_in, const at::Tensor& input_in,
    const std::optional<at::Tensor>& weight, const at::Tensor& save_mean_in, const at::Tensor& save_invstd_in,
    bool training, std::array<bool, 3> output_mask) {
  const char* op = "batch_norm_dbwd";
  const int64_t C = chk::check_input(input_in, op);
  chk::check_like(grad_out_in, input_in, "grad_out", op);
  if (chk::present(ggi_opt)) chk::check_like(*ggi_opt, input_in, "ggI", op);
  chk::check_optional_channel(ggw_opt, input_in, C, "ggW", op);
  chk::check_optional_channel(ggb_opt, input_in, C, "ggB", op);
  chk::check_optional_channel(weight, input_in, C, "weight", op);
  chk::check_channel(save_mean_in, input_in, C, "save_mean", op);
  chk::check_channel(save_invstd_in, input_in, C, "save_invstd", op);
  check_grid(C, op);
  const c10::cuda::CUDAGuard guard(input_in.device());
  const auto input = input_in.contiguous(), grad_out = grad_out_in.contiguous();
  const at::Tensor ggi = chk::present(ggi_opt) ? ggi_opt->contiguous() : at::Tensor();
  const auto ly = chk::layout_of(input);
  const auto acc_opts = input.options().dtype(chk::acc_type(input));
  const auto w = chk::channel_acc(weight, input, C, 1.0);
  const auto mean = chk::channel_acc(save_mean_in, input, C, 0.0);
  const auto invstd = chk::channel_acc(save_invstd_in, input, C, 1.0);
  const auto ggw = chk::channel_acc(ggw_opt, input, C, 0.0);
  const auto ggb = chk::channel_acc(ggb_opt, input, C, 0.0);
  auto gi = output_mask[0] ? empty_output_like(input) : at::empty({0}, input.options());
  auto gg = output_mask[1] ? empty_output_like(input) : at::empty({0}, input.options());
  auto gw = empty_channel_output(output_mask[2], C, acc_opts);
  C10_CUDA_CHECK(dbwd(dtype_of(input, op), ggi.defined() ? ggi.const_data_ptr() : nullptr, ggw.const_data_ptr(),
                      ggb.const_data_ptr(), grad_out.const_data_ptr(), input.const_data_ptr(), w.const_data_ptr(),
                      mean.const_data_ptr(), invstd.const_data_ptr(), data_or_null(gi), data_or_null(gg),
                      data_or_null(gw), ly.n, ly.c, ly.l, training, c10::cuda::getCurrentCUDAStream()));
  const auto param_dtype = chk::present(weight) ? weight->scalar_type() : input.scalar_type();
  return {gi, gg, gw.to(param_dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(bissl_fast, CUDA, m) {
  m.impl("batch_norm_fwd", &batch_norm_fwd_cuda);
  m.impl("batch_norm_bwd", &batch_norm_bwd_cuda);
  m.impl("batch_norm_dbwd", &batch_norm_dbwd_cuda);
}

}  // namespace batch_norm_cuda
}  // namespace bissl_fast
