// vkemu.h: runs vaekern's CUDA kernels (csrc/cuda) on the CPU, so that a machine without a
// GPU executes their indexing, vector paths, tails, shuffles and reductions in tests.
//
// tests/cuda_emu/build.py rewrites each csrc/cuda source before it compiles it as C++ with
// this header force-included (-include) and with include/ (fake c10/cuda headers) first on
// the include path:
//   kernel<<<grid, block, smem, stream>>>(args)  ->  vkemu::launch(grid, block, [&] { kernel(args); })
//   TORCH_LIBRARY_IMPL(vaekern, CUDA, m)        ->  TORCH_LIBRARY_IMPL(vaekern_cuda_emu, CPU, m)
//   .is_cuda()                                  ->  .is_cpu()
//   reinterpret_cast<V*>(p)                     ->  vkemu::aligned_ptr<V>(p)  (checks alignof(V))
//
// The model. Blocks run one after another. The threads of a block are fibers (ucontext) on
// one OS thread, switched only at __syncthreads and __shfl_xor_sync, so a run is
// deterministic. Where the hardware would hang or leave the result undefined, the launch
// throws instead:
//   - a full-mask shuffle that some lane of the warp never joins (it has exited, or it waits
//     at a __syncthreads);
//   - a __syncthreads that some thread of the block never reaches;
//   - a launch configuration that CUDA rejects (empty grid or block, block over 1024 threads);
//   - an access through a cast pointer (a vector load or store) below its type's alignment.
// The order in which blocks run, and in which a block's runnable threads are resumed, is
// VKEMU_SCHEDULE (read at each launch): "forward" (the default), "reverse" or
// "shuffled:<seed>". The hardware promises no order, so a result that changes with it
// reveals a race, such as a missing __syncthreads. Beyond that, memory ordering, data
// races and timing are not modelled, and device math is the host's libm: results agree
// with a GPU's to a few ulp, not bitwise.
#pragma once

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Blocks run one at a time, so one static per declaration is the block's shared memory.
#define __shared__ static

typedef struct vkemu_stream* cudaStream_t;

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
struct uint2 {
  uint32_t x, y;
};
struct uint4 {
  uint32_t x, y, z, w;
};
inline uint2 make_uint2(uint32_t x, uint32_t y) { return uint2{x, y}; }
inline uint4 make_uint4(uint32_t x, uint32_t y, uint32_t z, uint32_t w) { return uint4{x, y, z, w}; }
inline uint32_t __umulhi(uint32_t a, uint32_t b) { return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32); }
inline void sincospif(float x, float* s, float* c) {
  const double a = M_PI * static_cast<double>(x);
  *s = static_cast<float>(std::sin(a));
  *c = static_cast<float>(std::cos(a));
}

// CUDA's integer min and max. Its float overloads are fminf/fmaxf, which drop NaN; the kernels
// must not rely on them (common.cuh's clamps are compares), so they are not provided.
template <typename T>
inline T min(T a, T b) {
  static_assert(std::is_integral_v<T>, "vkemu: min of floats is fminf on the device; use a compare");
  return b < a ? b : a;
}
template <typename T>
inline T max(T a, T b) {
  static_assert(std::is_integral_v<T>, "vkemu: max of floats is fmaxf on the device; use a compare");
  return a < b ? b : a;
}

// Hidden, not internal: the translation units of one library share one Block (inline
// kernels and helpers are merged across them), but two libraries built on this header (the
// emulated ops and a test's kernels) must not share it through an exported symbol.
namespace vkemu __attribute__((visibility("hidden"))) {

enum State { kRunnable, kAtShuffle, kAtSync, kDone };

struct Thread {
  ucontext_t ctx;
  dim3 idx;
  State state;
};

constexpr size_t kStackBytes = 256 << 10;
constexpr unsigned kMaxThreads = 1024;

// One block in flight at a time (launches are synchronous and run on the calling thread).
struct Block {
  ucontext_t scheduler;
  std::vector<Thread> threads = std::vector<Thread>(kMaxThreads);
  std::vector<char*> stacks = std::vector<char*>(kMaxThreads, nullptr);
  uint64_t slots[kMaxThreads];  // a shuffle's values, one per thread
  unsigned n = 0;
  void (*body)(void*) = nullptr;
  void* closure = nullptr;
  Thread* current = nullptr;
  dim3 block_idx, block_dim, grid_dim;
  std::string error;  // set by a thread that hit an error; the scheduler throws it
  std::vector<unsigned> order;  // of the threads, for the current round
};

// VKEMU_SCHEDULE: 0 forward, 1 reverse, 2 shuffled with *seed.
inline int schedule(uint64_t* seed) {
  const char* s = std::getenv("VKEMU_SCHEDULE");
  if (s == nullptr || std::strcmp(s, "forward") == 0) return 0;
  if (std::strcmp(s, "reverse") == 0) return 1;
  if (std::strncmp(s, "shuffled:", 9) == 0) {
    *seed = std::strtoull(s + 9, nullptr, 10);
    return 2;
  }
  throw std::runtime_error(std::string("vkemu: VKEMU_SCHEDULE must be forward, reverse or shuffled:<seed>, got ") + s);
}

// 0..n-1 in the schedule's order.
inline void arrange(std::vector<unsigned>& v, unsigned n, int mode, std::mt19937_64& rng) {
  v.resize(n);
  std::iota(v.begin(), v.end(), 0u);
  if (mode == 1) std::reverse(v.begin(), v.end());
  if (mode == 2) std::shuffle(v.begin(), v.end(), rng);
}

inline Block& block() {
  static Block b;
  return b;
}

inline void yield(State s) {
  Block& b = block();
  Thread* t = b.current;
  t->state = s;
  swapcontext(&t->ctx, &b.scheduler);
}

inline void entry() {
  Block& b = block();
  b.body(b.closure);
  b.current->state = kDone;  // uc_link returns to the scheduler
}

// Thrown by the scheduler, never on a fiber's stack (it has no handler to unwind to).
[[noreturn]] inline void fail(std::string what) {  // a copy: it may be Block::error
  Block& b = block();
  const std::string where = " in block " + std::to_string(b.block_idx.x);
  b.error.clear();
  throw std::runtime_error("vkemu (CUDA emulation): " + what + where);
}

// An error inside a thread: recorded, and the thread never runs again.
inline void fail_in_thread(const std::string& what) {
  Block& b = block();
  b.error = what + " (thread " + std::to_string(b.current->idx.x) + ")";
  yield(kDone);
}

// Runs every thread of the current block until all have returned.
inline void run_block(int mode, std::mt19937_64& rng) {
  Block& b = block();
  for (unsigned i = 0; i < b.n; ++i) {
    Thread& t = b.threads[i];
    if (b.stacks[i] == nullptr) {
      void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED) throw std::runtime_error("vkemu: cannot map a fiber stack");
      b.stacks[i] = static_cast<char*>(p);
    }
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = b.stacks[i];
    t.ctx.uc_stack.ss_size = kStackBytes;
    t.ctx.uc_link = &b.scheduler;
    makecontext(&t.ctx, entry, 0);
    t.idx = dim3{i, 0, 0};
    t.state = kRunnable;
  }
  for (;;) {
    arrange(b.order, b.n, mode, rng);
    for (const unsigned i : b.order) {
      if (b.threads[i].state != kRunnable) continue;
      b.current = &b.threads[i];
      swapcontext(&b.scheduler, &b.threads[i].ctx);
      if (!b.error.empty()) fail(b.error);
    }
    // Nobody can run: release a barrier whose every participant has arrived.
    unsigned done = 0, at_sync = 0;
    bool released = false;
    for (unsigned w = 0; w * 32 < b.n; ++w) {
      const unsigned lo = w * 32, hi = std::min(b.n, lo + 32);
      unsigned shuffling = 0;
      for (unsigned i = lo; i < hi; ++i) shuffling += b.threads[i].state == kAtShuffle;
      if (shuffling == 0) continue;
      if (shuffling != 32) {
        fail("warp " + std::to_string(w) + ": a full-mask __shfl_xor_sync joined by " + std::to_string(shuffling) +
             " of its 32 lanes (the others have exited or wait at __syncthreads)");
      }
      for (unsigned i = lo; i < hi; ++i) b.threads[i].state = kRunnable;
      released = true;
    }
    if (released) continue;
    for (unsigned i = 0; i < b.n; ++i) {
      done += b.threads[i].state == kDone;
      at_sync += b.threads[i].state == kAtSync;
    }
    if (done == b.n) return;
    if (at_sync != b.n) {
      fail("__syncthreads reached by " + std::to_string(at_sync) + " of " + std::to_string(b.n) +
           " threads; the others have exited");
    }
    for (unsigned i = 0; i < b.n; ++i) b.threads[i].state = kRunnable;
  }
}

// p as a V*, for an access that the device makes only at V's alignment.
template <typename V, typename T>
V* aligned_ptr(T* p) {
  const auto address = reinterpret_cast<uintptr_t>(p);
  if (address % alignof(V) != 0) {
    fail_in_thread("misaligned address: a " + std::to_string(sizeof(V)) + "-byte access needs " +
                   std::to_string(alignof(V)) + "-byte alignment, at an address " +
                   std::to_string(address % alignof(V)) + " bytes past it");
  }
  return reinterpret_cast<V*>(p);
}

template <typename F>
void launch(unsigned grid, unsigned threads, F&& kernel) {
  if (grid == 0 || threads == 0 || threads > kMaxThreads || grid > 0x7fffffffu) {
    throw std::runtime_error("vkemu (CUDA emulation): invalid configuration argument: grid " + std::to_string(grid) +
                             ", block " + std::to_string(threads));
  }
  Block& b = block();
  b.n = threads;
  b.grid_dim = dim3{grid, 1, 1};
  b.block_dim = dim3{threads, 1, 1};
  b.closure = &kernel;
  b.body = [](void* k) { (*static_cast<std::remove_reference_t<F>*>(k))(); };
  uint64_t seed = 0;
  const int mode = schedule(&seed);
  std::mt19937_64 rng(seed);
  std::vector<unsigned> blocks;
  arrange(blocks, grid, mode, rng);
  for (const unsigned g : blocks) {
    b.block_idx = dim3{g, 1, 1};
    run_block(mode, rng);
  }
}

}  // namespace vkemu

#define threadIdx (::vkemu::block().current->idx)
#define blockIdx (::vkemu::block().block_idx)
#define blockDim (::vkemu::block().block_dim)
#define gridDim (::vkemu::block().grid_dim)

__attribute__((visibility("hidden"))) inline void __syncthreads() { vkemu::yield(vkemu::kAtSync); }

template <typename T>
__attribute__((visibility("hidden"))) inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>);
  if (mask != 0xffffffffu) vkemu::fail_in_thread("only full-mask shuffles are emulated");
  if (lane_mask < 0 || lane_mask > 31) vkemu::fail_in_thread("shuffle lane mask " + std::to_string(lane_mask));
  vkemu::Block& b = vkemu::block();
  const unsigned self = threadIdx.x;
  std::memcpy(&b.slots[self], &v, sizeof(T));
  vkemu::yield(vkemu::kAtShuffle);  // every lane has written
  T out;
  std::memcpy(&out, &b.slots[(self & ~31u) | ((self & 31u) ^ static_cast<unsigned>(lane_mask))], sizeof(T));
  vkemu::yield(vkemu::kAtShuffle);  // every lane has read, before any lane writes again
  return out;
}
