// Argument checks and per-channel parameter handling shared by the CPU and CUDA implementations of
// the BatchNorm ops, so both reject bad input with the same messages.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

namespace bissl_fast {
namespace batch_norm_checks {

// The accumulation dtype: float for float/bf16/half inputs, double for double.
inline at::ScalarType acc_type(const at::Tensor& input) {
  return input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// input [N, C, *]: returns C.
inline int64_t check_input(const at::Tensor& input, const char* op) {
  TORCH_CHECK(input.dim() >= 2, op, ": input must be [N, C, *], got shape ", input.sizes());
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), op, ": expected a floating input dtype, got ",
              input.scalar_type());
  TORCH_CHECK(input.numel() > 0, op, ": input must not be empty, got shape ", input.sizes());
  return input.size(1);
}

inline void check_like(const at::Tensor& x, const at::Tensor& input, const char* name, const char* op) {
  TORCH_CHECK(x.sizes() == input.sizes(), op, ": ", name, " must have shape ", input.sizes(), ", got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == input.scalar_type(), op, ": ", name, " must have dtype ", input.scalar_type(),
              ", got ", x.scalar_type());
  TORCH_CHECK(x.device() == input.device(), op, ": ", name, " must be on ", input.device());
}

// A per-channel tensor [C]: the input's dtype, or float32 for a bf16/half input (mixed precision, as
// PyTorch allows), or the accumulation dtype for the saved statistics.
inline void check_channel(const at::Tensor& t, const at::Tensor& input, int64_t c, const char* name, const char* op) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == c, op, ": ", name, " must be [C] = [", c, "], got shape ", t.sizes());
  TORCH_CHECK(t.device() == input.device(), op, ": ", name, " must be on ", input.device());
  TORCH_CHECK(t.scalar_type() == input.scalar_type() || t.scalar_type() == acc_type(input), op, ": ", name,
              " must have dtype ", input.scalar_type(), " or ", acc_type(input), ", got ", t.scalar_type());
}

inline void check_optional_channel(const std::optional<at::Tensor>& t, const at::Tensor& input, int64_t c,
                                   const char* name, const char* op) {
  if (t.has_value() && t->defined()) check_channel(*t, input, c, name, op);
}

// A per-channel tensor in the accumulation dtype, contiguous ([C], a cheap copy at most); `fill` when absent.
inline at::Tensor channel_acc(const std::optional<at::Tensor>& t, const at::Tensor& input, int64_t c, double fill) {
  const auto opts = input.options().dtype(acc_type(input));
  if (!t.has_value() || !t->defined()) return at::full({c}, fill, opts);
  return t->to(acc_type(input)).contiguous();
}

inline bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// [N, C, L] view sizes of an input [N, C, *].
struct Layout {
  int64_t n, c, l;
};

inline Layout layout_of(const at::Tensor& input) {
  const int64_t n = input.size(0), c = input.size(1);
  return {n, c, c == 0 || n == 0 ? 0 : input.numel() / (n * c)};
}

// The validated, converted arguments of each op: the input (and grad_out, ggI) contiguous, the
// per-channel tensors in the accumulation dtype. CUDA callers set the device guard first.
struct FwdArgs {
  at::Tensor input, w, b, rm, rv;  // rm, rv undefined without running statistics
  Layout ly;
  at::TensorOptions acc_opts;
  bool has_running;
};

inline FwdArgs fwd_args(const at::Tensor& input_in, const std::optional<at::Tensor>& weight,
                        const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
                        const std::optional<at::Tensor>& running_var, bool training, double eps, const char* op) {
  const int64_t C = check_input(input_in, op);
  check_optional_channel(weight, input_in, C, "weight", op);
  check_optional_channel(bias, input_in, C, "bias", op);
  check_optional_channel(running_mean, input_in, C, "running_mean", op);
  check_optional_channel(running_var, input_in, C, "running_var", op);
  const bool has_running = present(running_mean);
  TORCH_CHECK(has_running == present(running_var), op, ": running_mean and running_var must be given together");
  TORCH_CHECK(training || has_running, op, ": eval mode (training=False) needs running_mean and running_var");
  TORCH_CHECK(eps >= 0, op, ": eps must be >= 0, got ", eps);
  const auto input = input_in.contiguous();
  const auto ly = layout_of(input);
  TORCH_CHECK(!training || ly.n * ly.l > 1, op,
              ": expected more than 1 value per channel when training, got input shape ", input.sizes());
  return {input,
          channel_acc(weight, input, C, 1.0),
          channel_acc(bias, input, C, 0.0),
          has_running ? channel_acc(running_mean, input, C, 0.0) : at::Tensor(),
          has_running ? channel_acc(running_var, input, C, 1.0) : at::Tensor(),
          ly,
          input.options().dtype(acc_type(input)),
          has_running};
}

struct BwdArgs {
  at::Tensor input, grad_out, w, mean, invstd;
  Layout ly;
  at::TensorOptions acc_opts;
};

inline BwdArgs bwd_args(const at::Tensor& grad_out_in, const at::Tensor& input_in,
                        const std::optional<at::Tensor>& weight, const at::Tensor& save_mean,
                        const at::Tensor& save_invstd, const char* op) {
  const int64_t C = check_input(input_in, op);
  check_like(grad_out_in, input_in, "grad_out", op);
  check_optional_channel(weight, input_in, C, "weight", op);
  check_channel(save_mean, input_in, C, "save_mean", op);
  check_channel(save_invstd, input_in, C, "save_invstd", op);
  const auto input = input_in.contiguous();
  return {input,
          grad_out_in.contiguous(),
          channel_acc(weight, input, C, 1.0),
          channel_acc(save_mean, input, C, 0.0),
          channel_acc(save_invstd, input, C, 1.0),
          layout_of(input),
          input.options().dtype(acc_type(input))};
}

struct DbwdArgs {
  BwdArgs base;
  at::Tensor ggi, ggw, ggb;  // ggi undefined when absent (a zero cotangent)
};

inline DbwdArgs dbwd_args(const std::optional<at::Tensor>& ggi, const std::optional<at::Tensor>& ggw,
                          const std::optional<at::Tensor>& ggb, const at::Tensor& grad_out_in,
                          const at::Tensor& input_in, const std::optional<at::Tensor>& weight,
                          const at::Tensor& save_mean, const at::Tensor& save_invstd, const char* op) {
  const int64_t C = check_input(input_in, op);
  if (present(ggi)) check_like(*ggi, input_in, "ggI", op);
  check_optional_channel(ggw, input_in, C, "ggW", op);
  check_optional_channel(ggb, input_in, C, "ggB", op);
  auto base = bwd_args(grad_out_in, input_in, weight, save_mean, save_invstd, op);
  const auto& input = base.input;
  return {base, present(ggi) ? ggi->contiguous() : at::Tensor(), channel_acc(ggw, input, C, 0.0),
          channel_acc(ggb, input, C, 0.0)};
}

// The batched ops (k tangents at once, for batched Hessian-vector products): full-size tangents are
// [k, *input.shape], per-channel ones [k, C].

// A full-size batch of tangents: returns k.
inline int64_t check_batch_like(const at::Tensor& x, const at::Tensor& input, const char* name, const char* op) {
  TORCH_CHECK(x.dim() == input.dim() + 1 && x.sizes().slice(1) == input.sizes(), op, ": ", name,
              " must have shape [k, ", input.sizes(), "...], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == input.scalar_type(), op, ": ", name, " must have dtype ", input.scalar_type(),
              ", got ", x.scalar_type());
  TORCH_CHECK(x.device() == input.device(), op, ": ", name, " must be on ", input.device());
  return x.size(0);
}

// A per-channel batch of tangents [k, C] (dtypes as check_channel): returns k.
inline int64_t check_batch_channel(const at::Tensor& t, const at::Tensor& input, int64_t c, const char* name,
                                   const char* op) {
  TORCH_CHECK(t.dim() == 2 && t.size(1) == c, op, ": ", name, " must be [k, C] = [k, ", c, "], got shape ", t.sizes());
  TORCH_CHECK(t.device() == input.device(), op, ": ", name, " must be on ", input.device());
  TORCH_CHECK(t.scalar_type() == input.scalar_type() || t.scalar_type() == acc_type(input), op, ": ", name,
              " must have dtype ", input.scalar_type(), " or ", acc_type(input), ", got ", t.scalar_type());
  return t.size(0);
}

struct BwdBatchedArgs {
  BwdArgs base;  // grad_out is the [k, N, C, *] batch
  int64_t k;
};

inline BwdBatchedArgs bwd_batched_args(const at::Tensor& grad_out_in, const at::Tensor& input_in,
                                       const std::optional<at::Tensor>& weight, const at::Tensor& save_mean,
                                       const at::Tensor& save_invstd, const char* op) {
  const int64_t C = check_input(input_in, op);
  const int64_t k = check_batch_like(grad_out_in, input_in, "grad_out", op);
  check_optional_channel(weight, input_in, C, "weight", op);
  check_channel(save_mean, input_in, C, "save_mean", op);
  check_channel(save_invstd, input_in, C, "save_invstd", op);
  const auto input = input_in.contiguous();
  return {{input, grad_out_in.contiguous(), channel_acc(weight, input, C, 1.0), channel_acc(save_mean, input, C, 0.0),
           channel_acc(save_invstd, input, C, 1.0), layout_of(input), input.options().dtype(acc_type(input))},
          k};
}

struct DbwdBatchedArgs {
  BwdArgs base;
  at::Tensor ggi, ggw, ggb;  // ggi [k, N, C, *] or undefined (zero cotangents); ggw, ggb [k, C] (zeros when absent)
  int64_t k;
};

inline DbwdBatchedArgs dbwd_batched_args(const std::optional<at::Tensor>& ggi, const std::optional<at::Tensor>& ggw,
                                         const std::optional<at::Tensor>& ggb, const at::Tensor& grad_out_in,
                                         const at::Tensor& input_in, const std::optional<at::Tensor>& weight,
                                         const at::Tensor& save_mean, const at::Tensor& save_invstd, const char* op) {
  const int64_t C = check_input(input_in, op);
  int64_t k = -1;
  const auto agree = [&](int64_t count, const char* name) {
    TORCH_CHECK(k < 0 || count == k, op, ": ", name, " holds ", count, " tangents, the other cotangents ", k);
    k = count;
  };
  if (present(ggi)) agree(check_batch_like(*ggi, input_in, "ggI", op), "ggI");
  if (present(ggw)) agree(check_batch_channel(*ggw, input_in, C, "ggW", op), "ggW");
  if (present(ggb)) agree(check_batch_channel(*ggb, input_in, C, "ggB", op), "ggB");
  TORCH_CHECK(k >= 0, op, ": at least one of ggI, ggW, ggB must be given (it sets the number of tangents)");
  auto base = bwd_args(grad_out_in, input_in, weight, save_mean, save_invstd, op);
  const auto opts = base.acc_opts;
  const auto per_channel = [&](const std::optional<at::Tensor>& t) {
    return present(t) ? t->to(acc_type(input_in)).contiguous() : at::zeros({k, C}, opts);
  };
  return {base, present(ggi) ? ggi->contiguous() : at::Tensor(), per_channel(ggw), per_channel(ggb), k};
}

// The dtype of weight/bias gradients: the weight's, or the input's when there is no weight.
inline at::ScalarType param_dtype(const std::optional<at::Tensor>& weight, const at::Tensor& input) {
  return present(weight) ? weight->scalar_type() : input.scalar_type();
}

}  // namespace batch_norm_checks
}  // namespace bissl_fast
