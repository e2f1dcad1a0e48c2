"""Timers, peak memory and the device's copy bandwidth.

GPU: CUDA events around each call, with the L2 cache flushed (a buffer of twice its size
zeroed) before every call; median and 20/80 % quantiles over the calls.
CPU: ``torch.utils.benchmark.Timer.blocked_autorange`` with all of torch's threads; median and
20/80 % quantiles over its blocks. A step that needs an untimed setup before every call
(``bwd`` mode) is timed call by call instead, with ``time.perf_counter`` on CPU.
The cases that time whole calls (overhead, e2e), on any device: ``LoopTimer``, blocks of
back-to-back calls of every provider in turn, round after round.

Peak memory is the most bytes allocated at once during one call, above what was allocated
before it. On GPU: ``torch.cuda.max_memory_allocated``. On CPU, two measures, each blind
where the other sees, and the larger is reported:

* allocator events: the running sum of the allocations and frees of torch's CPU allocator
  that ``torch.profiler(profile_memory=True)`` records. Exact for tensors torch allocates,
  but blind to buffers from another allocator (the cpu backend puts large outputs on huge
  pages with its own).
* RSS high-water mark: ``VmHWM`` from /proc/self/status after resetting it through
  /proc/self/clear_refs, minus the RSS before the call. Sees every page, but not blocks that
  glibc hands out again without growing the RSS. So that it sees every block of 64 KiB or
  more, ``fixed_mmap_threshold()`` makes glibc map and unmap each of them; that changes
  how fast allocation is, so run.py measures CPU memory only after all its timings.

``tracemalloc`` sees neither: torch does not allocate through Python.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import platform
import sys
import time

import torch


@dataclasses.dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int
    timer: str
    # LoopTimer: ms per call of each block, in the order of its rounds.
    blocks: list[float] | None = None


def quantile(xs: list[float], q: float) -> float:
    """Linear-interpolated quantile (as numpy's default), without numpy."""
    s = sorted(xs)
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _summary(times_ms: list[float], reps: int, timer: str) -> Timing:
    return Timing(quantile(times_ms, 0.5), quantile(times_ms, 0.2), quantile(times_ms, 0.8), reps, timer)


# ---- GPU ------------------------------------------------------------------------------------


def cache_bytes(device: torch.device) -> int:
    """The last-level cache: L2 on a GPU, L3 (else L2) of CPU 0 on Linux, else 32 MiB."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size
    for index in (3, 2):
        try:
            with open(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size") as f:
                text = f.read().strip()
        except OSError:
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        return int(text.rstrip("KMG")) * unit
    return 32 << 20


class CudaTimer:
    """Times ``fn()``, or ``fn(setup())`` with the setup untimed, on the current stream.

    A few calls estimate the time; then ``warmup_ms`` of calls, then ``rep_ms`` of timed
    calls (at least ``min_reps``, at most ``max_reps``), each after an L2 flush.
    """

    def __init__(self, device: torch.device, *, warmup_ms: float = 25, rep_ms: float = 100,
                 min_reps: int = 5, max_reps: int = 500):
        self.device = device
        self.warmup_ms, self.rep_ms = warmup_ms, rep_ms
        self.min_reps, self.max_reps = min_reps, max_reps
        self._flush = torch.empty(2 * cache_bytes(device), dtype=torch.int8, device=device)

    def _run(self, fn, setup, n: int) -> list[float]:
        new = lambda: torch.cuda.Event(enable_timing=True)  # noqa: E731
        events = [(new(), new()) for _ in range(n)]
        for start, end in events:
            self._flush.zero_()
            if setup is None:
                start.record()
                fn()
            else:
                state = setup()
                start.record()
                fn(state)
            end.record()
        torch.cuda.synchronize(self.device)
        return [s.elapsed_time(e) for s, e in events]

    def __call__(self, fn, setup=None) -> Timing:
        est = quantile(self._run(fn, setup, 3), 0.5)
        self._run(fn, setup, max(1, min(self.max_reps, int(self.warmup_ms / max(est, 1e-3)))))
        n = max(self.min_reps, min(self.max_reps, int(self.rep_ms / max(est, 1e-3))))
        return _summary(self._run(fn, setup, n), n, "cuda-events")


# ---- CPU ------------------------------------------------------------------------------------


class CpuTimer:
    """Times ``fn()`` with ``blocked_autorange``, or ``fn(setup())`` call by call."""

    def __init__(self, *, min_run_time: float = 1.0, threads: int | None = None):
        self.min_run_time = min_run_time
        self.threads = threads or torch.get_num_threads()

    def __call__(self, fn, setup=None) -> Timing:
        if setup is not None:
            return self._per_call(fn, setup)
        from torch.utils import benchmark

        m = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=self.threads).blocked_autorange(
            min_run_time=self.min_run_time
        )
        times = [t * 1e3 for t in m.times]
        return _summary(times, m.number_per_run * len(m.times), "blocked_autorange")

    def _per_call(self, fn, setup) -> Timing:
        prev = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            times = []
            deadline = time.perf_counter() + self.min_run_time
            while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 10_000):
                state = setup()
                t0 = time.perf_counter()
                fn(state)
                times.append((time.perf_counter() - t0) * 1e3)
                del state
        finally:
            torch.set_num_threads(prev)
        return _summary(times, len(times), "perf_counter")


def make_timer(device: torch.device, **kw):
    if device.type == "cuda":
        return CudaTimer(device, **{k: v for k, v in kw.items() if k in ("warmup_ms", "rep_ms")})
    return CpuTimer(**{k: v for k, v in kw.items() if k in ("min_run_time", "threads")})


class LoopTimer:
    """Times several callables together: blocks of back-to-back calls of each, taken in turn.

    Each callable gets blocks of about ``block_s`` (at least one call), round after round,
    until each has had about ``min_run_time``, and at least ``min_rounds`` rounds. Blocks of
    one round run next to each other, so when the machine's load changes during the run
    (other jobs on a shared machine) every callable sees it alike: their ratios hold, and
    the differences of their blocks round by round cancel it.

    The blocks are ``torch.utils.benchmark.Timer.timeit`` calls, which synchronize a GPU at
    both ends: a block's time per call is what a training loop sees, with the host and the
    device overlapping. That is the right measure where host overhead counts. CudaTimer's
    events are not: the device starts each timed call only after the L2 flush that precedes
    it, so the host's first microseconds of the call (as long as the flush takes) go uncounted.
    """

    def __init__(self, *, min_run_time: float = 1.0, threads: int | None = None, block_s: float = 0.05,
                 min_rounds: int = 5):
        self.min_run_time, self.block_s, self.min_rounds = min_run_time, block_s, min_rounds
        self.threads = threads or torch.get_num_threads()

    def __call__(self, fns: dict[str, object]) -> dict[str, Timing]:
        from torch.utils import benchmark

        timers = {k: benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=self.threads)
                  for k, fn in fns.items()}
        number, block = {}, 0.0
        for k, t in timers.items():
            n = 1
            while (s := t.timeit(n).times[0] * n) < self.block_s / 10 and n < 10**6:
                n *= 10
            number[k] = max(1, round(n * self.block_s / s))
            block = max(block, s / n * number[k])
        rounds = max(self.min_rounds, math.ceil(self.min_run_time / block))
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(rounds):
            for k, t in timers.items():
                times[k].append(t.timeit(number[k]).times[0] * 1e3)
        return {k: dataclasses.replace(_summary(ts, number[k] * rounds, "interleaved blocks"), blocks=ts)
                for k, ts in times.items()}


# ---- memory ---------------------------------------------------------------------------------

MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated minus memory_allocated before the call",
    "cpu": "the larger of the torch allocator-event peak (torch.profiler) and the RSS high-water-mark "
    "delta, above what was allocated before the call",
}


def peak_bytes(device: torch.device, fn, setup=None) -> dict[str, int | None]:
    """Most extra bytes allocated at once during one call of ``fn`` (after ``setup``).

    Returns ``{"peak": ...}`` on GPU; on CPU also ``"alloc"`` and ``"rss"``, the two measures
    of the module docstring, with ``"peak"`` the larger (``"rss"`` is None off Linux).
    """
    if device.type == "cuda":
        state = setup() if setup is not None else None
        call = (lambda: fn(state)) if setup is not None else fn
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = call()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return {"peak": peak}
    # Separate calls: the profiler's own buffers would count in the RSS.
    alloc = _cpu_peak_bytes(fn, setup)
    rss = _rss_peak_bytes(fn, setup)
    return {"peak": max(alloc, rss or 0), "alloc": alloc, "rss": rss}


def fixed_mmap_threshold(nbytes: int = 64 << 10) -> bool:
    """Make glibc serve every allocation of ``nbytes`` or more with its own mmap, returned to
    the OS on free (no dynamic threshold, no reuse). False where mallopt is unavailable."""
    try:
        import ctypes

        m_mmap_threshold = -3
        return bool(ctypes.CDLL(None).mallopt(m_mmap_threshold, nbytes))
    except (OSError, AttributeError):
        return False


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise OSError(f"{key} not in /proc/self/status")


def _rss_peak_bytes(fn, setup=None) -> int | None:
    state = setup() if setup is not None else None
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux 4.0+)
        base = _proc_status_bytes("VmRSS")
    except OSError:
        return None
    out = fn(state) if setup is not None else fn()
    peak = _proc_status_bytes("VmHWM") - base
    del out
    return max(peak, 0)


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the profiler's start/stop lines, which kineto prints from C++ on fd 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_bytes(fn, setup=None) -> int:
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    state = setup() if setup is not None else None
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn(state) if setup is not None else fn()
    del out
    allocs = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        ev = stack.pop()
        stack.extend(ev.children)
        if ev.tag == _EventType.Allocation and ev.extra_fields.device.type == "cpu":
            allocs.append((ev.start_time_ns, ev.extra_fields.alloc_size))
    running = peak = 0
    for _, size in sorted(allocs):
        running += size
        peak = max(peak, running)
    return peak


# ---- copy bandwidth -------------------------------------------------------------------------


def copy_bandwidth(device: torch.device, timer, nbytes: int | None = None) -> tuple[float, str]:
    """GB/s (1e9 bytes/s, read + write counted) of a large same-device ``copy_``."""
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    t = timer(lambda: dst.copy_(src))
    how = f"copy_ of {nbytes >> 20} MiB on {device.type}" + (
        f" with {timer.threads} thread{'s' * (timer.threads != 1)}" if device.type == "cpu" else ""
    )
    return 2 * nbytes / (t.median_ms * 1e-3) / 1e9, how


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores)"


def load_average() -> str:
    """The 1/5/15-minute load averages: other work on the machine skews CPU timings."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"
