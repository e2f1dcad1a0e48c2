// kernels(): the capability table for this CPU (see vaekern_cpu.h).
#include <ATen/Version.h>

#include <string>

#include "cpu/vaekern_cpu.h"

namespace vaekern::cpu {

const Kernels& kernels() {
  // at::get_cpu_capability() is what PyTorch's own kernels use: the best the CPU and OS
  // support, lowered by ATEN_CPU_CAPABILITY=avx2|default.
  static const Kernels* const table = [] {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    const std::string cap = at::get_cpu_capability();
    if (cap == "AVX512") return &AVX512::kKernels;
    if (cap == "AVX2") return &AVX2::kKernels;
#endif
    return &DEFAULT::kKernels;
  }();
  return *table;
}

}  // namespace vaekern::cpu
