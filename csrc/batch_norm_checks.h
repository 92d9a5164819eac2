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

}  // namespace batch_norm_checks
}  // namespace bissl_fast
