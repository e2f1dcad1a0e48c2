"""The body of every pytest-benchmark case (bench_<op>.py): the same steps as run.py."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from benchmarks import cases

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
    assert cases.check_ok(case, err), f"{provider} {op} {size} {dtype}: error {err:.3g} against the reference"

    step = cases.Step(case, provider, sets, compile_backend)
    if not disabled:
        step.run_once()  # warm-up (torch.compile compiles here), kept out of the timings
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    benchmark.extra_info.update(op=op, provider=provider, size=str(size), dtype=cases.dtype_name(dtype),
                                mode=mode, device=device.type, floor_bytes=cases.floor_bytes(case),
                                check_err=err)
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
