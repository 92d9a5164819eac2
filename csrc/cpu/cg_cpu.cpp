// Fused multi-tensor vector updates of CG and MINRES (docs/design.md §2.3): schemas and CPU kernels
// (argument checks in cg_checks.h).
//
//   cg_dot(a[], b[])                      -> float64 [T]     a_t . b_t
//   cg_dot_pair(a[], b[], c[])            -> float64 [2, T]  a_t . b_t and a_t . c_t (one pass over a)
//   cg_update(x[]!, r[]!, d[], ad[], alpha) -> float64 [T]   x_t += alpha_t d_t; r_t -= alpha_t ad_t;
//                                                            returns the new r_t . r_t
//   cg_direction(d[]!, r[], beta)          -> ()             d_t = r_t + beta_t d_t
//   minres_lanczos(r1[]!, av[], r2[], c1, c2) -> float64 [T] r1_t = av_t - c1 r1_t - c2 r2_t;
//                                                            returns the new r1_t . r1_t
//   minres_update(w1[]!, x[]!, v[]!, w2[], y[], oldeps, delta, gamma_inv, phi, beta_inv) -> ()
//                                                            w1_t = (v_t - oldeps w1_t - delta w2_t) gamma_inv;
//                                                            x_t += phi w1_t; v_t = y_t beta_inv
//
// All lists hold T contiguous tensors of one floating dtype on one device, tensor t of the same
// shape in every list; alpha and beta are float64 [T] on that device (per-tensor CG scalars), the
// MINRES scalars are plain doubles (one Krylov space, global scalars). The lists marked ! are
// written in place: they are the solvers' own buffers (bissl_fast/solver/cg.py and minres.py create
// them and never hand them to autograd), so no autograd-tracked caller tensor is mutated. The
// element math and the chunking live in bissl_fast/cg_math.h, shared with the CUDA kernels.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <vector>

#include "../cg_checks.h"
#include "../output_alloc.h"
#include "bissl_fast/cg_math.h"

namespace bissl_fast {
namespace cg {

using cg_checks::check_lists;
using cg_checks::check_scalars;
using cg_checks::chunk_starts;

namespace {

// Per-tensor sums of the chunk partials, in chunk order (deterministic).
at::Tensor sum_partials(const std::vector<double>& partials, const std::vector<int64_t>& starts) {
  const int64_t T = static_cast<int64_t>(starts.size()) - 1;
  auto out = empty_output({T}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  for (int64_t t = 0; t < T; ++t) {
    double acc = 0.0;
    for (int64_t c = starts[t]; c < starts[t + 1]; ++c) {
      acc += partials[c];
    }
    o[t] = acc;
  }
  return out;
}

// Per-tensor sums of K dots per chunk (partials laid out [K][chunks]) -> [K, T], in chunk order.
at::Tensor sum_partials_k(const std::vector<double>& partials, const std::vector<int64_t>& starts, int64_t K) {
  const int64_t T = static_cast<int64_t>(starts.size()) - 1, chunks = starts.back();
  auto out = empty_output({K, T}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t t = 0; t < T; ++t) {
      double acc = 0.0;
      for (int64_t c = starts[t]; c < starts[t + 1]; ++c) {
        acc += partials[k * chunks + c];
      }
      o[k * T + t] = acc;
    }
  }
  return out;
}

// Runs fn(t, begin, end, chunk) for every chunk, in parallel over chunks.
template <typename Fn>
void for_each_chunk(at::TensorList ref, const std::vector<int64_t>& starts, Fn&& fn) {
  const int64_t T = static_cast<int64_t>(ref.size());
  // 8 chunks (32K elements) per task: enough work to outweigh the scheduling cost.
  at::parallel_for(0, starts[T], 8, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const int64_t t = chunk_tensor(starts.data(), T, c);
      int64_t begin, end;
      chunk_range(starts.data(), t, c, ref[t].numel(), &begin, &end);
      fn(t, begin, end, c);
    }
  });
}

at::Tensor cg_dot_cpu(at::TensorList a, at::TensorList b) {
  check_lists("cg_dot", {{"a", a}, {"b", b}});
  const auto starts = chunk_starts(a);
  std::vector<double> partials(starts.back(), 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a[0].scalar_type(), "cg_dot_cpu", [&] {
    for_each_chunk(a, starts, [&](int64_t t, int64_t begin, int64_t end, int64_t c) {
      const scalar_t* pa = a[t].const_data_ptr<scalar_t>();
      const scalar_t* pb = b[t].const_data_ptr<scalar_t>();
      partials[c] = lane_sum(begin, end, [&](int64_t i) {
        return static_cast<double>(pa[i]) * static_cast<double>(pb[i]);
      });
    });
  });
  return sum_partials(partials, starts);
}

at::Tensor cg_dot_pair_cpu(at::TensorList a, at::TensorList b, at::TensorList c) {
  check_lists("cg_dot_pair", {{"a", a}, {"b", b}, {"c", c}});
  const auto starts = chunk_starts(a);
  const int64_t chunks = starts.back();
  std::vector<double> partials(2 * chunks, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a[0].scalar_type(), "cg_dot_pair_cpu", [&] {
    for_each_chunk(a, starts, [&](int64_t t, int64_t begin, int64_t end, int64_t ch) {
      const scalar_t* pa = a[t].const_data_ptr<scalar_t>();
      const scalar_t* pb = b[t].const_data_ptr<scalar_t>();
      const scalar_t* pc = c[t].const_data_ptr<scalar_t>();
      partials[ch] = lane_sum(begin, end, [&](int64_t i) {
        return static_cast<double>(pa[i]) * static_cast<double>(pb[i]);
      });
      partials[chunks + ch] = lane_sum(begin, end, [&](int64_t i) {
        return static_cast<double>(pa[i]) * static_cast<double>(pc[i]);
      });
    });
  });
  return sum_partials_k(partials, starts, 2);
}

at::Tensor cg_update_cpu(at::TensorList x, at::TensorList r, at::TensorList d, at::TensorList ad,
                         const at::Tensor& alpha) {
  check_lists("cg_update", {{"x", x}, {"r", r}, {"d", d}, {"ad", ad}});
  check_scalars("cg_update", "alpha", alpha, x);
  const auto starts = chunk_starts(x);
  const auto alpha_c = alpha.contiguous();
  const double* al = alpha_c.const_data_ptr<double>();
  std::vector<double> partials(starts.back(), 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x[0].scalar_type(), "cg_update_cpu", [&] {
    using op_t = at::opmath_type<scalar_t>;
    for_each_chunk(x, starts, [&](int64_t t, int64_t begin, int64_t end, int64_t c) {
      scalar_t* px = x[t].data_ptr<scalar_t>();
      scalar_t* pr = r[t].data_ptr<scalar_t>();
      const scalar_t* pd = d[t].const_data_ptr<scalar_t>();
      const scalar_t* pad = ad[t].const_data_ptr<scalar_t>();
      const op_t a = static_cast<op_t>(al[t]);
      partials[c] = lane_sum(begin, end, [&](int64_t i) {
        op_t xi = px[i], ri = pr[i];
        update_xr<op_t>(xi, ri, pd[i], pad[i], a);
        px[i] = static_cast<scalar_t>(xi);
        pr[i] = static_cast<scalar_t>(ri);
        // r.r of the stored (rounded) value, as a separate pass over r would see it.
        const double rs = static_cast<double>(pr[i]);
        return rs * rs;
      });
    });
  });
  return sum_partials(partials, starts);
}

void cg_direction_cpu(at::TensorList d, at::TensorList r, const at::Tensor& beta) {
  check_lists("cg_direction", {{"d", d}, {"r", r}});
  check_scalars("cg_direction", "beta", beta, d);
  const auto starts = chunk_starts(d);
  const auto beta_c = beta.contiguous();
  const double* be = beta_c.const_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, d[0].scalar_type(), "cg_direction_cpu", [&] {
    using op_t = at::opmath_type<scalar_t>;
    for_each_chunk(d, starts, [&](int64_t t, int64_t begin, int64_t end, int64_t) {
      scalar_t* pd = d[t].data_ptr<scalar_t>();
      const scalar_t* pr = r[t].const_data_ptr<scalar_t>();
      const op_t b = static_cast<op_t>(be[t]);
      for (int64_t i = begin; i < end; ++i) {
        pd[i] = static_cast<scalar_t>(direction<op_t>(pr[i], pd[i], b));
      }
    });
  });
}

at::Tensor minres_lanczos_cpu(at::TensorList r1, at::TensorList av, at::TensorList r2, double c1, double c2) {
  check_lists("minres_lanczos", {{"r1", r1}, {"av", av}, {"r2", r2}});
  const auto starts = chunk_starts(r1);
  std::vector<double> partials(starts.back(), 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, r1[0].scalar_type(), "minres_lanczos_cpu", [&] {
    using op_t = at::opmath_type<scalar_t>;
    const op_t a1 = static_cast<op_t>(c1), a2 = static_cast<op_t>(c2);
    for_each_chunk(r1, starts, [&](int64_t t, int64_t begin, int64_t end, int64_t c) {
      scalar_t* py = r1[t].data_ptr<scalar_t>();
      const scalar_t* pav = av[t].const_data_ptr<scalar_t>();
      const scalar_t* pr2 = r2[t].const_data_ptr<scalar_t>();
      partials[c] = lane_sum(begin, end, [&](int64_t i) {
        py[i] = static_cast<scalar_t>(lanczos_next<op_t>(pav[i], py[i], pr2[i], a1, a2));
        // y.y of the stored (rounded) value, as a separate pass over y would see it.
        const double ys = static_cast<double>(py[i]);
        return ys * ys;
      });
    });
  });
  return sum_partials(partials, starts);
}

void minres_update_cpu(at::TensorList w1, at::TensorList x, at::TensorList v, at::TensorList w2, at::TensorList y,
                       double oldeps, double delta, double gamma_inv, double phi, double beta_inv) {
  check_lists("minres_update", {{"w1", w1}, {"x", x}, {"v", v}, {"w2", w2}, {"y", y}});
  const auto starts = chunk_starts(w1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w1[0].scalar_type(), "minres_update_cpu", [&] {
    using op_t = at::opmath_type<scalar_t>;
    const op_t e = static_cast<op_t>(oldeps), dl = static_cast<op_t>(delta), g = static_cast<op_t>(gamma_inv);
    const op_t ph = static_cast<op_t>(phi), bi = static_cast<op_t>(beta_inv);
    for_each_chunk(w1, starts, [&](int64_t t, int64_t begin, int64_t end, int64_t) {
      scalar_t* pw = w1[t].data_ptr<scalar_t>();
      scalar_t* px = x[t].data_ptr<scalar_t>();
      scalar_t* pv = v[t].data_ptr<scalar_t>();
      const scalar_t* pw2 = w2[t].const_data_ptr<scalar_t>();
      const scalar_t* py = y[t].const_data_ptr<scalar_t>();
      for (int64_t i = begin; i < end; ++i) {
        pw[i] = static_cast<scalar_t>(minres_direction<op_t>(pv[i], pw[i], pw2[i], e, dl, g));
        // x is updated with the stored (rounded) direction, as the reference's separate step would.
        px[i] = static_cast<scalar_t>(static_cast<op_t>(px[i]) + ph * static_cast<op_t>(pw[i]));
        pv[i] = static_cast<scalar_t>(static_cast<op_t>(py[i]) * bi);
      }
    });
  });
}

}  // namespace
}  // namespace cg
}  // namespace bissl_fast

TORCH_LIBRARY_FRAGMENT(bissl_fast, m) {
  m.def("cg_dot(Tensor[] a, Tensor[] b) -> Tensor");
  m.def("cg_update(Tensor(a!)[] x, Tensor(b!)[] r, Tensor[] d, Tensor[] ad, Tensor alpha) -> Tensor");
  m.def("cg_direction(Tensor(a!)[] d, Tensor[] r, Tensor beta) -> ()");
  m.def("cg_dot_pair(Tensor[] a, Tensor[] b, Tensor[] c) -> Tensor");
  m.def("minres_lanczos(Tensor(a!)[] r1, Tensor[] av, Tensor[] r2, float c1, float c2) -> Tensor");
  m.def(
      "minres_update(Tensor(a!)[] w1, Tensor(b!)[] x, Tensor(c!)[] v, Tensor[] w2, Tensor[] y, float oldeps, "
      "float delta, float gamma_inv, float phi, float beta_inv) -> ()");
}

TORCH_LIBRARY_IMPL(bissl_fast, CPU, m) {
  m.impl("cg_dot", &bissl_fast::cg::cg_dot_cpu);
  m.impl("cg_update", &bissl_fast::cg::cg_update_cpu);
  m.impl("cg_direction", &bissl_fast::cg::cg_direction_cpu);
  m.impl("cg_dot_pair", &bissl_fast::cg::cg_dot_pair_cpu);
  m.impl("minres_lanczos", &bissl_fast::cg::minres_lanczos_cpu);
  m.impl("minres_update", &bissl_fast::cg::minres_update_cpu);
}
