#include "output_alloc.h"

#include <atomic>
#include <cstdint>
#include <limits>

#include <c10/util/accumulate.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace bissl_fast {

namespace {
std::atomic<bool> poison_outputs{false};

#if defined(__linux__)
// glibc serves CPU allocations of 32 MiB and more (its mmap threshold's ceiling) with a fresh mapping each
// time, so every 4 KiB page of such an output faults on first write; a batched op's [k, ...] outputs are
// that large, and on a virtual machine those faults cost more than the kernel (docs/design.md §2.3).
// Outputs this large are mapped here instead, 2 MiB-aligned and advised as transparent huge pages: the
// same fresh mapping and the same release on free, with 512 times fewer faults where the kernel allows
// huge pages (transparent_hugepage "madvise" or "always"; otherwise nothing changes).
constexpr size_t kHugePageBytes = size_t(2) << 20;
constexpr size_t kMappedOutputBytes = size_t(32) << 20;

at::Tensor empty_mapped(at::IntArrayRef sizes, const at::TensorOptions& options, size_t nbytes) {
  const size_t length = nbytes + kHugePageBytes;
  void* base = mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) return at::empty(sizes, options);
  const auto address = (reinterpret_cast<uintptr_t>(base) + kHugePageBytes - 1) & ~(kHugePageBytes - 1);
  void* data = reinterpret_cast<void*>(address);
  madvise(data, nbytes, MADV_HUGEPAGE);
  return at::from_blob(data, sizes, [base, length](void*) { munmap(base, length); }, options);
}
#endif

at::Tensor empty_uninitialized(at::IntArrayRef sizes, const at::TensorOptions& options) {
#if defined(__linux__)
  if (options.device().is_cpu() && !options.pinned_memory()) {
    const size_t nbytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
    if (nbytes >= kMappedOutputBytes) return empty_mapped(sizes, options, nbytes);
  }
#endif
  return at::empty(sizes, options);
}
}  // namespace

void set_poison_outputs(bool enabled) { poison_outputs.store(enabled); }

bool poison_outputs_enabled() { return poison_outputs.load(); }

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  auto out = empty_uninitialized(sizes, options);
  if (poison_outputs.load() && at::isFloatingType(out.scalar_type())) {
    out.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  return out;
}

}  // namespace bissl_fast
