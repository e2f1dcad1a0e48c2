"""Backend choice: which ``torch.library`` namespace serves a call.

``auto`` picks by the tensors' device and by what this install has:

* CUDA tensors: ``triton``, else ``cuda`` (the compiled extension), else ``reference``.
* CPU tensors: ``cpu``.
* any other device: ``reference``.

An explicitly named backend that cannot serve the call raises ``BackendUnavailableError``
saying why; nothing falls back silently. Nothing here runs at import time.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from vaekern import _extension

BACKENDS = ("auto", "reference", "triton", "cuda", "cpu")


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend is not available for these tensors on this install."""


def triton_interpreted() -> bool:
    """True when Triton runs kernels on CPU tensors (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _triton_loaded() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    import vaekern._triton  # noqa: F401  (registers the vaekern_triton kernels)

    return True


def _why_not(backend: str, device: torch.device) -> str | None:
    """None if ``backend`` can serve tensors on ``device``, else the reason it cannot."""
    match backend:
        case "reference":
            return None
        case "triton":
            if device.type != "cuda" and not (device.type == "cpu" and triton_interpreted()):
                return f"it runs on CUDA tensors (or on CPU tensors with TRITON_INTERPRET=1), got {device}"
            if not _triton_loaded():
                return "triton is not installed"
            return None
        case "cuda":
            if device.type != "cuda":
                return f"it runs on CUDA tensors, got {device}"
            if not _extension.has_kernels("CUDA"):
                return "the extension vaekern._C was built without CUDA kernels (see README: building)"
            return None
        case "cpu":
            if device.type != "cpu":
                return f"it runs on CPU tensors, got {device}"
            return None
    raise AssertionError(backend)


def _cpu_namespace() -> str:
    # Until the fused CPU kernels of csrc/cpu are built, "cpu" is the reference on CPU.
    return "vaekern" if _extension.has_kernels("CPU") else "vaekern_ref"


_NAMESPACE = {"reference": "vaekern_ref", "triton": "vaekern_triton", "cuda": "vaekern"}


def namespace(backend: str, device: torch.device) -> str:
    """The op namespace that serves ``backend`` for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = auto(device)
    reason = _why_not(backend, device)
    if reason is not None:
        raise BackendUnavailableError(f"backend={backend!r} is not available: {reason}")
    return _cpu_namespace() if backend == "cpu" else _NAMESPACE[backend]


# Under torch.compile the choice is made once, while tracing, and becomes a constant of the
# graph: it depends only on the install and on the device, which the graph is guarded on.
# This is what torch.compiler.assume_constant_result does; it is written out because that
# function imports torch._dynamo, and with it triton, which importing vaekern must not do.
# tests/test_vae_loss.py::test_compile_fullgraph fails if a torch release changes this.
namespace._dynamo_marked_constant = True


def auto(device: torch.device) -> str:
    """The backend that ``backend="auto"`` picks for tensors on ``device``."""
    match device.type:
        case "cuda":
            for candidate in ("triton", "cuda"):
                if _why_not(candidate, device) is None:
                    return candidate
            return "reference"
        case "cpu":
            return "cpu"
        case _:
            return "reference"


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """The backends that can serve tensors on ``device`` here.

    With no device: the CPU, plus CUDA when a GPU is visible.
    """
    if device is not None:
        devices = [torch.device(device)]
    else:
        devices = [torch.device("cpu")]
        if torch.cuda.is_available():
            devices.append(torch.device("cuda"))
    return [b for b in BACKENDS[1:] if any(_why_not(b, d) is None for d in devices)]
