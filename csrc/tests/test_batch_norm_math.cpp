// Self-checking test of csrc/include/bissl_fast/batch_norm_math.h on one channel against a naive
// double implementation (explicit xhat, the textbook backward) and central finite differences of the
// backward for the double backward, in train and eval mode. Plain main(); returns non-zero on failure.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "bissl_fast/batch_norm_math.h"
#include "check.h"

namespace bn = bissl_fast::batch_norm;
using Vec = std::vector<double>;

struct Channel {
  Vec x, g, ggx;
  double w, ggw, ggb, eps, run_mean, run_var;
};

// Statistics used by the normalization: batch ones in train mode, running ones in eval mode.
static void stats(const Channel& ch, const Vec& x, bool train, double& mean, double& invstd) {
  const double m = static_cast<double>(x.size());
  if (!train) {
    mean = ch.run_mean;
    invstd = 1.0 / std::sqrt(ch.run_var + ch.eps);
    return;
  }
  mean = 0;
  for (double v : x) mean += v;
  mean /= m;
  double var = 0;
  for (double v : x) var += (v - mean) * (v - mean);
  invstd = 1.0 / std::sqrt(var / m + ch.eps);
}

// Textbook backward with explicit xhat: (gx, gw, gb).
static void naive_bwd(const Channel& ch, const Vec& x, const Vec& g, double w, bool train, Vec& gx, double& gw,
                      double& gb) {
  const size_t n = x.size();
  double mean, invstd;
  stats(ch, x, train, mean, invstd);
  Vec xhat(n);
  for (size_t i = 0; i < n; ++i) xhat[i] = (x[i] - mean) * invstd;
  gb = 0;
  gw = 0;
  for (size_t i = 0; i < n; ++i) {
    gb += g[i];
    gw += g[i] * xhat[i];
  }
  gx.assign(n, 0);
  for (size_t i = 0; i < n; ++i) {
    gx[i] = train ? w * invstd * (g[i] - gb / n - xhat[i] * gw / n) : w * invstd * g[i];
  }
}

// The scalar whose gradient the double backward is: <ggx, gx> + ggw gw + ggb gb.
static double objective(const Channel& ch, const Vec& x, const Vec& g, double w, bool train) {
  Vec gx;
  double gw, gb;
  naive_bwd(ch, x, g, w, train, gx, gw, gb);
  return dot(ch.ggx, gx) + ch.ggw * gw + ch.ggb * gb;
}

static void check_channel(const Channel& ch, bool train, const char* label) {
  const size_t n = ch.x.size();
  const double m = static_cast<double>(n);
  double mean, invstd;
  stats(ch, ch.x, train, mean, invstd);
  char what[160];

  // Forward: y = alpha x + beta against w xhat + b.
  const double b = 0.3;
  const auto f = bn::fwd_coef(mean, invstd, ch.w, b);
  for (size_t i = 0; i < n; ++i) {
    std::snprintf(what, sizeof what, "%s fwd y[%zu]", label, i);
    expect_close(what, f.alpha * ch.x[i] + f.beta, ch.w * (ch.x[i] - mean) * invstd + b, 1e-13);
  }

  // Host row sums with the lane split (odd length exercises the tail).
  double naive_sum = 0, naive_sq = 0;
  for (double v : ch.x) naive_sum += v;
  for (double v : ch.x) naive_sq += (v - mean) * (v - mean);
  std::snprintf(what, sizeof what, "%s row_sum", label);
  expect_close(what, bn::row_sum<double>(ch.x.data(), n), naive_sum, 1e-13);
  std::snprintf(what, sizeof what, "%s row_sum_sq_dev", label);
  expect_close(what, bn::row_sum_sq_dev<double>(ch.x.data(), n, mean), naive_sq, 1e-13);
  double s_g = 0, s_gx = 0, s_gg = 0, s_ggx = 0, s_ggg = 0;
  bn::row_sums_dbwd<double>(ch.ggx.data(), ch.g.data(), ch.x.data(), n, mean, s_g, s_gx, s_gg, s_ggx, s_ggg);
  double s_g_only = 0, s_gx_only = 0;
  bn::row_sums_bwd<double>(ch.g.data(), ch.x.data(), n, mean, s_g_only, s_gx_only);
  std::snprintf(what, sizeof what, "%s row_sums_bwd sum g", label);
  expect_close(what, s_g_only, s_g, 1e-13);
  std::snprintf(what, sizeof what, "%s row_sums_bwd sum g xc", label);
  expect_close(what, s_gx_only, s_gx, 1e-13);
  // The batched kernels' split (shared sums, then the cotangent's) reproduces the five sums bit for bit.
  double s_gg_only = 0, s_ggx_only = 0, s_ggg_only = 0;
  bn::row_sums_cotangent<double>(ch.ggx.data(), ch.g.data(), ch.x.data(), n, mean, s_gg_only, s_ggx_only, s_ggg_only);
  std::snprintf(what, sizeof what, "%s row_sums_bwd + row_sums_cotangent == row_sums_dbwd", label);
  expect(s_g_only == s_g && s_gx_only == s_gx && s_gg_only == s_gg && s_ggx_only == s_ggx && s_ggg_only == s_ggg, what);
  double naive_gg = 0, naive_ggx = 0, naive_ggg = 0;
  for (size_t i = 0; i < n; ++i) {
    naive_gg += ch.ggx[i];
    naive_ggx += ch.ggx[i] * (ch.x[i] - mean);
    naive_ggg += ch.ggx[i] * ch.g[i];
  }
  std::snprintf(what, sizeof what, "%s row_sums_cotangent sum ggx", label);
  expect_close(what, s_gg_only, naive_gg, 1e-13);
  std::snprintf(what, sizeof what, "%s row_sums_cotangent sum ggx xc", label);
  expect_close(what, s_ggx_only, naive_ggx, 1e-13);
  std::snprintf(what, sizeof what, "%s row_sums_cotangent sum ggx g", label);
  expect_close(what, s_ggg_only, naive_ggg, 1e-13);

  // Backward against the textbook formulas.
  Vec gx;
  double gw, gb;
  naive_bwd(ch, ch.x, ch.g, ch.w, train, gx, gw, gb);
  const auto k = bn::bwd_coef(train, m, invstd, ch.w, s_g, s_gx);
  std::snprintf(what, sizeof what, "%s bwd gw", label);
  expect_close(what, k.gw, gw, 1e-12);
  std::snprintf(what, sizeof what, "%s bwd gb", label);
  expect_close(what, k.gb, gb, 1e-12);
  for (size_t i = 0; i < n; ++i) {
    std::snprintf(what, sizeof what, "%s bwd gx[%zu]", label, i);
    expect_close(what, k.k_g * ch.g[i] + k.k_x * (ch.x[i] - mean) + k.k_0, gx[i], 1e-12);
  }

  // Double backward against central differences of the objective along random directions.
  const auto d = bn::dbwd_coef(train, m, invstd, ch.w, s_g, s_gx, s_gg, s_ggx, s_ggg, ch.ggw, ch.ggb);
  Vec gi(n), gg(n);
  for (size_t i = 0; i < n; ++i) {
    const double xc = ch.x[i] - mean;
    gi[i] = d.i_g * ch.g[i] + d.i_x * xc + d.i_gg * ch.ggx[i] + d.i_0;
    gg[i] = d.o_gg * ch.ggx[i] + d.o_x * xc + d.o_0;
  }
  std::mt19937_64 rng(11);
  std::normal_distribution<double> normal;
  Vec dx(n), dg(n);
  for (size_t i = 0; i < n; ++i) {
    dx[i] = normal(rng);
    dg[i] = normal(rng);
  }
  const double h = 1e-5;
  Vec xp(ch.x), xm(ch.x), gp(ch.g), gm(ch.g);
  for (size_t i = 0; i < n; ++i) {
    xp[i] += h * dx[i];
    xm[i] -= h * dx[i];
    gp[i] += h * dg[i];
    gm[i] -= h * dg[i];
  }
  const double fd_x = (objective(ch, xp, ch.g, ch.w, train) - objective(ch, xm, ch.g, ch.w, train)) / (2 * h);
  const double fd_g = (objective(ch, ch.x, gp, ch.w, train) - objective(ch, ch.x, gm, ch.w, train)) / (2 * h);
  const double fd_w = (objective(ch, ch.x, ch.g, ch.w + h, train) - objective(ch, ch.x, ch.g, ch.w - h, train)) / (2 * h);
  std::snprintf(what, sizeof what, "%s dbwd <gI, dx>", label);
  expect_close(what, dot(gi, dx), fd_x, 1e-7);
  std::snprintf(what, sizeof what, "%s dbwd <gG, dg>", label);
  expect_close(what, dot(gg, dg), fd_g, 1e-7);
  std::snprintf(what, sizeof what, "%s dbwd gW", label);
  expect_close(what, d.gw, fd_w, 1e-7);
}

int main() {
  std::mt19937_64 rng(3);
  std::normal_distribution<double> normal;
  for (size_t n : {2u, 7u, 19u, 64u}) {
    Channel ch;
    ch.x.resize(n);
    ch.g.resize(n);
    ch.ggx.resize(n);
    for (size_t i = 0; i < n; ++i) {
      ch.x[i] = 1.5 * normal(rng) + 0.7;
      ch.g[i] = normal(rng);
      ch.ggx[i] = normal(rng);
    }
    ch.w = 1.3;
    ch.ggw = -0.8;
    ch.ggb = 0.45;
    ch.eps = 1e-5;
    ch.run_mean = 0.2;
    ch.run_var = 1.7;
    char label[48];
    std::snprintf(label, sizeof label, "train n=%zu", n);
    check_channel(ch, true, label);
    std::snprintf(label, sizeof label, "eval n=%zu", n);
    check_channel(ch, false, label);
  }
  // The running-stat update is PyTorch's convex combination.
  expect_close("running_update", bn::running_update(2.0, 4.0, 0.1), 0.1 * 4.0 + 0.9 * 2.0, 1e-15);
  if (failures) {
    std::printf("%d failure(s)\n", failures);
    return 1;
  }
  std::printf("test_batch_norm_math: all checks passed\n");
  return 0;
}
