// The few assertions the plain-C++ math-header tests share (csrc/tests/test_*.cpp): each failed check
// prints one line and counts; main() returns non-zero when `failures` is not 0.
#pragma once

#include <cmath>
#include <cstdio>
#include <vector>

inline int failures = 0;

inline void expect(bool ok, const char* what) {
  if (!ok) {
    std::printf("FAIL %s\n", what);
    ++failures;
  }
}

// |got - want| / max(|want|, 1) <= tol.
inline void expect_close(const char* what, double got, double want, double tol) {
  const double err = std::fabs(got - want) / std::fmax(std::fabs(want), 1.0);
  if (!(err <= tol)) {
    std::printf("FAIL %s: got %.17g want %.17g (rel err %.3g > %.3g)\n", what, got, want, err, tol);
    ++failures;
  }
}

inline double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}
