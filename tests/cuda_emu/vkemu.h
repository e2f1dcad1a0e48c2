// vkemu.h: runs vaekern's CUDA kernels (csrc/cuda) on the CPU, so that a machine without a
// GPU executes their indexing, vector paths, tails, shuffles and reductions in tests.
//
// tests/cuda_emu/build.py rewrites each csrc/cuda source before it compiles it as C++ with
// this header force-included (-include) and with include/ (fake c10/cuda headers) first on
// the include path:
//   kernel<<<grid, block, smem, stream>>>(args)  ->  the args evaluated once, on the host, then
//                                                   vkemu::launch(grid, block, <kernel(args) per thread>,
//                                                                 <the kernel's __launch_bounds__>)
//   TORCH_LIBRARY_IMPL(vaekern, CUDA, m)        ->  TORCH_LIBRARY_IMPL(vaekern_cuda_emu, CPU, m)
//   .is_cuda()                                  ->  .is_cpu()
//   reinterpret_cast<V*>(p)                     ->  vkemu::aligned_ptr<V>(p)  (checks alignof(V))
//   __shared__ T name[N];                       ->  the same, then vkemu::fresh_shared(&name, ...)
//
// The model. Blocks run one after another (one launch at a time per process). The threads
// of a block are fibers (ucontext) on one OS thread, switched only at __syncthreads and
// __shfl_xor_sync, so a run is deterministic. Where the hardware would hang or leave the
// result undefined, the launch throws instead:
//   - a full-mask shuffle that some lane of the warp never joins (it has exited, or it waits
//     at a __syncthreads), or whose lanes are at different shuffles (another lane mask or
//     phase, or another line of code: the line of the __shfl_xor_sync itself, so lanes that
//     reach one shuffle through different calls of a helper are not told apart);
//   - a __syncthreads that some thread of the block never reaches, or reaches at another
//     call site;
//   - a launch configuration that CUDA rejects (empty grid or block, block over 1024 threads
//     or over the kernel's __launch_bounds__);
//   - an access through a cast pointer (a vector load or store) below its type's alignment;
//   - an exception thrown inside a thread.
// Shared memory starts each block as 0xFF bytes (NaN as floats), as the device gives no
// block another's data. The order of blocks, and of the threads and warps of a block, is
// VKEMU_SCHEDULE (read at each launch):
//   "forward"          (the default) warps in lockstep, from shuffle to shuffle;
//   "reverse"          the same, last thread first;
//   "shuffled:<seed>"  the same, in a random order;
//   "greedy"           one warp at a time, last first, each run until it waits at a
//                      __syncthreads or exits, so that warps drift apart as far as they can.
// The hardware promises no order, so a result that changes with it reveals a race, such as
// a missing __syncthreads. Beyond that, memory ordering and timing are not modelled, and
// device math is the host's libm: results agree with a GPU's to a few ulp, not bitwise.
#pragma once

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <mutex>
#include <random>
#include <source_location>
#include <stdexcept>
#include <tuple>
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
struct alignas(8) uint2 {
  uint32_t x, y;
};
struct alignas(16) uint4 {
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

// Where a thread waits: the call site of its __syncthreads or shuffle, and for a shuffle
// its lane mask and phase (0 written, 1 read).
struct Wait {
  const char* file = nullptr;
  unsigned line = 0, column = 0;
  int lane_mask = 0, phase = 0;

  bool operator==(const Wait&) const = default;
  std::string where() const { return std::string(file) + ":" + std::to_string(line); }
};

struct Thread {
  ucontext_t ctx;
  dim3 idx;
  State state;
  Wait wait;
};

constexpr size_t kStackBytes = 256 << 10;
constexpr size_t kGuardBytes = 4096;  // a PROT_NONE page under each stack: an overflow faults
constexpr unsigned kMaxThreads = 1024;

enum Mode { kForward, kReverse, kShuffled, kGreedy };

// The block in flight.
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
  uint64_t generation = 0;  // of blocks run, for fresh_shared
  std::vector<std::pair<void*, uint64_t>> shared;  // shared arrays and the block that last filled them
};

inline Mode schedule(uint64_t* seed) {
  const char* s = std::getenv("VKEMU_SCHEDULE");
  if (s == nullptr || std::strcmp(s, "forward") == 0) return kForward;
  if (std::strcmp(s, "reverse") == 0) return kReverse;
  if (std::strcmp(s, "greedy") == 0) return kGreedy;
  if (std::strncmp(s, "shuffled:", 9) == 0) {
    *seed = std::strtoull(s + 9, nullptr, 10);
    return kShuffled;
  }
  throw std::runtime_error(
      std::string("vkemu: VKEMU_SCHEDULE must be forward, reverse, shuffled:<seed> or greedy, got ") + s);
}

// 0..n-1 in the schedule's order.
inline void arrange(std::vector<unsigned>& v, unsigned n, Mode mode, std::mt19937_64& rng) {
  v.resize(n);
  std::iota(v.begin(), v.end(), 0u);
  if (mode == kReverse || mode == kGreedy) std::reverse(v.begin(), v.end());
  if (mode == kShuffled) std::shuffle(v.begin(), v.end(), rng);
}

inline Block& block() {
  static Block b;
  return b;
}

inline void yield(State s, const Wait& w = Wait{}) {
  Block& b = block();
  Thread* t = b.current;
  t->state = s;
  t->wait = w;
  swapcontext(&t->ctx, &b.scheduler);
}

inline void entry() {
  Block& b = block();
  try {
    b.body(b.closure);
  } catch (const std::exception& e) {
    b.error = std::string("exception in a thread: ") + e.what();
  }
  b.current->state = kDone;  // uc_link returns to the scheduler
}

// Thrown by the scheduler, never on a fiber's stack.
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

// The first thread of a block to reach a __shared__ declaration fills it with 0xFF bytes.
inline void fresh_shared(void* p, size_t bytes) {
  Block& b = block();
  for (auto& [q, gen] : b.shared) {
    if (q == p) {
      if (gen != b.generation) std::memset(p, 0xFF, bytes);
      gen = b.generation;
      return;
    }
  }
  std::memset(p, 0xFF, bytes);
  b.shared.emplace_back(p, b.generation);
}

inline unsigned warps() { return (block().n + 31) / 32; }

inline bool warp_runnable(unsigned w) {
  Block& b = block();
  for (unsigned i = w * 32; i < std::min(b.n, w * 32 + 32); ++i) {
    if (b.threads[i].state == kRunnable) return true;
  }
  return false;
}

// True if all 32 lanes of warp w (none of them runnable) wait at the same shuffle; false
// if none waits at one; an error if only some do, or at different shuffles.
inline bool warp_at_shuffle(unsigned w) {
  Block& b = block();
  const unsigned lo = w * 32, hi = std::min(b.n, lo + 32);
  unsigned shuffling = 0;
  for (unsigned i = lo; i < hi; ++i) shuffling += b.threads[i].state == kAtShuffle;
  if (shuffling == 0) return false;
  if (shuffling != 32) {
    fail("warp " + std::to_string(w) + ": a full-mask __shfl_xor_sync joined by " + std::to_string(shuffling) +
         " of its 32 lanes (the others have exited or wait at __syncthreads)");
  }
  for (unsigned i = lo + 1; i < hi; ++i) {
    const Wait &a = b.threads[lo].wait, &c = b.threads[i].wait;
    if (!(a == c)) {
      fail("warp " + std::to_string(w) + ": lanes at different shuffles: lane 0 at " + a.where() + " (lane mask " +
           std::to_string(a.lane_mask) + ", phase " + std::to_string(a.phase) + "), lane " +
           std::to_string(i - lo) + " at " + c.where() + " (lane mask " + std::to_string(c.lane_mask) + ", phase " +
           std::to_string(c.phase) + ")");
    }
  }
  return true;
}

inline void run_threads(const std::vector<unsigned>& order, unsigned lo, unsigned hi) {
  Block& b = block();
  for (const unsigned i : order) {
    if (i < lo || i >= hi || b.threads[i].state != kRunnable) continue;
    b.current = &b.threads[i];
    swapcontext(&b.scheduler, &b.threads[i].ctx);
    if (!b.error.empty()) fail(b.error);
  }
}

inline void release_warp(unsigned w) {
  Block& b = block();
  for (unsigned i = w * 32; i < std::min(b.n, w * 32 + 32); ++i) b.threads[i].state = kRunnable;
}

// One step of the greedy schedule: the warp that ran last goes on while it can (running,
// or through its next shuffle); else the last warp that can run; else the last warp whose
// shuffle is complete. False when no warp can go on.
inline bool greedy_step(unsigned* last) {
  const std::vector<unsigned>& order = block().order;
  const unsigned nw = warps();
  if (*last < nw && warp_runnable(*last)) {
    run_threads(order, *last * 32, *last * 32 + 32);
    return true;
  }
  if (*last < nw && warp_at_shuffle(*last)) {
    release_warp(*last);
    return true;
  }
  for (unsigned w = nw; w-- > 0;) {
    if (warp_runnable(w)) {
      *last = w;
      run_threads(order, w * 32, w * 32 + 32);
      return true;
    }
  }
  for (unsigned w = nw; w-- > 0;) {
    if (warp_at_shuffle(w)) {
      *last = w;
      release_warp(w);
      return true;
    }
  }
  return false;
}

// One step of the lockstep schedules: every runnable thread runs to its next wait, then
// every warp whose shuffle is complete is released. False when no thread ran or went on.
inline bool lockstep_step() {
  Block& b = block();
  bool any = false;
  for (unsigned w = 0; w < warps(); ++w) any = any || warp_runnable(w);
  if (any) run_threads(b.order, 0, b.n);
  bool released = false;
  for (unsigned w = 0; w < warps(); ++w) {
    if (warp_at_shuffle(w)) {
      release_warp(w);
      released = true;
    }
  }
  return any || released;
}

// Runs every thread of the current block until all have returned.
inline void run_block(Mode mode, std::mt19937_64& rng) {
  Block& b = block();
  ++b.generation;
  for (unsigned i = 0; i < b.n; ++i) {
    Thread& t = b.threads[i];
    if (b.stacks[i] == nullptr) {
      void* p = mmap(nullptr, kGuardBytes + kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED || mprotect(p, kGuardBytes, PROT_NONE) != 0) {
        throw std::runtime_error("vkemu: cannot map a fiber stack");
      }
      b.stacks[i] = static_cast<char*>(p) + kGuardBytes;
    }
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = b.stacks[i];
    t.ctx.uc_stack.ss_size = kStackBytes;
    t.ctx.uc_link = &b.scheduler;
    makecontext(&t.ctx, entry, 0);
    t.idx = dim3{i, 0, 0};
    t.state = kRunnable;
  }
  unsigned last = ~0u;
  for (;;) {
    arrange(b.order, b.n, mode, rng);
    if (mode == kGreedy ? greedy_step(&last) : lockstep_step()) continue;
    // Nobody can go on: every thread has returned, or all wait at one __syncthreads.
    unsigned done = 0, at_sync = 0;
    for (unsigned i = 0; i < b.n; ++i) {
      done += b.threads[i].state == kDone;
      at_sync += b.threads[i].state == kAtSync;
    }
    if (done == b.n) return;
    if (at_sync != b.n) {
      fail("__syncthreads reached by " + std::to_string(at_sync) + " of " + std::to_string(b.n) +
           " threads; the others have exited");
    }
    for (unsigned i = 1; i < b.n; ++i) {
      if (!(b.threads[i].wait == b.threads[0].wait)) {
        fail("__syncthreads at different call sites: thread 0 at " + b.threads[0].wait.where() + ", thread " +
             std::to_string(i) + " at " + b.threads[i].wait.where());
      }
    }
    for (unsigned i = 0; i < b.n; ++i) b.threads[i].state = kRunnable;
    last = ~0u;  // past a barrier, the greedy schedule starts again from the last warp
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

// Runs kernel() as every thread of a grid x threads launch, to completion; max_threads is
// the kernel's __launch_bounds__ (1024 without).
template <typename F>
void launch(unsigned grid, unsigned threads, F&& kernel, unsigned max_threads) {
  if (grid == 0 || threads == 0 || threads > kMaxThreads || grid > 0x7fffffffu) {
    throw std::runtime_error("vkemu (CUDA emulation): invalid configuration argument: grid " + std::to_string(grid) +
                             ", block " + std::to_string(threads));
  }
  if (threads > max_threads) {
    throw std::runtime_error("vkemu (CUDA emulation): too many resources requested for launch: block " +
                             std::to_string(threads) + " over the kernel's __launch_bounds__ of " +
                             std::to_string(max_threads));
  }
  static std::mutex one_at_a_time;  // one Block: ops called from two threads take turns
  const std::lock_guard<std::mutex> lock(one_at_a_time);
  Block& b = block();
  b.n = threads;
  b.grid_dim = dim3{grid, 1, 1};
  b.block_dim = dim3{threads, 1, 1};
  b.closure = &kernel;
  b.body = [](void* k) { (*static_cast<std::remove_reference_t<F>*>(k))(); };
  uint64_t seed = 0;
  const Mode mode = schedule(&seed);
  std::mt19937_64 rng(seed);
  std::vector<unsigned> blocks;
  arrange(blocks, grid, mode, rng);
  for (const unsigned g : blocks) {
    b.block_idx = dim3{g, 0, 0};
    run_block(mode, rng);
  }
}

}  // namespace vkemu

#define threadIdx (::vkemu::block().current->idx)
#define blockIdx (::vkemu::block().block_idx)
#define blockDim (::vkemu::block().block_dim)
#define gridDim (::vkemu::block().grid_dim)

__attribute__((visibility("hidden"))) inline void __syncthreads(
    const std::source_location site = std::source_location::current()) {
  vkemu::yield(vkemu::kAtSync, vkemu::Wait{site.file_name(), site.line(), site.column()});
}

template <typename T>
__attribute__((visibility("hidden"))) inline T __shfl_xor_sync(
    unsigned mask, T v, int lane_mask, int width = 32,
    const std::source_location site = std::source_location::current()) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>);
  if (mask != 0xffffffffu) vkemu::fail_in_thread("only full-mask shuffles are emulated");
  if (width != 32) vkemu::fail_in_thread("only shuffles over the whole warp (width 32) are emulated");
  if (lane_mask < 0 || lane_mask > 31) vkemu::fail_in_thread("shuffle lane mask " + std::to_string(lane_mask));
  vkemu::Block& b = vkemu::block();
  const unsigned self = threadIdx.x;
  vkemu::Wait w{site.file_name(), site.line(), site.column(), lane_mask, 0};
  std::memcpy(&b.slots[self], &v, sizeof(T));
  vkemu::yield(vkemu::kAtShuffle, w);  // every lane has written
  T out;
  std::memcpy(&out, &b.slots[(self & ~31u) | ((self & 31u) ^ static_cast<unsigned>(lane_mask))], sizeof(T));
  w.phase = 1;
  vkemu::yield(vkemu::kAtShuffle, w);  // every lane has read, before any lane writes again
  return out;
}
