"""The body of every pytest-benchmark case (bench_<op>.py, bench_overhead.py, bench_e2e.py): the same
steps as run.py."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from benchmarks import cases, e2e

# pytest-benchmark rounds for the bwd mode, which needs an untimed forward before each call.
BWD_ROUNDS = 20


def device_for(provider: str) -> torch.device:
    """The cpu backend runs on CPU tensors; every other provider on the GPU when there is one."""
    if provider != "cpu" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def run_case(benchmark, op: str, provider: str, size: cases.Size, dtype: torch.dtype, mode: str) -> None:
    device = device_for(provider)
    reason = cases.skip_reason(provider, op, device)
    if reason is not None:
        pytest.skip(f"{provider}: {reason}")
    disabled = getattr(benchmark, "disabled", False)
    compile_backend = os.environ.get("VAEKERN_BENCH_COMPILE_BACKEND") or (
        "aot_eager" if disabled else "inductor"
    )
    case = cases.Case(op, size, dtype, dtype, mode, device)
    # Two sets, rotated; inputs for fwd+bwd hold what any mode needs.
    sets = [cases.make_inputs(dataclasses.replace(case, mode="fwd+bwd")) for _ in range(2)]
    err = cases.check(case, provider, sets[0], compile_backend)
    assert err is None or cases.check_ok(case, err), f"{provider} {op} {size} {dtype}: error {err:.3g} against the reference"

    step = cases.Step(case, provider, sets, compile_backend)
    if not disabled:
        step.run_once()  # warm-up (torch.compile compiles here), kept out of the timings
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    benchmark.extra_info.update(op=op, provider=provider, size=str(size), dtype=cases.dtype_name(dtype),
                                mode=mode, device=device.type, floor_bytes=cases.floor_bytes(case),
                                check_err="" if err is None else err)
    if provider.startswith("compile"):
        benchmark.extra_info["compile_backend"] = compile_backend
    if mode == "bwd":
        def setup():
            state = step.setup()
            sync()
            return (state,), {}

        benchmark.pedantic(lambda state: (step.backward(state), sync()), setup=setup, rounds=BWD_ROUNDS)
    else:
        benchmark(lambda: (step(), sync()))
    stats = getattr(benchmark, "stats", None)
    if stats is not None and not disabled:
        benchmark.extra_info["gbps"] = cases.floor_bytes(case) / stats.stats.median / 1e9


def run_e2e(benchmark, provider: str) -> None:
    """One training step of the pytorch/examples VAE with ``provider``'s loss (e2e.py)."""
    device = device_for(provider)
    reason = e2e.skip_reason(provider, device)
    if reason is not None:
        pytest.skip(f"{provider}: {reason}")
    disabled = getattr(benchmark, "disabled", False)
    compile_backend = os.environ.get("VAEKERN_BENCH_COMPILE_BACKEND") or (
        "aot_eager" if disabled else "inductor"
    )
    step = e2e.TrainStep(provider, device, compile_backend)
    err = e2e.check(step)
    assert e2e.check_ok(err) is not False, f"{provider} e2e: error {err:.3g} against the reference"
    if not disabled:
        step()  # warm-up (torch.compile compiles the backward here), kept out of the timings
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    benchmark.extra_info.update(op=e2e.OP, provider=provider, size=e2e.SIZE, dtype="float32",
                                mode=e2e.MODE, device=device.type, check_err=err)
    if provider.startswith("compile"):
        benchmark.extra_info["compile_backend"] = compile_backend
    benchmark(lambda: (step(), sync()))
