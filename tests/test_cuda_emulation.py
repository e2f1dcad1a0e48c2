"""The CPU emulation of CUDA kernels (tests/cuda_emu) checked on its own.

The cuda backend's tests trust it without a GPU, so it must run warps and blocks as the
hardware does where the kernels depend on it (shuffles, barriers, shared memory, the
launch grid) and fail where the hardware would hang or be undefined. Small kernels written
here show both; the source rewriting is checked on the launch forms csrc/cuda uses.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys

import pytest
import torch

from cuda_emu import build

from vaekern._ops._common import KL_COLUMNS

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the emulation needs Linux (ucontext)")

KERNELS = r"""
#include <cstring>
#include <stdexcept>

__device__ int warp_sum(int v) {
  for (int off = 16; off >= 1; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

__global__ void sums_kernel(int* lane_sums, int* block_sums) {
  __shared__ int warps[32];
  const int v = warp_sum(static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x));
  lane_sums[blockIdx.x * blockDim.x + threadIdx.x] = v;
  if ((threadIdx.x & 31) == 0) warps[threadIdx.x >> 5] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    int s = 0;
    for (unsigned w = 0; w < blockDim.x / 32; ++w) s += warps[w];
    block_sums[blockIdx.x] = s;
  }
}

__global__ void early_exit_kernel(int* out) {
  if (threadIdx.x % 32 >= 16) return;
  out[threadIdx.x] = warp_sum(1);
}

__global__ void divergent_sync_kernel(int* out) {
  if (threadIdx.x == 5) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void shuffle_in_sync_kernel(int* out) {
  if (threadIdx.x < 32) {
    out[threadIdx.x] = warp_sum(1);
  } else {
    __syncthreads();
  }
}

__global__ void racy_kernel(int* out) {
  __shared__ int x;
  if (threadIdx.x == 0) x = 7;
  if (threadIdx.x == 1) x = x + 1;  // no __syncthreads in between: a race
  __syncthreads();
  if (threadIdx.x == 0) out[0] = x;
}

// block_sum of common.cuh without its first barrier, called twice: warp 1 may overwrite
// its partial of the first call before warp 0 has read it.
__device__ int block_sum_without_first_barrier(int v) {
  __shared__ int warps[32];
  v = warp_sum(v);
  if ((threadIdx.x & 31) == 0) warps[threadIdx.x >> 5] = v;
  __syncthreads();
  if (threadIdx.x >= 32) return 0;
  return warp_sum(threadIdx.x < blockDim.x / 32 ? warps[threadIdx.x] : 0);
}

__global__ void two_sums_kernel(int* out) {
  const int a = block_sum_without_first_barrier(1);
  const int b = block_sum_without_first_barrier(2);
  if (threadIdx.x == 0) {
    out[0] = a;
    out[1] = b;
  }
}

__global__ void split_shuffle_kernel(int* out) {
  // Lanes 0-15 and 16-31 at different shuffles: undefined on the device.
  if (threadIdx.x < 16) {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 1);
  } else {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 2, 1);
  }
}

__global__ void split_lane_mask_kernel(int* out) {
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, threadIdx.x < 16 ? 1 : 2);
}

__global__ void split_sync_kernel(int* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void stale_shared_kernel(int* out) {
  __shared__ int slot;
  if (blockIdx.x == 0) slot = 42;  // the other blocks read it without writing it
  __syncthreads();
  if (threadIdx.x == 0) out[blockIdx.x] = slot;
}

__global__ void throwing_kernel(int* out) {
  if (threadIdx.x == 3) throw std::runtime_error("boom");
  out[threadIdx.x] = 1;
}

__global__ void __launch_bounds__(32) small_kernel(int* out) { out[threadIdx.x] = 1; }

struct alignas(16) Float4 {
  float v[4];
};

__global__ void vector_copy_kernel(const float* in, float* out) {
  *reinterpret_cast<Float4*>(out + 4 * threadIdx.x) = *reinterpret_cast<const Float4*>(in + 4 * threadIdx.x);
}

template <typename F>
static int run(F f, char* err, int n) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    std::strncpy(err, e.what(), n - 1);
    err[n - 1] = 0;
    return 1;
  }
}

extern "C" {
int sums(unsigned grid, unsigned block, int* lane_sums, int* block_sums, char* err, int n) {
  return run([&] { sums_kernel<<<grid, block, 0, nullptr>>>(lane_sums, block_sums); }, err, n);
}
int early_exit(int* out, char* err, int n) {
  return run([&] { early_exit_kernel<<<1, 64>>>(out); }, err, n);
}
int divergent_sync(int* out, char* err, int n) {
  return run([&] { divergent_sync_kernel<<<2, 64>>>(out); }, err, n);
}
int racy(int* out, char* err, int n) {
  return run([&] { racy_kernel<<<1, 32>>>(out); }, err, n);
}
int two_sums(int* out, char* err, int n) {
  return run([&] { two_sums_kernel<<<1, 64>>>(out); }, err, n);
}
int split_shuffle(int* out, char* err, int n) {
  return run([&] { split_shuffle_kernel<<<1, 32>>>(out); }, err, n);
}
int split_lane_mask(int* out, char* err, int n) {
  return run([&] { split_lane_mask_kernel<<<1, 32>>>(out); }, err, n);
}
int split_sync(int* out, char* err, int n) {
  return run([&] { split_sync_kernel<<<1, 64>>>(out); }, err, n);
}
int stale_shared(int* out, char* err, int n) {
  return run([&] { stale_shared_kernel<<<3, 32>>>(out); }, err, n);
}
int throwing(int* out, char* err, int n) {
  return run([&] { throwing_kernel<<<1, 32>>>(out); }, err, n);
}
int small(unsigned block, int* out, char* err, int n) {
  return run([&] { small_kernel<<<1, block>>>(out); }, err, n);
}
int vector_copy(const float* in, float* out, char* err, int n) {
  return run([&] { vector_copy_kernel<<<1, 32>>>(in, out); }, err, n);
}
int shuffle_in_sync(int* out, char* err, int n) {
  return run([&] { shuffle_in_sync_kernel<<<1, 64>>>(out); }, err, n);
}
}
"""


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    d = tmp_path_factory.mktemp("vkemu")
    (d / "kernels.cpp").write_text(build.rewrite(KERNELS))
    cmd = [cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-Wno-unknown-pragmas", "-include", str(build.HERE / "vkemu.h"),
           str(d / "kernels.cpp"), "-o", str(d / "kernels.so")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return ctypes.CDLL(str(d / "kernels.so"))


def _call(fn, *args):
    err = ctypes.create_string_buffer(512)
    rc = fn(*args, err, len(err))
    return rc, err.value.decode()


def test_shuffles_shared_memory_and_barriers_compute_what_the_hardware_does(lib):
    grid, block = 3, 96
    lanes = (ctypes.c_int * (grid * block))()
    blocks = (ctypes.c_int * grid)()
    rc, err = _call(lib.sums, grid, block, lanes, blocks)
    assert rc == 0, err
    for t in range(grid * block):
        w = t // 32 * 32
        assert lanes[t] == sum(range(w, w + 32)), t  # every lane holds its warp's sum
    for b in range(grid):
        assert blocks[b] == sum(range(b * block, (b + 1) * block))


def test_a_shuffle_missing_lanes_is_an_error(lib):
    rc, err = _call(lib.early_exit, (ctypes.c_int * 64)())
    assert rc == 1 and "joined by 16 of its 32 lanes" in err


def test_a_barrier_that_some_threads_never_reach_is_an_error(lib):
    rc, err = _call(lib.divergent_sync, (ctypes.c_int * 64)())  # one thread has exited
    assert rc == 1 and "__syncthreads reached by 63 of 64 threads" in err and "block 0" in err
    rc, err = _call(lib.shuffle_in_sync, (ctypes.c_int * 64)())  # warp 0 never gets there
    assert rc == 1 and "__syncthreads reached by 32 of 64 threads" in err


def test_a_launch_that_cuda_rejects_is_an_error(lib):
    for grid, block in ((0, 32), (1, 0), (1, 1025)):
        rc, err = _call(lib.sums, grid, block, (ctypes.c_int * 2048)(), (ctypes.c_int * 1)())
        assert rc == 1 and "invalid configuration" in err
    assert _call(lib.small, 32, (ctypes.c_int * 64)()) == (0, "")
    rc, err = _call(lib.small, 64, (ctypes.c_int * 64)())
    assert rc == 1 and "over the kernel's __launch_bounds__ of 32" in err


def test_lanes_at_different_shuffles_or_barriers_are_an_error(lib):
    rc, err = _call(lib.split_shuffle, (ctypes.c_int * 32)())
    assert rc == 1 and "lanes at different shuffles" in err
    rc, err = _call(lib.split_lane_mask, (ctypes.c_int * 32)())
    assert rc == 1 and "lane mask 1" in err and "lane mask 2" in err
    rc, err = _call(lib.split_sync, (ctypes.c_int * 64)())
    assert rc == 1 and "__syncthreads at different call sites" in err


def test_shared_memory_starts_each_block_fresh(lib):
    out = (ctypes.c_int * 3)()
    assert _call(lib.stale_shared, out) == (0, "")
    assert list(out) == [42, -1, -1]  # 0xFFFFFFFF: what block 0 left is not there


def test_an_exception_inside_a_thread_is_an_error(lib):
    rc, err = _call(lib.throwing, (ctypes.c_int * 32)())
    assert rc == 1 and "exception in a thread: boom" in err and "(thread 3)" not in err


def test_a_misaligned_vector_access_is_an_error(lib):
    src = (ctypes.c_float * 132)(*range(132))  # ctypes arrays of floats are 16-byte aligned
    dst = (ctypes.c_float * 132)()
    assert ctypes.addressof(src) % 16 == 0 and ctypes.addressof(dst) % 16 == 0
    assert _call(lib.vector_copy, src, dst) == (0, "")
    assert list(dst)[:128] == list(src)[:128]
    rc, err = _call(lib.vector_copy, ctypes.byref(src, 4), dst)
    assert rc == 1 and "misaligned address: a 16-byte access needs 16-byte alignment" in err


@pytest.fixture
def schedule(monkeypatch):
    """Sets VKEMU_SCHEDULE, which the emulation reads at each launch."""
    return lambda name: monkeypatch.setenv("VKEMU_SCHEDULE", name)


def test_the_schedule_exposes_a_race(lib, schedule):
    results = {}
    for name in ("forward", "reverse"):
        schedule(name)
        out = (ctypes.c_int * 1)()
        assert _call(lib.racy, out) == (0, "")
        results[name] = out[0]
    assert results == {"forward": 8, "reverse": 7}
    # Warps in lockstep read a block's partials before any warp moves on; the greedy
    # schedule runs warp 1 through its second sum first, which the missing barrier allows.
    sums = {}
    for name in ("forward", "reverse", "shuffled:3", "greedy"):
        schedule(name)
        out = (ctypes.c_int * 2)()
        assert _call(lib.two_sums, out) == (0, "")
        sums[name] = tuple(out)
    assert sums["forward"] == sums["reverse"] == sums["shuffled:3"] == (64, 128)
    assert sums["greedy"] != (64, 128)
    schedule("sideways")
    rc, err = _call(lib.racy, (ctypes.c_int * 1)())
    assert rc == 1 and "VKEMU_SCHEDULE" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the real kernels run on this machine")
def test_cuda_kernels_give_the_same_bits_in_any_schedule(schedule):
    """Blocks and threads in another order must not change a bit of any output: the
    kernels' barriers and fixed-order reductions leave them no race. The shapes take
    stage 2 per row in groups and in blocks, and flat with the segment pre-pass."""
    with build.emulated_cuda_backend() as ns:
        ops = getattr(torch.ops, ns)
    torch.manual_seed(0)
    inputs = []
    # (B, D, Z, reduction); Z = 1 keeps vae_loss's groups at one lane, so the 20 000 rows
    # (20 000 partials: the flat pre-pass) stay quick to emulate.
    for B, D, Z, reduction in ((5, 40_000, 20, 0), (5, 40_000, 20, 1), (20_000, 3, 1, 2), (33, 1271, 20, 0)):
        inputs.append((torch.randn(B, D) * 3, torch.rand(B, D), torch.randn(B, Z), torch.randn(B, Z), reduction))
    beta, seed = torch.full((), 0.7), torch.tensor([99])

    def outputs():
        for x, t, mu, lv, r in inputs:
            # The Gaussian with one log_scale per column, and through vae_loss with one for all.
            per_column = torch.linspace(-0.5, 0.5, x.shape[1])
            # A learned prior (one per latent) and a per-sample log-variance, read at stride 0.
            prior = (torch.linspace(-1, 1, mu.shape[1]), torch.linspace(-0.5, 0.5, mu.shape[0])[:, None])
            yield from ops.vae_loss(x, t, mu, lv, None, None, None, beta, beta.new_zeros(()), 0, True, r, True)
            yield from ops.vae_loss(x, t, mu, lv, None, None, None, beta, torch.full((), 0.3), 1, True, r, True)
            yield from ops.vae_loss(x, t, mu, lv, *prior, None, beta, beta.new_zeros(()), 2, True, r, True)
            if r:  # free bits: the KL's column sums, lambda applied in stage 2
                yield from ops.vae_loss(x, t, mu, lv, *prior, torch.full((), 0.4), beta, beta.new_zeros(()), 0, True, r, True)
            yield from ops.bernoulli_nll(torch.sigmoid(x), t, False, r, True)
            yield from ops.gaussian_nll(x, t, per_column, r, True)
            yield from ops.continuous_bernoulli_nll(x, t, True, r, True)
            yield ops.gaussian_kl(mu, lv, None, None, r)
            yield ops.gaussian_kl(mu, lv, *prior, r)
            yield ops.gaussian_kl(mu, lv, *prior, KL_COLUMNS)  # free bits' column sums
            yield ops.reparameterize(mu, lv, None, seed)

    runs = {}
    for name in ("forward", "reverse", "shuffled:1", "greedy"):
        schedule(name)
        runs[name] = list(outputs())
    for name in ("reverse", "shuffled:1", "greedy"):
        for a, b in zip(runs["forward"], runs[name]):
            assert torch.equal(a, b), name


@pytest.mark.skipif(torch.cuda.is_available(), reason="the real kernels run on this machine")
def test_cuda_kernels_stay_in_bounds_under_asan():
    """tests/cuda_emu/bounds.py runs every op over the kernels' special-case layouts with
    AddressSanitizer: any read or write past a tensor's allocation fails here with ASan's
    report (the GPU's equivalent is compute-sanitizer's memcheck)."""
    cxx = shutil.which("c++") or shutil.which("g++")
    libasan = subprocess.run([cxx, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(libasan):
        pytest.skip(f"{cxx} has no AddressSanitizer runtime")
    env = dict(os.environ, LD_PRELOAD=libasan, ASAN_OPTIONS="detect_leaks=0:alloc_dealloc_mismatch=0")
    proc = subprocess.run(
        [sys.executable, str(build.HERE / "bounds.py")], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0 and proc.stdout.count("calls in bounds") == 2, proc.stderr[-8000:]


def test_rewrite_turns_every_launch_form_into_a_call():
    src = (
        "k<true><<<blocks, kThreads, 0, stream>>>(a, p.data_ptr<acc_t>(), f(x, y));\n"
        "g<false, scalar_t><<<blocks_for(B * t.G), kThreads, 0, stream>>>(\n    a, b);\n"
        "h<<<static_cast<unsigned>(n), 512>>>(a);\n"
        "TORCH_LIBRARY_IMPL(vaekern, CUDA, m) { x.is_cuda(); }\n"
        "__shared__ float sums[32];\n"
        "*reinterpret_cast<const Vec<T, N>*>(p);\n"
    )
    out = build.rewrite(src, bounds={"k": "kThreads"})
    call = "::vkemu::launch({}, {}, [&] {{ std::apply([](auto&... a) {{ {}(a...); }}, vkemu_args); }}, {}); }}"
    assert "{ auto vkemu_args = std::make_tuple(a, p.data_ptr<acc_t>(), f(x, y)); " + call.format(
        "blocks", "kThreads", "k<true>", "kThreads") in out
    assert "{ auto vkemu_args = std::make_tuple(\n    a, b); " + call.format(
        "blocks_for(B * t.G)", "kThreads", "g<false, scalar_t>", "1024") in out
    assert "{ auto vkemu_args = std::make_tuple(a); " + call.format(
        "static_cast<unsigned>(n)", "512", "h", "1024") in out
    assert build.launch_bounds("__global__ void __launch_bounds__(kThreads, kMin)\n    fwd_kernel(int a) {}") == {
        "fwd_kernel": "kThreads"}
    assert f"TORCH_LIBRARY_IMPL({build.NAMESPACE}, CPU, m) {{ x.is_cpu(); }}" in out
    assert "__shared__ float sums[32]; ::vkemu::fresh_shared(&sums, sizeof(sums));" in out
    assert "*::vkemu::aligned_ptr<const Vec<T, N>>(p);" in out
    for bad, why in (("k<<<1, 32, 1024, s>>>(a);", "dynamic shared memory"),
                     ("TORCH_LIBRARY_IMPL(other, CUDA, m) {}", "CUDA registration"),
                     ("*reinterpret_cast<const float *const *>(p);", "pointer cast")):  # fmt: skip
        with pytest.raises(AssertionError, match=why):
            build.rewrite(bad)
