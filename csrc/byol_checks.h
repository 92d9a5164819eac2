// Argument checks shared by the CPU and CUDA implementations of the BYOL row ops, so both
// reject bad input with the same messages.
#pragma once

#include <ATen/ATen.h>

namespace bissl_fast {
namespace byol_checks {

inline void check_rows(const at::Tensor& p, const at::Tensor& t, const char* op) {
  TORCH_CHECK(p.dim() == 2, op, ": p must be 2-D [B, D], got shape ", p.sizes());
  TORCH_CHECK(p.sizes() == t.sizes(), op, ": p and t must have the same shape, got ", p.sizes(), " and ",
              t.sizes());
  TORCH_CHECK(p.scalar_type() == t.scalar_type(), op, ": p and t must share a dtype, got ", p.scalar_type(),
              " and ", t.scalar_type());
  TORCH_CHECK(p.device() == t.device(), op, ": p and t must be on one device");
  TORCH_CHECK(at::isFloatingType(p.scalar_type()), op, ": expected a floating dtype, got ", p.scalar_type());
}

inline void check_like(const at::Tensor& x, const at::Tensor& p, const char* name, const char* op) {
  TORCH_CHECK(x.sizes() == p.sizes(), op, ": ", name, " must have shape ", p.sizes(), ", got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == p.scalar_type(), op, ": ", name, " must have dtype ", p.scalar_type(), ", got ",
              x.scalar_type());
  TORCH_CHECK(x.device() == p.device(), op, ": ", name, " must be on ", p.device());
}

// A batch of k cotangents [k, B, D] for rows p [B, D].
inline void check_batch_like(const at::Tensor& x, const at::Tensor& p, const char* name, const char* op) {
  TORCH_CHECK(x.dim() == 3 && x.size(1) == p.size(0) && x.size(2) == p.size(1), op, ": ", name,
              " must have shape [k, ", p.size(0), ", ", p.size(1), "], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == p.scalar_type(), op, ": ", name, " must have dtype ", p.scalar_type(), ", got ",
              x.scalar_type());
  TORCH_CHECK(x.device() == p.device(), op, ": ", name, " must be on ", p.device());
}

inline void check_grad(const at::Tensor& grad, const at::Tensor& p, const char* op) {
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == p.size(0), op, ": grad must be [B] = [", p.size(0), "], got ",
              grad.sizes());
  TORCH_CHECK(grad.scalar_type() == p.scalar_type(), op, ": grad must have dtype ", p.scalar_type(), ", got ",
              grad.scalar_type());
  TORCH_CHECK(grad.device() == p.device(), op, ": grad must be on ", p.device());
}

}  // namespace byol_checks
}  // namespace bissl_fast
