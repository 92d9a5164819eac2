// BYOL normalized-regression row ops (DESIGN.md §2.2): schemas and CPU kernels.
//
//   byol_fwd(p, t)                              -> loss [B]        2 - 2 cos(p_b, t_b)
//   byol_bwd(grad, p, t, t_grad)                -> (dp, dt)        vjp of byol_fwd
//   byol_hvp(grad, p, t, wp, wt?, t_grad)       -> (dgrad, dp, dt) vjp of byol_bwd (double backward)
//
// p, t, wp, wt are [B, D]; grad and dgrad are [B]. dt is [B, D] when t_grad, else an empty [0]
// tensor (targets are normally detached, so the kernel skips that write). An absent wt is a zero
// cotangent. The arithmetic lives in bissl_fast/byol_math.h, shared with the CUDA kernel; the
// autograd formulas that chain the three ops are registered from Python (bissl_fast/byol.py).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include "../byol_checks.h"
#include "../output_alloc.h"
#include "bissl_fast/byol_math.h"

namespace bissl_fast {
namespace {

namespace bm = byol;

using byol_checks::check_grad;
using byol_checks::check_like;
using byol_checks::check_rows;

// Rows per parallel task: enough elements that the task outweighs the scheduling cost.
int64_t grain(int64_t d) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(d, 1));
}

at::Tensor byol_fwd_cpu(const at::Tensor& p_in, const at::Tensor& t_in) {
  check_rows(p_in, t_in, "byol_fwd");
  const auto p = p_in.contiguous(), t = t_in.contiguous();
  const int64_t B = p.size(0), D = p.size(1);
  auto out = empty_output({B}, p.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.scalar_type(), "byol_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pp = p.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, grain(D), [&](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b) {
        const auto row = bm::row_from<acc_t>(pp + b * D, tp + b * D, D);
        o[b] = static_cast<scalar_t>(bm::loss(row));
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> byol_bwd_cpu(const at::Tensor& grad_in, const at::Tensor& p_in,
                                                const at::Tensor& t_in, bool t_grad) {
  check_rows(p_in, t_in, "byol_bwd");
  check_grad(grad_in, p_in, "byol_bwd");
  const auto p = p_in.contiguous(), t = t_in.contiguous(), grad = grad_in.contiguous();
  const int64_t B = p.size(0), D = p.size(1);
  auto dp = empty_output_like(p);
  auto dt = t_grad ? empty_output_like(t) : at::empty({0}, p.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.scalar_type(), "byol_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pp = p.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    scalar_t* dpp = dp.mutable_data_ptr<scalar_t>();
    scalar_t* dtp = t_grad ? dt.mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, B, grain(D), [&](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b) {
        const scalar_t* pr = pp + b * D;
        const scalar_t* tr = tp + b * D;
        const auto row = bm::row_from<acc_t>(pr, tr, D);
        const auto k = bm::grad_coef(row, static_cast<acc_t>(g[b]));
        // Separate loops without branches, so each one vectorizes.
        scalar_t* dpr = dpp + b * D;
        for (int64_t i = 0; i < D; ++i) {
          dpr[i] = static_cast<scalar_t>(k.p_p * static_cast<acc_t>(pr[i]) + k.p_t * static_cast<acc_t>(tr[i]));
        }
        if (dtp) {
          scalar_t* dtr = dtp + b * D;
          for (int64_t i = 0; i < D; ++i) {
            dtr[i] = static_cast<scalar_t>(k.t_t * static_cast<acc_t>(tr[i]) + k.t_p * static_cast<acc_t>(pr[i]));
          }
        }
      }
    });
  });
  return {dp, dt};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> byol_hvp_cpu(const at::Tensor& grad_in, const at::Tensor& p_in,
                                                            const at::Tensor& t_in, const at::Tensor& wp_in,
                                                            const std::optional<at::Tensor>& wt_opt, bool t_grad) {
  check_rows(p_in, t_in, "byol_hvp");
  check_grad(grad_in, p_in, "byol_hvp");
  check_like(wp_in, p_in, "wp", "byol_hvp");
  if (wt_opt.has_value()) check_like(*wt_opt, p_in, "wt", "byol_hvp");
  const auto p = p_in.contiguous(), t = t_in.contiguous(), grad = grad_in.contiguous(), wp = wp_in.contiguous();
  const at::Tensor wt = wt_opt.has_value() ? wt_opt->contiguous() : at::Tensor();
  const int64_t B = p.size(0), D = p.size(1);
  auto dgrad = empty_output({B}, p.options());
  auto dp = empty_output_like(p);
  auto dt = t_grad ? empty_output_like(t) : at::empty({0}, p.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.scalar_type(), "byol_hvp_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pp = p.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    const scalar_t* wpp = wp.const_data_ptr<scalar_t>();
    const scalar_t* wtp = wt.defined() ? wt.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    scalar_t* dgp = dgrad.mutable_data_ptr<scalar_t>();
    scalar_t* dpp = dp.mutable_data_ptr<scalar_t>();
    scalar_t* dtp = t_grad ? dt.mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, B, grain(D), [&](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b) {
        const scalar_t* pr = pp + b * D;
        const scalar_t* tr = tp + b * D;
        const scalar_t* wpr = wpp + b * D;
        const scalar_t* wtr = wtp ? wtp + b * D : nullptr;
        acc_t s_pp, s_tt, s_pt, s_pwp, s_twp, s_pwt = 0, s_twt = 0;
        bm::row_sums<acc_t>(pr, tr, D, s_pp, s_tt, s_pt);
        bm::row_sums_with<acc_t>(pr, tr, wpr, D, s_pwp, s_twp);
        if (wtr) bm::row_sums_with<acc_t>(pr, tr, wtr, D, s_pwt, s_twt);
        const auto row = bm::make_row<acc_t>(s_pp, s_tt, s_pt);
        const auto k = bm::hvp_coef(row, static_cast<acc_t>(g[b]), s_pwp, s_twp, s_pwt, s_twt);
        dgp[b] = static_cast<scalar_t>(k.dg);
        scalar_t* dpr = dpp + b * D;
        scalar_t* dtr = dtp ? dtp + b * D : nullptr;
        // One branch-free loop per (output, wt present) case, so each one vectorizes.
        if (wtr) {
          for (int64_t i = 0; i < D; ++i) {
            const acc_t x = pr[i], y = tr[i], w = wpr[i], z = wtr[i];
            dpr[i] = static_cast<scalar_t>(k.p_p * x + k.p_t * y + k.p_wp * w + k.p_wt * z);
          }
          if (dtr) {
            for (int64_t i = 0; i < D; ++i) {
              const acc_t x = pr[i], y = tr[i], w = wpr[i], z = wtr[i];
              dtr[i] = static_cast<scalar_t>(k.t_p * x + k.t_t * y + k.t_wp * w + k.t_wt * z);
            }
          }
        } else {
          for (int64_t i = 0; i < D; ++i) {
            const acc_t x = pr[i], y = tr[i], w = wpr[i];
            dpr[i] = static_cast<scalar_t>(k.p_p * x + k.p_t * y + k.p_wp * w);
          }
          if (dtr) {
            for (int64_t i = 0; i < D; ++i) {
              const acc_t x = pr[i], y = tr[i], w = wpr[i];
              dtr[i] = static_cast<scalar_t>(k.t_p * x + k.t_t * y + k.t_wp * w);
            }
          }
        }
      }
    });
  });
  return {dgrad, dp, dt};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bissl_fast, m) {
  m.def("byol_fwd(Tensor p, Tensor t) -> Tensor");
  m.def("byol_bwd(Tensor grad, Tensor p, Tensor t, bool t_grad) -> (Tensor, Tensor)");
  m.def("byol_hvp(Tensor grad, Tensor p, Tensor t, Tensor wp, Tensor? wt, bool t_grad) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bissl_fast, CPU, m) {
  m.impl("byol_fwd", &byol_fwd_cpu);
  m.impl("byol_bwd", &byol_bwd_cpu);
  m.impl("byol_hvp", &byol_hvp_cpu);
}

}  // namespace bissl_fast
