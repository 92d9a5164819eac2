// Channel-block loops of the BatchNorm CPU kernels. Included twice by batch_norm_cpu.cpp (hence no
// include guard): once for the baseline ISA and once under `#pragma GCC target("avx2,fma")`, each time
// inside its own namespace, so the same source is auto-vectorized for both and the op picks one at run
// time. Raw pointers only (the argument structs are defined by the includer); the arithmetic comes
// from bissl_fast/batch_norm_math.h.
//
// A block is the channels [c0, c1) of an [N, C, L] tensor; run n of channel c starts at (n C + c) L.
// Looping n outside keeps [N, C] inputs (L = 1) walking memory in order.

// Row sums on LaneVec accumulators: lane j sums the elements j mod kLanes, the tail goes to lane 0 and
// the lanes are totalled in order, the same arithmetic, in the same order, as bn::row_sum* of the math
// header (checked by csrc/tests/test_batch_norm_math.cpp); written with vector types because gcc does
// not vectorize those lane arrays itself.
template <typename T, typename S>
__attribute__((always_inline)) inline void load_lanes(LaneVec<T>& v, const S* p) {
  if constexpr (std::is_same_v<S, T>) {
    __builtin_memcpy(&v, p, sizeof v);
  } else {
    for (int j = 0; j < bn::kLanes; ++j) v[j] = static_cast<T>(p[j]);
  }
}

template <typename T>
__attribute__((always_inline)) inline T lanes_total(const LaneVec<T>& v) {
  T total = 0;
  for (int j = 0; j < bn::kLanes; ++j) total += v[j];
  return total;
}

template <typename T, typename S>
inline T row_sum(const S* x, int64_t n) {
  LaneVec<T> a = {}, v = {};
  int64_t i = 0;
  for (; i + bn::kLanes <= n; i += bn::kLanes) {
    load_lanes<T>(v, x + i);
    a += v;
  }
  for (; i < n; ++i) a[0] += static_cast<T>(x[i]);
  return lanes_total<T>(a);
}

template <typename T, typename S>
inline T row_sum_sq_dev(const S* x, int64_t n, T mean) {
  LaneVec<T> a = {}, v = {};
  int64_t i = 0;
  for (; i + bn::kLanes <= n; i += bn::kLanes) {
    load_lanes<T>(v, x + i);
    v -= mean;
    a += v * v;
  }
  for (; i < n; ++i) {
    const T d = static_cast<T>(x[i]) - mean;
    a[0] += d * d;
  }
  return lanes_total<T>(a);
}

template <typename T, typename S>
inline void row_sums_bwd(const S* g, const S* x, int64_t n, T mean, T& s_g, T& s_gx) {
  LaneVec<T> a = {}, b = {}, gv = {}, xc = {};
  int64_t i = 0;
  for (; i + bn::kLanes <= n; i += bn::kLanes) {
    load_lanes<T>(gv, g + i);
    load_lanes<T>(xc, x + i);
    xc -= mean;
    a += gv;
    b += gv * xc;
  }
  for (; i < n; ++i) {
    const T gs = static_cast<T>(g[i]);
    a[0] += gs;
    b[0] += gs * (static_cast<T>(x[i]) - mean);
  }
  s_g += lanes_total<T>(a);
  s_gx += lanes_total<T>(b);
}

template <typename T, typename S>
inline void row_sums_dbwd(const S* gg, const S* g, const S* x, int64_t n, T mean, T& s_g, T& s_gx, T& s_gg,
                          T& s_ggx, T& s_ggg) {
  LaneVec<T> a = {}, b = {}, c = {}, d = {}, e = {}, gv = {}, ggv = {}, xc = {};
  int64_t i = 0;
  for (; i + bn::kLanes <= n; i += bn::kLanes) {
    load_lanes<T>(gv, g + i);
    load_lanes<T>(ggv, gg + i);
    load_lanes<T>(xc, x + i);
    xc -= mean;
    a += gv;
    b += gv * xc;
    c += ggv;
    d += ggv * xc;
    e += ggv * gv;
  }
  for (; i < n; ++i) {
    const T gs = static_cast<T>(g[i]), ggs = static_cast<T>(gg[i]);
    const T xs = static_cast<T>(x[i]) - mean;
    a[0] += gs;
    b[0] += gs * xs;
    c[0] += ggs;
    d[0] += ggs * xs;
    e[0] += ggs * gs;
  }
  s_g += lanes_total<T>(a);
  s_gx += lanes_total<T>(b);
  s_gg += lanes_total<T>(c);
  s_ggx += lanes_total<T>(d);
  s_ggg += lanes_total<T>(e);
}

// The cotangent's part of row_sums_dbwd (same lanes, same order), for the batched double backward.
template <typename T, typename S>
inline void row_sums_cotangent(const S* gg, const S* g, const S* x, int64_t n, T mean, T& s_gg, T& s_ggx,
                               T& s_ggg) {
  LaneVec<T> c = {}, d = {}, e = {}, gv = {}, ggv = {}, xc = {};
  int64_t i = 0;
  for (; i + bn::kLanes <= n; i += bn::kLanes) {
    load_lanes<T>(gv, g + i);
    load_lanes<T>(ggv, gg + i);
    load_lanes<T>(xc, x + i);
    xc -= mean;
    c += ggv;
    d += ggv * xc;
    e += ggv * gv;
  }
  for (; i < n; ++i) {
    const T gs = static_cast<T>(g[i]), ggs = static_cast<T>(gg[i]);
    const T xs = static_cast<T>(x[i]) - mean;
    c[0] += ggs;
    d[0] += ggs * xs;
    e[0] += ggs * gs;
  }
  s_gg += lanes_total<T>(c);
  s_ggx += lanes_total<T>(d);
  s_ggg += lanes_total<T>(e);
}

// [N, C] inputs (L = 1): calls f(row, k) for row n (pointing at its channel c0) and k in [0, c1 - c0),
// so the loop over k is contiguous and, with one accumulator per channel, vectorizes.
template <typename S, typename F>
inline void for_rows(const S* base, const Geometry& ly, int64_t c0, int64_t c1, F&& f) {
  for (int64_t n = 0; n < ly.n; ++n) {
    const S* row = base + n * ly.c + c0;
    for (int64_t k = 0; k < c1 - c0; ++k) f(row, k);
  }
}

template <typename F>
inline void for_runs(const Geometry& ly, int64_t c0, int64_t c1, F&& f) {
  for (int64_t n = 0; n < ly.n; ++n) {
    for (int64_t c = c0; c < c1; ++c) f(c - c0, (n * ly.c + c) * ly.l);
  }
}

template <typename S, typename T>
void fwd_block(const FwdArgs<S, T>& a, int64_t c0, int64_t c1) {
  const Geometry& ly = a.ly;
  const int64_t nc = c1 - c0;
  const T m = static_cast<T>(ly.n * ly.l);
  if (a.training) {
    // Two sweeps for the statistics (mean, then the centred sum of squares, as PyTorch): accurate
    // when |mean| >> std; a channel block stays in cache between them.
    std::vector<T> mean(nc, T(0)), var_sum(nc, T(0));
    if (ly.l == 1) {
      for_rows(a.x, ly, c0, c1, [&](const S* xr, int64_t k) { mean[k] += static_cast<T>(xr[k]); });
    } else {
      for_runs(ly, c0, c1, [&](int64_t k, int64_t off) { mean[k] += row_sum<T>(a.x + off, ly.l); });
    }
    for (int64_t k = 0; k < nc; ++k) mean[k] /= m;
    if (ly.l == 1) {
      for_rows(a.x, ly, c0, c1, [&](const S* xr, int64_t k) {
        const T d = static_cast<T>(xr[k]) - mean[k];
        var_sum[k] += d * d;
      });
    } else {
      for_runs(ly, c0, c1, [&](int64_t k, int64_t off) {
        var_sum[k] += row_sum_sq_dev<T>(a.x + off, ly.l, mean[k]);
      });
    }
    for (int64_t k = 0; k < nc; ++k) {
      const int64_t c = c0 + k;
      a.mean[c] = mean[k];
      a.invstd[c] = bn::inv_sqrt(var_sum[k] / m + a.eps);
      if (a.update) {
        a.new_rm[c] = bn::running_update(a.rm[c], mean[k], a.momentum);
        a.new_rv[c] = bn::running_update(a.rv[c], var_sum[k] / (m - T(1)), a.momentum);
      }
    }
  } else {
    for (int64_t c = c0; c < c1; ++c) {
      a.mean[c] = a.rm[c];
      a.invstd[c] = bn::inv_sqrt(a.rv[c] + a.eps);
    }
  }
  std::vector<bn::FwdCoef<T>> coef(nc);
  for (int64_t k = 0; k < nc; ++k) {
    const int64_t c = c0 + k;
    coef[k] = bn::fwd_coef(a.mean[c], a.invstd[c], a.w[c], a.b[c]);
  }
  for_runs(ly, c0, c1, [&](int64_t k, int64_t off) {
    const T alpha = coef[k].alpha, beta = coef[k].beta;
    const S* __restrict__ xr = a.x + off;
    S* __restrict__ yr = a.y + off;
    for (int64_t i = 0; i < ly.l; ++i) yr[i] = static_cast<S>(alpha * static_cast<T>(xr[i]) + beta);
  });
}

template <typename S, typename T>
void bwd_block(const BwdArgs<S, T>& a, int64_t c0, int64_t c1) {
  const Geometry& ly = a.ly;
  const int64_t nc = c1 - c0;
  const T m = static_cast<T>(ly.n * ly.l);
  std::vector<T> s_g(nc, T(0)), s_gx(nc, T(0));
  if ((a.training || a.gw != nullptr || a.gb != nullptr) && ly.l == 1) {
    const T* mu = a.mean + c0;
    for (int64_t n = 0; n < ly.n; ++n) {
      const S* gr = a.g + n * ly.c + c0;
      const S* xr = a.x + n * ly.c + c0;
      for (int64_t k = 0; k < nc; ++k) {
        const T gv = static_cast<T>(gr[k]);
        s_g[k] += gv;
        s_gx[k] += gv * (static_cast<T>(xr[k]) - mu[k]);
      }
    }
  } else if (a.training || a.gw != nullptr || a.gb != nullptr) {
    for_runs(ly, c0, c1, [&](int64_t k, int64_t off) {
      row_sums_bwd<T>(a.g + off, a.x + off, ly.l, a.mean[c0 + k], s_g[k], s_gx[k]);
    });
  }
  std::vector<bn::BwdCoef<T>> coef(nc);
  for (int64_t k = 0; k < nc; ++k) {
    const int64_t c = c0 + k;
    coef[k] = bn::bwd_coef(a.training, m, a.invstd[c], a.w[c], s_g[k], s_gx[k]);
    if (a.gw != nullptr) a.gw[c] = coef[k].gw;
    if (a.gb != nullptr) a.gb[c] = coef[k].gb;
  }
  if (a.gx == nullptr) return;
  if (ly.l == 1) {
    for (int64_t n = 0; n < ly.n; ++n) {
      const int64_t row = n * ly.c + c0;
      for (int64_t k = 0; k < nc; ++k) {
        const auto& q = coef[k];
        a.gx[row + k] = static_cast<S>(q.k_g * static_cast<T>(a.g[row + k]) +
                                       q.k_x * (static_cast<T>(a.x[row + k]) - a.mean[c0 + k]) + q.k_0);
      }
    }
    return;
  }
  for_runs(ly, c0, c1, [&](int64_t k, int64_t off) {
    // Coefficients in locals: the compiler cannot prove the output does not alias the coefficient array.
    const T k_g = coef[k].k_g, k_x = coef[k].k_x, k_0 = coef[k].k_0, mu = a.mean[c0 + k];
    const S* __restrict__ xr = a.x + off;
    const S* __restrict__ gr = a.g + off;
    S* __restrict__ out = a.gx + off;
    for (int64_t i = 0; i < ly.l; ++i) {
      out[i] = static_cast<S>(k_g * static_cast<T>(gr[i]) + k_x * (static_cast<T>(xr[i]) - mu) + k_0);
    }
  });
}

// gI = i_g g + i_x xc + i_gg ggx + i_0 and gG = o_gg ggx + o_x xc + o_0 over one run, in one pass;
// a branch-free loop per combination of present tensors, so each one vectorizes.
template <bool kHasGG, bool kWantGI, bool kWantGG, typename S, typename T>
inline void dbwd_run(const bn::DbwdCoef<T>& q, T mu, const S* __restrict__ xr, const S* __restrict__ gr,
                     const S* __restrict__ ggr, S* __restrict__ gir, S* __restrict__ ggo, int64_t l) {
  const T i_g = q.i_g, i_x = q.i_x, i_gg = q.i_gg, i_0 = q.i_0, o_gg = q.o_gg, o_x = q.o_x, o_0 = q.o_0;
  for (int64_t i = 0; i < l; ++i) {
    const T xc = static_cast<T>(xr[i]) - mu;
    const T ggv = kHasGG ? static_cast<T>(ggr[i]) : T(0);
    if (kWantGI) gir[i] = static_cast<S>(i_g * static_cast<T>(gr[i]) + i_x * xc + i_gg * ggv + i_0);
    if (kWantGG) ggo[i] = static_cast<S>(o_gg * ggv + o_x * xc + o_0);
  }
}

template <bool kHasGG, typename S, typename T>
inline void dbwd_outputs(const DbwdArgs<S, T>& a, const std::vector<bn::DbwdCoef<T>>& coef, int64_t c0,
                         int64_t c1) {
  const bool gi = a.gi != nullptr, gg = a.gg != nullptr;
  if (a.ly.l == 1) {
    // [N, C]: rows of channels, one element per channel and row.
    for (int64_t n = 0; n < a.ly.n; ++n) {
      const int64_t row = n * a.ly.c + c0;
      for (int64_t k = 0; k < c1 - c0; ++k) {
        const auto& q = coef[k];
        const T xc = static_cast<T>(a.x[row + k]) - a.mean[c0 + k];
        const T ggv = kHasGG ? static_cast<T>(a.ggx[row + k]) : T(0);
        if (gi) a.gi[row + k] = static_cast<S>(q.i_g * static_cast<T>(a.g[row + k]) + q.i_x * xc + q.i_gg * ggv + q.i_0);
        if (gg) a.gg[row + k] = static_cast<S>(q.o_gg * ggv + q.o_x * xc + q.o_0);
      }
    }
    return;
  }
  for_runs(a.ly, c0, c1, [&](int64_t k, int64_t off) {
    const T mu = a.mean[c0 + k];
    const S* ggr = kHasGG ? a.ggx + off : nullptr;
    S* gir = gi ? a.gi + off : nullptr;
    S* ggo = gg ? a.gg + off : nullptr;
    if (gi && gg) {
      dbwd_run<kHasGG, true, true>(coef[k], mu, a.x + off, a.g + off, ggr, gir, ggo, a.ly.l);
    } else if (gi) {
      dbwd_run<kHasGG, true, false>(coef[k], mu, a.x + off, a.g + off, ggr, gir, ggo, a.ly.l);
    } else {
      dbwd_run<kHasGG, false, true>(coef[k], mu, a.x + off, a.g + off, ggr, gir, ggo, a.ly.l);
    }
  });
}

template <typename S, typename T>
void dbwd_block(const DbwdArgs<S, T>& a, int64_t c0, int64_t c1) {
  const Geometry& ly = a.ly;
  const int64_t nc = c1 - c0;
  const T m = static_cast<T>(ly.n * ly.l);
  std::vector<T> s_g(nc, T(0)), s_gx(nc, T(0)), s_gg(nc, T(0)), s_ggx(nc, T(0)), s_ggg(nc, T(0));
  // One sweep over (g, x, ggx) for every per-channel sum.
  if (ly.l == 1 && a.ggx != nullptr) {
    const T* mu = a.mean + c0;
    for (int64_t n = 0; n < ly.n; ++n) {
      const int64_t row = n * ly.c + c0;
      const S *gr = a.g + row, *xr = a.x + row, *ggr = a.ggx + row;
      for (int64_t k = 0; k < nc; ++k) {
        const T gv = static_cast<T>(gr[k]), ggv = static_cast<T>(ggr[k]), xc = static_cast<T>(xr[k]) - mu[k];
        s_g[k] += gv;
        s_gx[k] += gv * xc;
        s_gg[k] += ggv;
        s_ggx[k] += ggv * xc;
        s_ggg[k] += ggv * gv;
      }
    }
  } else {
    for_runs(ly, c0, c1, [&](int64_t k, int64_t off) {
      const T mu = a.mean[c0 + k];
      if (a.ggx != nullptr) {
        row_sums_dbwd<T>(a.ggx + off, a.g + off, a.x + off, ly.l, mu, s_g[k], s_gx[k], s_gg[k], s_ggx[k],
                         s_ggg[k]);
      } else {
        row_sums_bwd<T>(a.g + off, a.x + off, ly.l, mu, s_g[k], s_gx[k]);
      }
    });
  }
  std::vector<bn::DbwdCoef<T>> coef(nc);
  for (int64_t k = 0; k < nc; ++k) {
    const int64_t c = c0 + k;
    coef[k] = bn::dbwd_coef(a.training, m, a.invstd[c], a.w[c], s_g[k], s_gx[k], s_gg[k], s_ggx[k], s_ggg[k],
                            a.ggw[c], a.ggb[c]);
    if (a.gw != nullptr) a.gw[c] = coef[k].gw;
  }
  if (a.gi == nullptr && a.gg == nullptr) return;
  if (a.ggx != nullptr) {
    dbwd_outputs<true>(a, coef, c0, c1);
  } else {
    dbwd_outputs<false>(a, coef, c0, c1);
  }
}

// Batched ops (k cotangents at once, for batched Hessian-vector products): the tangents one after another
// over the task's whole channel range. Finishing a few channels for every tangent first (so that input and
// grad_out are read from cache after the first tangent) measured 1.3-1.8x slower on a 2 MiB-L2 AMD EPYC:
// the short strided runs it walks defeat the prefetchers, which cost more than the shared reads save.
template <typename S, typename T>
void bwd_batched_block(const BwdBatchedArgs<S, T>& a, int64_t c0, int64_t c1) {
  for (int64_t j = 0; j < a.k; ++j) bwd_block(a.tangent(j), c0, c1);
}

template <typename S, typename T>
void dbwd_batched_block(const DbwdBatchedArgs<S, T>& a, int64_t c0, int64_t c1) {
  const Geometry& ly = a.base.ly;
  const int64_t nc = c1 - c0;
  const T m = static_cast<T>(ly.n * ly.l);
  // sum g and sum g (x - mean) do not depend on the cotangent: the first cotangent's sweep reduces them with
  // its own three sums (dbwd_block's loops, so every result equals the single-tangent op's bit for bit), the
  // later cotangents reduce only their three.
  std::vector<T> s_g(nc, T(0)), s_gx(nc, T(0)), s_gg(nc), s_ggx(nc), s_ggg(nc);
  std::vector<bn::DbwdCoef<T>> coef(nc);
  for (int64_t j = 0; j < a.k; ++j) {
    const DbwdArgs<S, T> t = a.tangent(j);
    std::fill(s_gg.begin(), s_gg.end(), T(0));
    std::fill(s_ggx.begin(), s_ggx.end(), T(0));
    std::fill(s_ggg.begin(), s_ggg.end(), T(0));
    const bool shared_too = j == 0;
    if (ly.l == 1 && t.ggx != nullptr) {
      const T* mu = t.mean + c0;
      for (int64_t n = 0; n < ly.n; ++n) {
        const int64_t row = n * ly.c + c0;
        const S *gr = t.g + row, *xr = t.x + row, *ggr = t.ggx + row;
        for (int64_t k = 0; k < nc; ++k) {
          const T gv = static_cast<T>(gr[k]), ggv = static_cast<T>(ggr[k]), xc = static_cast<T>(xr[k]) - mu[k];
          if (shared_too) {
            s_g[k] += gv;
            s_gx[k] += gv * xc;
          }
          s_gg[k] += ggv;
          s_ggx[k] += ggv * xc;
          s_ggg[k] += ggv * gv;
        }
      }
    } else {
      for_runs(ly, c0, c1, [&](int64_t k, int64_t off) {
        const T mu = t.mean[c0 + k];
        if (t.ggx != nullptr && shared_too) {
          row_sums_dbwd<T>(t.ggx + off, t.g + off, t.x + off, ly.l, mu, s_g[k], s_gx[k], s_gg[k], s_ggx[k],
                           s_ggg[k]);
        } else if (t.ggx != nullptr) {
          row_sums_cotangent<T>(t.ggx + off, t.g + off, t.x + off, ly.l, mu, s_gg[k], s_ggx[k], s_ggg[k]);
        } else if (shared_too) {
          row_sums_bwd<T>(t.g + off, t.x + off, ly.l, mu, s_g[k], s_gx[k]);
        }
      });
    }
    for (int64_t k = 0; k < nc; ++k) {
      const int64_t c = c0 + k;
      coef[k] = bn::dbwd_coef(t.training, m, t.invstd[c], t.w[c], s_g[k], s_gx[k], s_gg[k], s_ggx[k], s_ggg[k],
                              t.ggw[c], t.ggb[c]);
      if (t.gw != nullptr) t.gw[c] = coef[k].gw;
    }
    if (t.gi == nullptr && t.gg == nullptr) continue;
    if (t.ggx != nullptr) {
      dbwd_outputs<true>(t, coef, c0, c1);
    } else {
      dbwd_outputs<false>(t, coef, c0, c1);
    }
  }
}
