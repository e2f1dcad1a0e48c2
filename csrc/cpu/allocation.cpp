// empty_output (allocation.h): at::empty on transparent huge pages for large buffers.
#include "cpu/allocation.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>

#include <cstdlib>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace vaekern::cpu {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;

struct HugePageAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    const size_t size = (n + kHugePage - 1) / kHugePage * kHugePage;
    void* p = nullptr;
    TORCH_CHECK(posix_memalign(&p, kHugePage, size) == 0, "vaekern (cpu): out of memory allocating ", n, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(p, size, MADV_HUGEPAGE);  // a hint: without THP the pages are simply small
#endif
    return {p, p, &std::free, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &std::free; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }
};

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t nbytes = c10::multiply_integers(sizes) * options.dtype().itemsize();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (nbytes >= 2 * kHugePage) {
    static HugePageAllocator allocator;
    return at::detail::empty_generic(sizes, &allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                     options.dtype().toScalarType(), std::nullopt);
  }
#endif
  return at::empty(sizes, options);
}

}  // namespace vaekern::cpu
