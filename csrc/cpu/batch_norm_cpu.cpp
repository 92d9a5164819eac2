// BatchNorm ops (docs/design.md §2.3): schemas and CPU kernels.
//
//   batch_norm_fwd(input, weight?, bias?, running_mean?, running_var?, training, momentum, eps)
//       -> (out, save_mean, save_invstd, new_running_mean, new_running_var)
//   batch_norm_bwd(grad_out, input, weight?, save_mean, save_invstd, training, output_mask)
//       -> (grad_input, grad_weight, grad_bias)                       vjp of batch_norm_fwd
//   batch_norm_dbwd(ggI?, ggW?, ggB?, grad_out, input, weight?, save_mean, save_invstd, training, output_mask)
//       -> (grad_input, grad_grad_out, grad_weight)                   vjp of batch_norm_bwd
//
// input is [N, C, *]; per-channel tensors are [C]. save_mean/save_invstd are in the accumulation dtype
// (float for float/bf16/half, double for double): the batch statistics in training, the running ones
// (as 1/sqrt(running_var + eps)) in eval. The forward is functional: it returns the updated running
// statistics (PyTorch's formula, unbiased variance) and the caller copies them into its buffers, so the
// op needs no mutable arguments and has autograd; both are empty [0] tensors unless training with
// running statistics. batch_norm_dbwd differentiates through save_mean/save_invstd as functions of input
// when training (they must be the batch statistics of input). Outputs not in output_mask are empty [0].
// The arithmetic lives in bissl_fast/batch_norm_math.h, shared with the CUDA kernels; the autograd
// formulas that chain the three ops are registered from Python (bissl_fast/ops/batch_norm.py).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <array>
#include <vector>

#include "../batch_norm_checks.h"
#include "../output_alloc.h"
#include "bissl_fast/batch_norm_math.h"

namespace bissl_fast {
namespace {

namespace bn = batch_norm;
namespace chk = batch_norm_checks;

// Channels per parallel task: enough elements that the task outweighs the scheduling cost.
int64_t grain(const chk::Layout& ly) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(ly.n * ly.l, 1));
}

// Calls f(k, offset) for every contiguous run of channels c0 + k in [c0, c1): run n of channel c
// starts at (n C + c) L. Looping n outside keeps [N, C] inputs (L = 1) walking memory in order.
template <typename F>
void for_runs(const chk::Layout& ly, int64_t c0, int64_t c1, F&& f) {
  for (int64_t n = 0; n < ly.n; ++n) {
    for (int64_t c = c0; c < c1; ++c) f(c - c0, (n * ly.c + c) * ly.l);
  }
}

at::Tensor empty_channel_output(bool wanted, int64_t c, const at::TensorOptions& opts) {
  return wanted ? empty_output({c}, opts) : at::empty({0}, opts);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_fwd_cpu(
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
  const auto input = input_in.contiguous();
  const auto ly = chk::layout_of(input);
  const int64_t M = ly.n * ly.l;
  TORCH_CHECK(!training || M > 1, op, ": expected more than 1 value per channel when training, got input shape ",
              input.sizes());
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "batch_norm_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    const acc_t* wp = w.const_data_ptr<acc_t>();
    const acc_t* bp = b.const_data_ptr<acc_t>();
    acc_t* meanp = save_mean.mutable_data_ptr<acc_t>();
    acc_t* invp = save_invstd.mutable_data_ptr<acc_t>();
    const acc_t mom = static_cast<acc_t>(momentum), ep = static_cast<acc_t>(eps), m = static_cast<acc_t>(M);
    at::parallel_for(0, C, grain(ly), [&](int64_t c0, int64_t c1) {
      const int64_t nc = c1 - c0;
      if (training) {
        // Two sweeps for the statistics (mean, then the centred sum of squares, as PyTorch), which
        // keeps the variance accurate when |mean| >> std; a channel block stays in cache between them.
        std::vector<acc_t> sum(nc, acc_t(0));
        for_runs(ly, c0, c1, [&](int64_t k, int64_t off) { sum[k] += bn::row_sum<acc_t>(x + off, ly.l); });
        for (int64_t k = 0; k < nc; ++k) sum[k] /= m;
        std::vector<acc_t> var_sum(nc, acc_t(0));
        for_runs(ly, c0, c1, [&](int64_t k, int64_t off) {
          var_sum[k] += bn::row_sum_sq_dev<acc_t>(x + off, ly.l, sum[k]);
        });
        for (int64_t k = 0; k < nc; ++k) {
          const int64_t c = c0 + k;
          meanp[c] = sum[k];
          invp[c] = bn::inv_sqrt(var_sum[k] / m + ep);
          if (update) {
            new_rm.mutable_data_ptr<acc_t>()[c] = bn::running_update(rm.const_data_ptr<acc_t>()[c], sum[k], mom);
            new_rv.mutable_data_ptr<acc_t>()[c] =
                bn::running_update(rv.const_data_ptr<acc_t>()[c], var_sum[k] / (m - acc_t(1)), mom);
          }
        }
      } else {
        for (int64_t c = c0; c < c1; ++c) {
          meanp[c] = rm.const_data_ptr<acc_t>()[c];
          invp[c] = bn::inv_sqrt(rv.const_data_ptr<acc_t>()[c] + ep);
        }
      }
      std::vector<bn::FwdCoef<acc_t>> coef(nc);
      for (int64_t k = 0; k < nc; ++k) coef[k] = bn::fwd_coef(meanp[c0 + k], invp[c0 + k], wp[c0 + k], bp[c0 + k]);
      for_runs(ly, c0, c1, [&](int64_t k, int64_t off) {
        const acc_t alpha = coef[k].alpha, beta = coef[k].beta;
        const scalar_t* xr = x + off;
        scalar_t* yr = y + off;
        for (int64_t i = 0; i < ly.l; ++i) yr[i] = static_cast<scalar_t>(alpha * static_cast<acc_t>(xr[i]) + beta);
      });
    });
  });
  const auto running_dtype = has_running ? running_mean->scalar_type() : chk::acc_type(input);
  return {out, save_mean, save_invstd, new_rm.to(running_dtype), new_rv.to(running_dtype)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_bwd_cpu(const at::Tensor& grad_out_in,
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
  const auto input = input_in.contiguous(), grad_out = grad_out_in.contiguous();
  const auto ly = chk::layout_of(input);
  const auto acc_opts = input.options().dtype(chk::acc_type(input));
  const auto w = chk::channel_acc(weight, input, C, 1.0);
  const auto mean = chk::channel_acc(save_mean_in, input, C, 0.0);
  const auto invstd = chk::channel_acc(save_invstd_in, input, C, 1.0);
  const bool want_gx = output_mask[0], want_gw = output_mask[1], want_gb = output_mask[2];
  const bool need_sums = training || want_gw || want_gb;
  auto gx = want_gx ? empty_output_like(input) : at::empty({0}, input.options());
  auto gw = empty_channel_output(want_gw, C, acc_opts);
  auto gb = empty_channel_output(want_gb, C, acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "batch_norm_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const scalar_t* g = grad_out.const_data_ptr<scalar_t>();
    scalar_t* gxp = want_gx ? gx.mutable_data_ptr<scalar_t>() : nullptr;
    const acc_t* wp = w.const_data_ptr<acc_t>();
    const acc_t* meanp = mean.const_data_ptr<acc_t>();
    const acc_t* invp = invstd.const_data_ptr<acc_t>();
    const acc_t m = static_cast<acc_t>(ly.n * ly.l);
    at::parallel_for(0, C, grain(ly), [&](int64_t c0, int64_t c1) {
      const int64_t nc = c1 - c0;
      std::vector<acc_t> s_g(nc, acc_t(0)), s_gx(nc, acc_t(0));
      if (need_sums) {
        for_runs(ly, c0, c1, [&](int64_t k, int64_t off) {
          bn::row_sums_bwd<acc_t>(g + off, x + off, ly.l, meanp[c0 + k], s_g[k], s_gx[k]);
        });
      }
      std::vector<bn::BwdCoef<acc_t>> coef(nc);
      for (int64_t k = 0; k < nc; ++k) {
        const int64_t c = c0 + k;
        coef[k] = bn::bwd_coef(training, m, invp[c], wp[c], s_g[k], s_gx[k]);
        if (want_gw) gw.mutable_data_ptr<acc_t>()[c] = coef[k].gw;
        if (want_gb) gb.mutable_data_ptr<acc_t>()[c] = coef[k].gb;
      }
      if (!want_gx) return;
      for_runs(ly, c0, c1, [&](int64_t k, int64_t off) {
        const acc_t k_g = coef[k].k_g, k_x = coef[k].k_x, k_0 = coef[k].k_0, mu = meanp[c0 + k];
        const scalar_t* xr = x + off;
        const scalar_t* gr = g + off;
        scalar_t* outr = gxp + off;
        for (int64_t i = 0; i < ly.l; ++i) {
          outr[i] = static_cast<scalar_t>(k_g * static_cast<acc_t>(gr[i]) + k_x * (static_cast<acc_t>(xr[i]) - mu) +
                                          k_0);
        }
      });
    });
  });
  const auto param_dtype = chk::present(weight) ? weight->scalar_type() : input.scalar_type();
  return {gx, gw.to(param_dtype), gb.to(param_dtype)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_dbwd_cpu(
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
  const auto input = input_in.contiguous(), grad_out = grad_out_in.contiguous();
  const at::Tensor ggi = chk::present(ggi_opt) ? ggi_opt->contiguous() : at::Tensor();
  const auto ly = chk::layout_of(input);
  const auto acc_opts = input.options().dtype(chk::acc_type(input));
  const auto w = chk::channel_acc(weight, input, C, 1.0);
  const auto mean = chk::channel_acc(save_mean_in, input, C, 0.0);
  const auto invstd = chk::channel_acc(save_invstd_in, input, C, 1.0);
  const auto ggw = chk::channel_acc(ggw_opt, input, C, 0.0);
  const auto ggb = chk::channel_acc(ggb_opt, input, C, 0.0);
  const bool want_gi = output_mask[0], want_gg = output_mask[1], want_gw = output_mask[2];
  auto gi = want_gi ? empty_output_like(input) : at::empty({0}, input.options());
  auto gg = want_gg ? empty_output_like(input) : at::empty({0}, input.options());
  auto gw = empty_channel_output(want_gw, C, acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "batch_norm_dbwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const scalar_t* g = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* ggx = ggi.defined() ? ggi.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* gip = want_gi ? gi.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* ggp = want_gg ? gg.mutable_data_ptr<scalar_t>() : nullptr;
    const acc_t* wp = w.const_data_ptr<acc_t>();
    const acc_t* meanp = mean.const_data_ptr<acc_t>();
    const acc_t* invp = invstd.const_data_ptr<acc_t>();
    const acc_t* ggwp = ggw.const_data_ptr<acc_t>();
    const acc_t* ggbp = ggb.const_data_ptr<acc_t>();
    const acc_t m = static_cast<acc_t>(ly.n * ly.l);
    at::parallel_for(0, C, grain(ly), [&](int64_t c0, int64_t c1) {
      const int64_t nc = c1 - c0;
      std::vector<acc_t> s_g(nc, acc_t(0)), s_gx(nc, acc_t(0)), s_gg(nc, acc_t(0)), s_ggx(nc, acc_t(0)),
          s_ggg(nc, acc_t(0));
      // One sweep over (g, x, ggx) for every per-channel sum.
      for_runs(ly, c0, c1, [&](int64_t k, int64_t off) {
        const acc_t mu = meanp[c0 + k];
        bn::row_sums_bwd<acc_t>(g + off, x + off, ly.l, mu, s_g[k], s_gx[k]);
        if (ggx) bn::row_sums_dbwd<acc_t>(ggx + off, g + off, x + off, ly.l, mu, s_gg[k], s_ggx[k], s_ggg[k]);
      });
      std::vector<bn::DbwdCoef<acc_t>> coef(nc);
      for (int64_t k = 0; k < nc; ++k) {
        const int64_t c = c0 + k;
        coef[k] = bn::dbwd_coef(training, m, invp[c], wp[c], s_g[k], s_gx[k], s_gg[k], s_ggx[k], s_ggg[k], ggwp[c],
                                ggbp[c]);
        if (want_gw) gw.mutable_data_ptr<acc_t>()[c] = coef[k].gw;
      }
      if (!want_gi && !want_gg) return;
      // One sweep writing both full-size outputs; a branch-free loop per case, so each vectorizes.
      for_runs(ly, c0, c1, [&](int64_t k, int64_t off) {
        const auto& q = coef[k];
        const acc_t mu = meanp[c0 + k];
        const scalar_t* xr = x + off;
        const scalar_t* gr = g + off;
        const scalar_t* ggr = ggx ? ggx + off : nullptr;
        scalar_t* gir = gip ? gip + off : nullptr;
        scalar_t* ggo = ggp ? ggp + off : nullptr;
        if (ggr) {
          if (gir) {
            for (int64_t i = 0; i < ly.l; ++i) {
              const acc_t xc = static_cast<acc_t>(xr[i]) - mu, gv = gr[i], ggv = ggr[i];
              gir[i] = static_cast<scalar_t>(q.i_g * gv + q.i_x * xc + q.i_gg * ggv + q.i_0);
            }
          }
          if (ggo) {
            for (int64_t i = 0; i < ly.l; ++i) {
              const acc_t xc = static_cast<acc_t>(xr[i]) - mu, ggv = ggr[i];
              ggo[i] = static_cast<scalar_t>(q.o_gg * ggv + q.o_x * xc + q.o_0);
            }
          }
        } else {
          if (gir) {
            for (int64_t i = 0; i < ly.l; ++i) {
              const acc_t xc = static_cast<acc_t>(xr[i]) - mu, gv = gr[i];
              gir[i] = static_cast<scalar_t>(q.i_g * gv + q.i_x * xc + q.i_0);
            }
          }
          if (ggo) {
            for (int64_t i = 0; i < ly.l; ++i) {
              const acc_t xc = static_cast<acc_t>(xr[i]) - mu;
              ggo[i] = static_cast<scalar_t>(q.o_x * xc + q.o_0);
            }
          }
        }
      });
    });
  });
  const auto param_dtype = chk::present(weight) ? weight->scalar_type() : input.scalar_type();
  return {gi, gg, gw.to(param_dtype)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bissl_fast, m) {
  m.def(
      "batch_norm_fwd(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean, Tensor? running_var, "
      "bool training, float momentum, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "batch_norm_bwd(Tensor grad_out, Tensor input, Tensor? weight, Tensor save_mean, Tensor save_invstd, "
      "bool training, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  m.def(
      "batch_norm_dbwd(Tensor? ggI, Tensor? ggW, Tensor? ggB, Tensor grad_out, Tensor input, Tensor? weight, "
      "Tensor save_mean, Tensor save_invstd, bool training, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bissl_fast, CPU, m) {
  m.impl("batch_norm_fwd", &batch_norm_fwd_cpu);
  m.impl("batch_norm_bwd", &batch_norm_bwd_cpu);
  m.impl("batch_norm_dbwd", &batch_norm_dbwd_cpu);
}

}  // namespace bissl_fast
