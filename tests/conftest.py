"""Shared test harness: every test that takes the ``backend`` fixture runs once per backend.

On a machine without a GPU:

* the triton backend runs its kernels in Triton's interpreter on CPU tensors; the
  interpreter must be chosen before triton is first imported, hence the environment
  variable is set here, at collection time;
* the cuda backend runs csrc/cuda's kernels under the CPU emulation of tests/cuda_emu
  (test ids ``cuda_emulated``): the same sources, rewritten only at their launches and
  registered for CPU tensors; and again with tiny tiling and grid constants
  (``cuda_emulated_small``), which takes small inputs down the paths of huge ones.
  It checks their logic, not the GPU: what needs the hardware (CUDA graphs, speed, the
  device's own math) still needs a GPU.

A run under ATEN_CPU_CAPABILITY compiles into torch.compile caches of that capability's
own (compile_cache.py), as the subprocesses that lower it do.
"""

import contextlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from compile_cache import capability_env  # noqa: E402

# A run under a lowered ATEN_CPU_CAPABILITY compiles into caches of its own (compile_cache.py).
if os.environ.get("ATEN_CPU_CAPABILITY"):
    os.environ.update(capability_env(os.environ["ATEN_CPU_CAPABILITY"]))

import vaekern  # noqa: E402
from cuda_emu.build import emulated_cuda_backend  # noqa: E402

BACKENDS = ("reference", "cpu", "triton", "cuda")

# (atol, rtol) against the float64 reference, per input dtype. The reference sees the same
# low-precision inputs, upcast, so these bound the kernel's own error: fp32 accumulation
# for the losses, and one rounding to the input dtype for the gradients.
LOSS_TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 2e-5),
    torch.float16: (1e-3, 1e-4),
    torch.bfloat16: (1e-3, 1e-4),
}
GRAD_TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-6, 1e-5),
    torch.float16: (1e-4, 2e-3),
    torch.bfloat16: (1e-3, 1.6e-2),
}
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
SHAPES = ((1, 1), (3, 7), (5, 1, 28, 28), (41, 1271))
REDUCTIONS = ("mean", "sum", "none")


CUDA_EMULATED = not torch.cuda.is_available()


def backend_device(backend: str) -> torch.device:
    """Where a backend's tests put their tensors."""
    if backend in ("triton", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


# (backend, emulated variant of csrc/cuda) per test; without a GPU the cuda backend runs
# twice, the second time with tiny tiling constants (tests/cuda_emu/build.py VARIANTS).
_PARAMS = [(b, "" if b == "cuda" and CUDA_EMULATED else None) for b in BACKENDS]
if CUDA_EMULATED:
    _PARAMS.append(("cuda", "small"))


def _param_id(param) -> str:
    name, variant = param
    return name if variant is None else "_".join(filter(None, (name, "emulated", variant)))


@pytest.fixture(params=_PARAMS, ids=_param_id)
def backend(request):
    name, variant = request.param
    device = backend_device(name)
    with contextlib.ExitStack() as stack:
        if variant is not None:
            stack.enter_context(emulated_cuda_backend(variant))
        if name not in vaekern.available_backends(device):
            pytest.skip(f"backend {name}: not available on {device} in this install")
        yield name


@pytest.fixture
def device(backend) -> torch.device:
    return backend_device(backend)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
