// Self-checking test of csrc/include/bissl_fast/cg_math.h: the chunk decomposition (every element
// of every tensor, empty tensors included, covered exactly once), the lane-wise host sums, a full CG
// solve run with the header's element ops over several "tensors" in global mode, which on an
// n-dimensional SPD system must reach the exact solution in n iterations, and a full MINRES solve
// with the header's element ops on a symmetric INDEFINITE system, which must do the same and whose
// residual must never grow. Plain main(); returns non-zero on failure.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "bissl_fast/cg_math.h"
#include "check.h"

namespace cg = bissl_fast::cg;

static void test_chunks() {
  const std::vector<int64_t> numel = {5, 0, cg::kChunk, cg::kChunk + 1, 0, 3 * cg::kChunk - 7, 1};
  const int64_t T = static_cast<int64_t>(numel.size());
  std::vector<int64_t> starts(T + 1, 0);
  for (int64_t t = 0; t < T; ++t) starts[t + 1] = starts[t] + cg::num_chunks(numel[t]);
  expect(starts[T] == 1 + 0 + 1 + 2 + 0 + 3 + 1, "total chunk count");
  std::vector<std::vector<int>> seen(T);
  for (int64_t t = 0; t < T; ++t) seen[t].assign(numel[t], 0);
  for (int64_t c = 0; c < starts[T]; ++c) {
    const int64_t t = cg::chunk_tensor(starts.data(), T, c);
    expect(numel[t] > 0, "a chunk is never given to an empty tensor");
    int64_t begin, end;
    cg::chunk_range(starts.data(), t, c, numel[t], &begin, &end);
    expect(0 <= begin && begin < end && end <= numel[t] && end - begin <= cg::kChunk, "chunk range in bounds");
    for (int64_t i = begin; i < end; ++i) seen[t][i] += 1;
  }
  for (int64_t t = 0; t < T; ++t) {
    for (int v : seen[t]) expect(v == 1, "every element covered exactly once");
  }
}

// Global CG with the header's element ops on x, r, d split into tensors of sizes {3, 1, 4}.
static void test_cg_solves_spd() {
  const int n = 8;
  const std::vector<int> sizes = {3, 1, 4};
  std::mt19937 gen(0);
  std::normal_distribution<double> normal;
  std::vector<double> m(n * n), a(n * n, 0.0), b(n);
  for (double& v : m) v = normal(gen);
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j < n; ++j) {
      for (int k = 0; k < n; ++k) a[i * n + j] += m[k * n + i] * m[k * n + j];
    }
    a[i * n + i] += 1.0;  // A = M^T M + I: symmetric positive definite
    b[i] = normal(gen);
  }
  std::vector<double> x(n, 0.0), r = b, d = b, ad(n);
  double rr = 0.0;
  for (double v : r) rr += v * v;
  for (int it = 0; it < n; ++it) {
    double dad = 0.0;
    for (int i = 0; i < n; ++i) {
      ad[i] = 0.0;
      for (int j = 0; j < n; ++j) ad[i] += a[i * n + j] * d[j];
      dad += d[i] * ad[i];
    }
    const double alpha = rr / (dad + 1e-12);
    double rr_new = 0.0;
    for (int t = 0, off = 0; t < static_cast<int>(sizes.size()); off += sizes[t], ++t) {
      for (int i = off; i < off + sizes[t]; ++i) {
        const double ri = cg::update_xr<double>(x[i], r[i], d[i], ad[i], alpha);
        rr_new += ri * ri;
      }
    }
    const double beta = rr_new / (rr + 1e-12);
    for (int i = 0; i < n; ++i) d[i] = cg::direction<double>(r[i], d[i], beta);
    rr = rr_new;
  }
  double err = 0.0, norm = 0.0;
  for (int i = 0; i < n; ++i) {
    double axi = 0.0;
    for (int j = 0; j < n; ++j) axi += a[i * n + j] * x[j];
    err += (axi - b[i]) * (axi - b[i]);
    norm += b[i] * b[i];
  }
  if (!(std::sqrt(err / norm) < 1e-8)) {
    std::printf("FAIL CG residual after n iterations: %.3g\n", std::sqrt(err / norm));
    ++failures;
  }
}

// x solving a x = b by Gaussian elimination with partial pivoting (n x n, row-major).
static std::vector<double> dense_solve(std::vector<double> a, std::vector<double> b, int n) {
  for (int k = 0; k < n; ++k) {
    int p = k;
    for (int i = k + 1; i < n; ++i) {
      if (std::fabs(a[i * n + k]) > std::fabs(a[p * n + k])) p = i;
    }
    for (int j = 0; j < n; ++j) std::swap(a[k * n + j], a[p * n + j]);
    std::swap(b[k], b[p]);
    for (int i = k + 1; i < n; ++i) {
      const double f = a[i * n + k] / a[k * n + k];
      for (int j = k; j < n; ++j) a[i * n + j] -= f * a[k * n + j];
      b[i] -= f * b[k];
    }
  }
  std::vector<double> x(n);
  for (int i = n - 1; i >= 0; --i) {
    double s = b[i];
    for (int j = i + 1; j < n; ++j) s -= a[i * n + j] * x[j];
    x[i] = s / a[i * n + i];
  }
  return x;
}

// MINRES (SciPy's recurrences) with the header's lanczos_next / minres_direction on A = Q diag(e) Q^T,
// e with both signs (indefinite), built from Householder reflections.
static void test_minres_solves_indefinite() {
  const int n = 8;
  const double eig[n] = {-2.0, -0.7, -0.3, 0.4, 0.9, 1.5, 2.2, 3.1};
  std::mt19937 gen(3);
  std::normal_distribution<double> normal;
  std::vector<double> u(n), a(n * n, 0.0), b(n);
  for (double& v : u) v = normal(gen);
  const double uu = dot(u, u);
  for (int i = 0; i < n; ++i) {  // Q = I - 2 u u^T / u.u, A = Q diag(eig) Q
    for (int j = 0; j < n; ++j) {
      for (int k = 0; k < n; ++k) {
        const double qik = (i == k) - 2 * u[i] * u[k] / uu, qjk = (j == k) - 2 * u[j] * u[k] / uu;
        a[i * n + j] += qik * eig[k] * qjk;
      }
    }
  }
  for (double& v : b) v = normal(gen);
  const auto matvec = [&](const std::vector<double>& v) {
    std::vector<double> out(n, 0.0);
    for (int i = 0; i < n; ++i) {
      for (int j = 0; j < n; ++j) out[i] += a[i * n + j] * v[j];
    }
    return out;
  };
  const double beta1 = std::sqrt(dot(b, b));
  std::vector<double> x(n, 0.0), r1 = b, r2 = b, v(n), w1(n, 0.0), w2(n, 0.0);
  for (int i = 0; i < n; ++i) v[i] = b[i] / beta1;
  double oldb = 0, beta = beta1, dbar = 0, epsln = 0, phibar = beta1, cs = -1, sn = 0;
  for (int it = 0; it < n; ++it) {
    const std::vector<double> av = matvec(v);
    const double c1 = it > 0 ? beta / oldb : 0.0;
    const double alfa = dot(v, av) - c1 * dot(v, r1);
    for (int i = 0; i < n; ++i) r1[i] = cg::lanczos_next<double>(av[i], r1[i], r2[i], c1, alfa / beta);
    std::swap(r1, r2);
    oldb = beta;
    beta = std::sqrt(dot(r2, r2));
    const double oldeps = epsln, delta = cs * dbar + sn * alfa, gbar = sn * dbar - cs * alfa;
    epsln = sn * beta;
    dbar = -cs * beta;
    const double gamma = std::fmax(std::hypot(gbar, beta), 1e-300);
    cs = gbar / gamma;
    sn = beta / gamma;
    const double phi = cs * phibar, old_phibar = phibar;
    phibar = sn * phibar;
    expect(phibar <= old_phibar * (1 + 1e-12), "MINRES residual never grows");
    for (int i = 0; i < n; ++i) {
      w1[i] = cg::minres_direction<double>(v[i], w1[i], w2[i], oldeps, delta, 1.0 / gamma);
      x[i] += phi * w1[i];
      v[i] = beta > 0 ? r2[i] / beta : 0.0;
    }
    std::swap(w1, w2);
  }
  const std::vector<double> exact = dense_solve(a, b, n);
  double err = 0.0, norm = 0.0;
  for (int i = 0; i < n; ++i) {
    err += (x[i] - exact[i]) * (x[i] - exact[i]);
    norm += exact[i] * exact[i];
  }
  if (!(std::sqrt(err / norm) < 1e-8)) {
    std::printf("FAIL MINRES error after n iterations: %.3g\n", std::sqrt(err / norm));
    ++failures;
  }
  expect(phibar <= 1e-8 * beta1, "MINRES residual estimate after n iterations");
}

static void test_element_ops_float() {
  float x = 1.0f, r = 2.0f;
  const float ri = cg::update_xr<float>(x, r, 0.5f, 0.25f, 2.0f);
  expect(x == 2.0f && r == 1.5f && ri == 1.5f, "update_xr float");
  expect(cg::direction<float>(1.0f, 4.0f, 0.5f) == 3.0f, "direction float");
  expect(cg::lanczos_next<float>(5.0f, 2.0f, 4.0f, 0.5f, 0.25f) == 3.0f, "lanczos_next float");
  expect(cg::minres_direction<float>(3.0f, 2.0f, 4.0f, 0.5f, 0.25f, 0.5f) == 0.5f, "minres_direction float");
}

// lane_sum: same value as a plain double sum up to rounding, every element counted once
// (lengths that are not multiples of kLanes), and exact on integer-valued terms.
static void test_lane_sum() {
  std::mt19937 gen(1);
  std::uniform_real_distribution<double> uniform(-1.0, 1.0);
  std::vector<double> v(1000);
  for (double& x : v) x = uniform(gen);
  for (int64_t begin : {0, 3}) {
    for (int64_t end : {3, 8, 17, 1000}) {
      if (end <= begin) continue;
      double naive = 0.0;
      for (int64_t i = begin; i < end; ++i) naive += v[i];
      const double lanes = cg::lane_sum(begin, end, [&](int64_t i) { return v[i]; });
      if (!(std::fabs(lanes - naive) <= 1e-12)) {
        std::printf("FAIL lane_sum [%lld, %lld): %.17g vs %.17g\n", static_cast<long long>(begin),
                    static_cast<long long>(end), lanes, naive);
        ++failures;
      }
      const double count = cg::lane_sum(begin, end, [](int64_t i) { return static_cast<double>(i); });
      expect(count == static_cast<double>((begin + end - 1) * (end - begin) / 2), "lane_sum counts each index once");
    }
  }
  expect(cg::lane_sum(5, 5, [](int64_t) { return 1.0; }) == 0.0, "lane_sum of an empty range");
}

int main() {
  test_lane_sum();
  test_chunks();
  test_cg_solves_spd();
  test_minres_solves_indefinite();
  test_element_ops_float();
  if (failures == 0) std::printf("test_cg_math: all passed\n");
  return failures == 0 ? 0 : 1;
}
