// Stand-in for c10/cuda/CUDAStream.h in the CUDA emulation (tests/cuda_emu/vkemu.h): launches
// run synchronously, so there is one null stream.
#pragma once

namespace c10::cuda {
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream() { return {}; }
}  // namespace c10::cuda
