// Self-checking test of csrc/include/bissl_fast/byol_math.h against a naive double implementation
// (explicit unit vectors, the docs/design.md §2.2 formulas, and central finite differences).
// Plain main(); returns non-zero on failure.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "bissl_fast/byol_math.h"
#include "check.h"

namespace byol = bissl_fast::byol;
using Vec = std::vector<double>;

// Naive loss 2 - 2 cos with F.normalize's clamp, from explicit unit vectors.
static double naive_loss(const Vec& p, const Vec& t) {
  const double np = std::fmax(std::sqrt(dot(p, p)), byol::kNormEps);
  const double nt = std::fmax(std::sqrt(dot(t, t)), byol::kNormEps);
  double c = 0;
  for (size_t i = 0; i < p.size(); ++i) c += (p[i] / np) * (t[i] / nt);
  return 2 - 2 * c;
}

// Naive gradient of g * loss: docs/design.md §2.2's -2 g (t^ - c p^) / n in the norm regime, -2 g t^ / eps when clamped.
static void naive_grad(const Vec& p, const Vec& t, double g, Vec& dp, Vec& dt) {
  const size_t d = p.size();
  const double np_raw = std::sqrt(dot(p, p)), nt_raw = std::sqrt(dot(t, t));
  const double np = std::fmax(np_raw, byol::kNormEps), nt = std::fmax(nt_raw, byol::kNormEps);
  Vec u(d), v(d);
  for (size_t i = 0; i < d; ++i) {
    u[i] = p[i] / np;
    v[i] = t[i] / nt;
  }
  const double c = dot(u, v);
  dp.assign(d, 0);
  dt.assign(d, 0);
  for (size_t i = 0; i < d; ++i) {
    dp[i] = -2 * g * (v[i] - (np_raw >= byol::kNormEps ? c * u[i] : 0)) / np;
    dt[i] = -2 * g * (u[i] - (nt_raw >= byol::kNormEps ? c * v[i] : 0)) / nt;
  }
}

struct Case {
  Vec p, t, wp, wt;
  double g;
};

static Case random_case(std::mt19937_64& rng, size_t d, double p_scale, double t_scale) {
  std::normal_distribution<double> n(0, 1);
  Case k;
  k.p.resize(d);
  k.t.resize(d);
  k.wp.resize(d);
  k.wt.resize(d);
  for (size_t i = 0; i < d; ++i) {
    k.p[i] = p_scale * n(rng);
    k.t[i] = t_scale * n(rng);
    k.wp[i] = n(rng);
    k.wt[i] = n(rng);
  }
  k.g = 0.7;
  return k;
}

// Checks forward, gradient and double backward of one row pair (D >= 2: for D = 1 the gradient
// vanishes identically); `scale_p`/`scale_t` are the
// row norms' orders of magnitude (finite-difference steps and tolerances follow them).
static void check_case(const char* name, const Case& k, double scale_p, double scale_t) {
  const size_t d = k.p.size();
  const auto row = byol::row_from<double, double>(k.p.data(), k.t.data(), static_cast<int64_t>(d));
  expect_close(name, byol::loss(row), naive_loss(k.p, k.t), 1e-12);

  Vec dp, dt;
  naive_grad(k.p, k.t, k.g, dp, dt);
  const auto gc = byol::grad_coef(row, k.g);
  for (size_t i = 0; i < d; ++i) {
    expect_close("grad p", (gc.p_p * k.p[i] + gc.p_t * k.t[i]) * scale_p, dp[i] * scale_p, 1e-11);
    expect_close("grad t", (gc.t_t * k.t[i] + gc.t_p * k.p[i]) * scale_t, dt[i] * scale_t, 1e-11);
  }

  // Double backward vs central differences of the naive gradient along (Wp, Wt), scaled to the rows.
  const double hp = 1e-5 * scale_p, ht = 1e-5 * scale_t;
  Vec pp(k.p), pm(k.p), tp(k.t), tm(k.t);
  for (size_t i = 0; i < d; ++i) {
    pp[i] += hp * k.wp[i];
    pm[i] -= hp * k.wp[i];
    tp[i] += ht * k.wt[i];
    tm[i] -= ht * k.wt[i];
  }
  Vec dp_plus_p, dt_plus_p, dp_minus_p, dt_minus_p, dp_plus_t, dt_plus_t, dp_minus_t, dt_minus_t;
  naive_grad(pp, k.t, k.g, dp_plus_p, dt_plus_p);
  naive_grad(pm, k.t, k.g, dp_minus_p, dt_minus_p);
  naive_grad(k.p, tp, k.g, dp_plus_t, dt_plus_t);
  naive_grad(k.p, tm, k.g, dp_minus_t, dt_minus_t);
  const auto hc = byol::hvp_coef(row, k.g, dot(k.p, k.wp), dot(k.t, k.wp), dot(k.p, k.wt), dot(k.t, k.wt));
  double ref_norm = 0, err_norm = 0;
  for (size_t i = 0; i < d; ++i) {
    const double ref_p = (dp_plus_p[i] - dp_minus_p[i]) / (2 * hp) + (dp_plus_t[i] - dp_minus_t[i]) / (2 * ht);
    const double ref_t = (dt_plus_p[i] - dt_minus_p[i]) / (2 * hp) + (dt_plus_t[i] - dt_minus_t[i]) / (2 * ht);
    const double got_p = hc.p_p * k.p[i] + hc.p_t * k.t[i] + hc.p_wp * k.wp[i] + hc.p_wt * k.wt[i];
    const double got_t = hc.t_p * k.p[i] + hc.t_t * k.t[i] + hc.t_wp * k.wp[i] + hc.t_wt * k.wt[i];
    ref_norm += ref_p * ref_p + ref_t * ref_t;
    err_norm += (got_p - ref_p) * (got_p - ref_p) + (got_t - ref_t) * (got_t - ref_t);
  }
  const double rel = std::sqrt(err_norm / ref_norm);
  if (!(rel < 1e-7)) {
    std::printf("FAIL %s hvp: rel err %.3g vs finite differences\n", name, rel);
    ++failures;
  }
  // dgrad = <Wp, dp/g> + <Wt, dt/g>.
  expect_close("dgrad", hc.dg, (dot(k.wp, dp) + dot(k.wt, dt)) / k.g, 1e-11);
}

// docs/design.md §2.2's closed form for the p-block with Wt = 0 in the norm regime.
static void check_design_formula(const Case& k) {
  const size_t d = k.p.size();
  const auto row = byol::row_from<double, double>(k.p.data(), k.t.data(), static_cast<int64_t>(d));
  const double n = std::sqrt(dot(k.p, k.p)), nt = std::sqrt(dot(k.t, k.t));
  Vec u(d), v(d);
  for (size_t i = 0; i < d; ++i) {
    u[i] = k.p[i] / n;
    v[i] = k.t[i] / nt;
  }
  const double c = dot(u, v), vw = dot(v, k.wp), uw = dot(u, k.wp);
  const auto hc = byol::hvp_coef(row, 1.0, dot(k.p, k.wp), dot(k.t, k.wp), 0.0, 0.0);
  for (size_t i = 0; i < d; ++i) {
    const double want = 2 / (n * n) * (u[i] * vw + v[i] * uw + c * k.wp[i] - 3 * c * u[i] * uw);
    const double got = hc.p_p * k.p[i] + hc.p_t * k.t[i] + hc.p_wp * k.wp[i];
    expect_close("design hvp", got * n * n, want * n * n, 1e-12);
  }
}

int main() {
  std::mt19937_64 rng(1234);
  for (size_t d : {2, 3, 17, 256}) {
    check_case("unit scale", random_case(rng, d, 1.0, 1.0), 1.0, 1.0);
    check_design_formula(random_case(rng, d, 1.0, 1.0));
  }
  check_case("large norms", random_case(rng, 33, 1e8, 1e6), 1e8, 1e6);
  check_case("small norms", random_case(rng, 33, 1e-8, 1e-6), 1e-8, 1e-6);
  // Below eps the denominator is clamped to eps (a = 0 / b = 0 regimes, and both).
  check_case("p below eps", random_case(rng, 9, 1e-14, 1.0), 1e-14, 1.0);
  check_case("t below eps", random_case(rng, 9, 1.0, 1e-14), 1.0, 1e-14);
  check_case("both below eps", random_case(rng, 9, 1e-14, 1e-15), 1e-14, 1e-15);
  // Exactly zero rows: loss 2, zero gradient, finite double backward.
  Case z = random_case(rng, 5, 1.0, 1.0);
  for (double& x : z.p) x = 0;
  const auto row = byol::row_from<double, double>(z.p.data(), z.t.data(), 5);
  expect_close("zero row loss", byol::loss(row), 2.0, 0);
  check_case("zero p", z, 1e-14, 1.0);  // FD steps stay inside the clamped ball
  // float accumulation agrees with double to float precision.
  Case f = random_case(rng, 100, 3.0, 0.5);
  std::vector<float> pf(f.p.begin(), f.p.end()), tf(f.t.begin(), f.t.end());
  const auto rf = byol::row_from<float, float>(pf.data(), tf.data(), 100);
  const auto rd = byol::row_from<double, float>(pf.data(), tf.data(), 100);
  expect_close("float loss", byol::loss(rf), byol::loss(rd), 1e-6);
  if (failures) {
    std::printf("%d failure(s)\n", failures);
    return 1;
  }
  std::printf("byol_math: all checks passed\n");
  return 0;
}
