// Output allocation for the compiled ops, mirroring bissl_fast/_alloc.py: while the test suite
// poisons outputs (bissl_fast._alloc.poison_outputs), every output starts as NaN, so an element a
// kernel forgets to write fails the comparison against the reference instead of passing by luck.
#pragma once

#include <ATen/ATen.h>

namespace bissl_fast {

void set_poison_outputs(bool enabled);
bool poison_outputs_enabled();

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

inline at::Tensor empty_output_like(const at::Tensor& t) {
  return empty_output(t.sizes(), t.options());
}

}  // namespace bissl_fast
