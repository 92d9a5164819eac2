// BatchNorm ops (docs/design.md §2.3): schemas and CPU kernels.
//
//   batch_norm_fwd(input, weight?, bias?, running_mean?, running_var?, training, momentum, eps)
//       -> (out, save_mean, save_invstd, new_running_mean, new_running_var)
//   batch_norm_bwd(grad_out, input, weight?, save_mean, save_invstd, training, output_mask)
//       -> (grad_input, grad_weight, grad_bias)                       vjp of batch_norm_fwd
//   batch_norm_dbwd(ggI?, ggW?, ggB?, grad_out, input, weight?, save_mean, save_invstd, training, output_mask)
//       -> (grad_input, grad_grad_out, grad_weight)                   vjp of batch_norm_bwd
//   batch_norm_bwd_batched / batch_norm_dbwd_batched: the same for k tangents at once (grad_out of bwd,
//       the cotangents ggI [k, N, C, *], ggW, ggB [k, C] of dbwd); outputs gain the leading k
//
// input is [N, C, *]; per-channel tensors are [C]. save_mean/save_invstd are in the accumulation dtype
// (float for float/bf16/half, double for double): the batch statistics in training, the running ones
// (as 1/sqrt(running_var + eps)) in eval. The forward is functional: it returns the updated running
// statistics (PyTorch's formula, unbiased variance) and the caller copies them into its buffers, so the
// op needs no mutable arguments and has autograd; both are empty [0] tensors unless training with
// running statistics. batch_norm_dbwd differentiates through save_mean/save_invstd as functions of input
// when training (they must be the batch statistics of input). Outputs not in output_mask are empty [0].
// The arithmetic lives in bissl_fast/batch_norm_math.h, shared with the CUDA kernels; the autograd
// formulas that chain the three ops are registered from Python (bissl_fast/ops/batch_norm.py), and so are
// the batching rules that call the batched ops (bissl_fast/ops/batch_norm_batching.py).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <array>
#include <type_traits>
#include <vector>

#include "../batch_norm_checks.h"
#include "../output_alloc.h"
#include "bissl_fast/batch_norm_math.h"

namespace bissl_fast {
namespace batch_norm_cpu {

namespace bn = batch_norm;

// Raw-pointer arguments of the channel-block loops (batch_norm_cpu_kernels.h). S: storage type, T:
// accumulation type. Per-channel arrays are T; an absent output is nullptr.
struct Geometry {
  int64_t n, c, l;
};

template <typename S, typename T>
struct FwdArgs {
  const S* x;
  S* y;
  const T *w, *b, *rm, *rv;
  T *mean, *invstd, *new_rm, *new_rv;
  bool training, update;
  T momentum, eps;
  Geometry ly;
};

template <typename S, typename T>
struct BwdArgs {
  const S *g, *x;
  S* gx;
  const T *w, *mean, *invstd;
  T *gw, *gb;
  bool training;
  Geometry ly;
};

template <typename S, typename T>
struct DbwdArgs {
  const S *ggx, *g, *x;
  S *gi, *gg;
  const T *ggw, *ggb, *w, *mean, *invstd;
  T* gw;
  bool training;
  Geometry ly;
};

// Offset of tangent j's pointer in a batched tensor of `per_tangent` elements per tangent; null stays null.
template <typename P>
P* tangent_ptr(P* p, int64_t j, int64_t per_tangent) {
  return p == nullptr ? nullptr : p + j * per_tangent;
}

// The batched ops: k tangents of grad_out (bwd) or of the cotangents (dbwd), stacked in front of the
// input's shape ([k, N, C, *]) or of [C]; tangent(j) is the single-tangent argument set of tangent j.
template <typename S, typename T>
struct BwdBatchedArgs {
  BwdArgs<S, T> base;  // tangent 0
  int64_t k, numel;
  BwdArgs<S, T> tangent(int64_t j) const {
    BwdArgs<S, T> a = base;
    a.g = tangent_ptr(a.g, j, numel);
    a.gx = tangent_ptr(a.gx, j, numel);
    a.gw = tangent_ptr(a.gw, j, a.ly.c);
    a.gb = tangent_ptr(a.gb, j, a.ly.c);
    return a;
  }
};

template <typename S, typename T>
struct DbwdBatchedArgs {
  DbwdArgs<S, T> base;  // tangent 0
  int64_t k, numel;
  DbwdArgs<S, T> tangent(int64_t j) const {
    DbwdArgs<S, T> a = base;
    a.ggx = tangent_ptr(a.ggx, j, numel);
    a.gi = tangent_ptr(a.gi, j, numel);
    a.gg = tangent_ptr(a.gg, j, numel);
    a.ggw = tangent_ptr(a.ggw, j, a.ly.c);
    a.ggb = tangent_ptr(a.ggb, j, a.ly.c);
    a.gw = tangent_ptr(a.gw, j, a.ly.c);
    return a;
  }
};

// kLanes accumulators of T in one vector (gcc/clang vector extension), for the row sums.
template <typename T>
struct Lanes;
template <>
struct Lanes<float> {
  typedef float type __attribute__((vector_size(bn::kLanes * sizeof(float))));
};
template <>
struct Lanes<double> {
  typedef double type __attribute__((vector_size(bn::kLanes * sizeof(double))));
};
template <typename T>
using LaneVec = typename Lanes<T>::type;

namespace baseline {
#include "batch_norm_cpu_kernels.h"
}  // namespace baseline

// gcc on x86 only: clang ignores `#pragma GCC target`, so there the baseline loops are all there is.
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define BISSL_BN_HAVE_AVX2_PATH 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "batch_norm_cpu_kernels.h"
}  // namespace avx2
#pragma GCC pop_options
#else
#define BISSL_BN_HAVE_AVX2_PATH 0
#endif

// The same loops compiled for AVX2 (8 floats per instruction instead of SSE2's 4), when the CPU has it.
bool use_avx2() {
#if BISSL_BN_HAVE_AVX2_PATH
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return supported;
#else
  return false;
#endif
}

#if BISSL_BN_HAVE_AVX2_PATH
#define BISSL_BN_BLOCK(fn, args, c0, c1) \
  (bc::use_avx2() ? bc::avx2::fn(args, c0, c1) : bc::baseline::fn(args, c0, c1))
#else
#define BISSL_BN_BLOCK(fn, args, c0, c1) bc::baseline::fn(args, c0, c1)
#endif

}  // namespace batch_norm_cpu

namespace {

namespace chk = batch_norm_checks;
namespace bc = batch_norm_cpu;

// Channels per parallel task: enough elements that the task outweighs the scheduling cost.
int64_t grain(const chk::Layout& ly) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(ly.n * ly.l, 1));
}

bc::Geometry geometry(const chk::Layout& ly) { return {ly.n, ly.c, ly.l}; }

at::Tensor empty_channel_output(bool wanted, int64_t c, const at::TensorOptions& opts) {
  return wanted ? empty_output({c}, opts) : at::empty({0}, opts);
}

template <typename T>
T* data_or_null(at::Tensor& t) {
  return t.numel() > 0 ? t.mutable_data_ptr<T>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_fwd_cpu(
    const at::Tensor& input_in, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var, bool training,
    double momentum, double eps) {
  const char* op = "batch_norm_fwd";
  const auto a = chk::fwd_args(input_in, weight, bias, running_mean, running_var, training, eps, op);
  const auto &input = a.input, &w = a.w, &b = a.b, &rm = a.rm, &rv = a.rv;
  const auto& ly = a.ly;
  const auto& acc_opts = a.acc_opts;
  const int64_t C = ly.c;
  const bool has_running = a.has_running, update = training && has_running;
  auto out = empty_output_like(input);
  auto save_mean = empty_output({C}, acc_opts);
  auto save_invstd = empty_output({C}, acc_opts);
  auto new_rm = empty_channel_output(update, C, acc_opts);
  auto new_rv = empty_channel_output(update, C, acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "batch_norm_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bc::FwdArgs<scalar_t, acc_t> args{
        input.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>(),
        w.const_data_ptr<acc_t>(),
        b.const_data_ptr<acc_t>(),
        has_running ? rm.const_data_ptr<acc_t>() : nullptr,
        has_running ? rv.const_data_ptr<acc_t>() : nullptr,
        save_mean.mutable_data_ptr<acc_t>(),
        save_invstd.mutable_data_ptr<acc_t>(),
        data_or_null<acc_t>(new_rm),
        data_or_null<acc_t>(new_rv),
        training,
        update,
        static_cast<acc_t>(momentum),
        static_cast<acc_t>(eps),
        geometry(ly)};
    at::parallel_for(0, C, grain(ly), [&](int64_t c0, int64_t c1) { BISSL_BN_BLOCK(fwd_block, args, c0, c1); });
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
  const auto a = chk::bwd_args(grad_out_in, input_in, weight, save_mean_in, save_invstd_in, op);
  const auto &input = a.input, &grad_out = a.grad_out, &w = a.w, &mean = a.mean, &invstd = a.invstd;
  const auto& ly = a.ly;
  const auto& acc_opts = a.acc_opts;
  const int64_t C = ly.c;
  auto gx = output_mask[0] ? empty_output_like(input) : at::empty({0}, input.options());
  auto gw = empty_channel_output(output_mask[1], C, acc_opts);
  auto gb = empty_channel_output(output_mask[2], C, acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "batch_norm_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bc::BwdArgs<scalar_t, acc_t> args{grad_out.const_data_ptr<scalar_t>(),
                                            input.const_data_ptr<scalar_t>(),
                                            data_or_null<scalar_t>(gx),
                                            w.const_data_ptr<acc_t>(),
                                            mean.const_data_ptr<acc_t>(),
                                            invstd.const_data_ptr<acc_t>(),
                                            data_or_null<acc_t>(gw),
                                            data_or_null<acc_t>(gb),
                                            training,
                                            geometry(ly)};
    at::parallel_for(0, C, grain(ly), [&](int64_t c0, int64_t c1) { BISSL_BN_BLOCK(bwd_block, args, c0, c1); });
  });
  const auto param_dtype = chk::param_dtype(weight, input);
  return {gx, gw.to(param_dtype), gb.to(param_dtype)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_dbwd_cpu(
    const std::optional<at::Tensor>& ggi_opt, const std::optional<at::Tensor>& ggw_opt,
    const std::optional<at::Tensor>& ggb_opt, const at::Tensor& grad_out_in, const at::Tensor& input_in,
    const std::optional<at::Tensor>& weight, const at::Tensor& save_mean_in, const at::Tensor& save_invstd_in,
    bool training, std::array<bool, 3> output_mask) {
  const char* op = "batch_norm_dbwd";
  const auto a = chk::dbwd_args(ggi_opt, ggw_opt, ggb_opt, grad_out_in, input_in, weight, save_mean_in,
                                save_invstd_in, op);
  const auto &input = a.base.input, &grad_out = a.base.grad_out, &w = a.base.w, &mean = a.base.mean,
             &invstd = a.base.invstd, &ggi = a.ggi, &ggw = a.ggw, &ggb = a.ggb;
  const auto& ly = a.base.ly;
  const auto& acc_opts = a.base.acc_opts;
  const int64_t C = ly.c;
  auto gi = output_mask[0] ? empty_output_like(input) : at::empty({0}, input.options());
  auto gg = output_mask[1] ? empty_output_like(input) : at::empty({0}, input.options());
  auto gw = empty_channel_output(output_mask[2], C, acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "batch_norm_dbwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bc::DbwdArgs<scalar_t, acc_t> args{ggi.defined() ? ggi.const_data_ptr<scalar_t>() : nullptr,
                                             grad_out.const_data_ptr<scalar_t>(),
                                             input.const_data_ptr<scalar_t>(),
                                             data_or_null<scalar_t>(gi),
                                             data_or_null<scalar_t>(gg),
                                             ggw.const_data_ptr<acc_t>(),
                                             ggb.const_data_ptr<acc_t>(),
                                             w.const_data_ptr<acc_t>(),
                                             mean.const_data_ptr<acc_t>(),
                                             invstd.const_data_ptr<acc_t>(),
                                             data_or_null<acc_t>(gw),
                                             training,
                                             geometry(ly)};
    at::parallel_for(0, C, grain(ly), [&](int64_t c0, int64_t c1) { BISSL_BN_BLOCK(dbwd_block, args, c0, c1); });
  });
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_bwd_batched_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& input_in, const std::optional<at::Tensor>& weight,
    const at::Tensor& save_mean_in, const at::Tensor& save_invstd_in, bool training, std::array<bool, 3> output_mask) {
  const char* op = "batch_norm_bwd_batched";
  const auto b = chk::bwd_batched_args(grad_out_in, input_in, weight, save_mean_in, save_invstd_in, op);
  const auto& a = b.base;
  const auto &input = a.input, &grad_out = a.grad_out, &w = a.w, &mean = a.mean, &invstd = a.invstd;
  const auto& ly = a.ly;
  const int64_t C = ly.c, K = b.k;
  auto gx = empty_batch_output(output_mask[0], K, input);
  auto gw = empty_batch_channel_output(output_mask[1], K, C, a.acc_opts);
  auto gb = empty_batch_channel_output(output_mask[2], K, C, a.acc_opts);
  if (K > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "batch_norm_bwd_batched_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const bc::BwdBatchedArgs<scalar_t, acc_t> args{{grad_out.const_data_ptr<scalar_t>(),
                                                      input.const_data_ptr<scalar_t>(),
                                                      data_or_null<scalar_t>(gx),
                                                      w.const_data_ptr<acc_t>(),
                                                      mean.const_data_ptr<acc_t>(),
                                                      invstd.const_data_ptr<acc_t>(),
                                                      data_or_null<acc_t>(gw),
                                                      data_or_null<acc_t>(gb),
                                                      training,
                                                      geometry(ly)},
                                                     K,
                                                     input.numel()};
      at::parallel_for(0, C, grain(ly), [&](int64_t c0, int64_t c1) {
        BISSL_BN_BLOCK(bwd_batched_block, args, c0, c1);
      });
    });
  }
  const auto param_dtype = chk::param_dtype(weight, input);
  return {gx, gw.to(param_dtype), gb.to(param_dtype)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_dbwd_batched_cpu(
    const std::optional<at::Tensor>& ggi_opt, const std::optional<at::Tensor>& ggw_opt,
    const std::optional<at::Tensor>& ggb_opt, const at::Tensor& grad_out_in, const at::Tensor& input_in,
    const std::optional<at::Tensor>& weight, const at::Tensor& save_mean_in, const at::Tensor& save_invstd_in,
    bool training, std::array<bool, 3> output_mask) {
  const char* op = "batch_norm_dbwd_batched";
  const auto b = chk::dbwd_batched_args(ggi_opt, ggw_opt, ggb_opt, grad_out_in, input_in, weight, save_mean_in,
                                        save_invstd_in, op);
  const auto &input = b.base.input, &grad_out = b.base.grad_out, &w = b.base.w, &mean = b.base.mean,
             &invstd = b.base.invstd, &ggi = b.ggi, &ggw = b.ggw, &ggb = b.ggb;
  const auto& ly = b.base.ly;
  const int64_t C = ly.c, K = b.k;
  auto gi = empty_batch_output(output_mask[0], K, input);
  auto gg = empty_batch_output(output_mask[1], K, input);
  auto gw = empty_batch_channel_output(output_mask[2], K, C, b.base.acc_opts);
  if (K > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "batch_norm_dbwd_batched_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const bc::DbwdBatchedArgs<scalar_t, acc_t> args{{ggi.defined() ? ggi.const_data_ptr<scalar_t>() : nullptr,
                                                       grad_out.const_data_ptr<scalar_t>(),
                                                       input.const_data_ptr<scalar_t>(),
                                                       data_or_null<scalar_t>(gi),
                                                       data_or_null<scalar_t>(gg),
                                                       ggw.const_data_ptr<acc_t>(),
                                                       ggb.const_data_ptr<acc_t>(),
                                                       w.const_data_ptr<acc_t>(),
                                                       mean.const_data_ptr<acc_t>(),
                                                       invstd.const_data_ptr<acc_t>(),
                                                       data_or_null<acc_t>(gw),
                                                       training,
                                                       geometry(ly)},
                                                      K,
                                                      input.numel()};
      at::parallel_for(0, C, grain(ly), [&](int64_t c0, int64_t c1) {
        BISSL_BN_BLOCK(dbwd_batched_block, args, c0, c1);
      });
    });
  }
  const auto param_dtype = chk::param_dtype(weight, input);
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
  m.def(
      "batch_norm_bwd_batched(Tensor grad_out, Tensor input, Tensor? weight, Tensor save_mean, Tensor save_invstd, "
      "bool training, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  m.def(
      "batch_norm_dbwd_batched(Tensor? ggI, Tensor? ggW, Tensor? ggB, Tensor grad_out, Tensor input, Tensor? weight, "
      "Tensor save_mean, Tensor save_invstd, bool training, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bissl_fast, CPU, m) {
  m.impl("batch_norm_fwd", &batch_norm_fwd_cpu);
  m.impl("batch_norm_bwd", &batch_norm_bwd_cpu);
  m.impl("batch_norm_dbwd", &batch_norm_dbwd_cpu);
  m.impl("batch_norm_bwd_batched", &batch_norm_bwd_batched_cpu);
  m.impl("batch_norm_dbwd_batched", &batch_norm_dbwd_batched_cpu);
}

}  // namespace bissl_fast
