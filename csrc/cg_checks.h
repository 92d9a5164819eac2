// Argument checks shared by the CPU and CUDA implementations of the fused CG vector ops, so both
// reject bad input with the same messages, plus the chunk layout both index (bissl_fast/cg_math.h).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <utility>
#include <vector>

#include "bissl_fast/cg_math.h"

namespace bissl_fast {
namespace cg_checks {

// Every list has the length, shapes, dtype and device of the first one, and is contiguous.
inline void check_lists(const char* op, const std::vector<std::pair<const char*, at::TensorList>>& lists) {
  const at::TensorList ref = lists.front().second;
  TORCH_CHECK(!ref.empty(), op, ": ", lists.front().first, " must hold at least one tensor");
  const auto dtype = ref[0].scalar_type();
  const auto device = ref[0].device();
  TORCH_CHECK(at::isFloatingType(dtype), op, ": expected floating tensors, got ", dtype);
  for (const auto& [name, list] : lists) {
    TORCH_CHECK(list.size() == ref.size(), op, ": ", name, " has ", list.size(), " tensors, expected ", ref.size());
    for (size_t t = 0; t < list.size(); ++t) {
      TORCH_CHECK(list[t].sizes() == ref[t].sizes(), op, ": ", name, "[", t, "] has shape ", list[t].sizes(),
                  ", expected ", ref[t].sizes());
      TORCH_CHECK(list[t].scalar_type() == dtype, op, ": ", name, "[", t, "] has dtype ", list[t].scalar_type(),
                  ", expected ", dtype, " (one dtype for all tensors)");
      TORCH_CHECK(list[t].device() == device, op, ": ", name, "[", t, "] is on ", list[t].device(), ", expected ",
                  device);
      TORCH_CHECK(list[t].is_contiguous(), op, ": ", name, "[", t, "] must be contiguous");
    }
  }
}

// Per-tensor scalars (alpha, beta): float64 [T] on the lists' device.
inline void check_scalars(const char* op, const char* name, const at::Tensor& s, at::TensorList like) {
  TORCH_CHECK(s.dim() == 1 && s.size(0) == static_cast<int64_t>(like.size()), op, ": ", name,
              " must be [T] = [", like.size(), "], got shape ", s.sizes());
  TORCH_CHECK(s.scalar_type() == at::kDouble, op, ": ", name, " must be float64, got ", s.scalar_type());
  TORCH_CHECK(s.device() == like[0].device(), op, ": ", name, " must be on ", like[0].device(), ", got ",
              s.device());
}

// chunk_starts[t] = first chunk of tensor t; chunk_starts[T] = total number of chunks.
inline std::vector<int64_t> chunk_starts(at::TensorList ts) {
  std::vector<int64_t> starts(ts.size() + 1, 0);
  for (size_t t = 0; t < ts.size(); ++t) {
    starts[t + 1] = starts[t] + cg::num_chunks(ts[t].numel());
  }
  return starts;
}

}  // namespace cg_checks
}  // namespace bissl_fast
