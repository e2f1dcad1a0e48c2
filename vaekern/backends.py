"""The backend registry: which kernels serve a call, by backend name and device type.

=============  ==========================================================================
``reference``  ``vaekern.reference`` under plain PyTorch autograd, on any device: the oracle
``triton``     the ``vaekern_triton`` kernels (``vaekern/_triton``) for CUDA tensors, and for
               CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``)
``cuda``       the compiled extension ``vaekern._C`` (``csrc/cuda``) for CUDA tensors
``cpu``        the compiled extension ``vaekern._C`` (``csrc/cpu``) for CPU tensors
=============  ==========================================================================

``auto`` picks, for CUDA tensors, ``triton`` then ``cuda`` then ``reference``; for CPU
tensors ``cpu`` then ``reference``; for any other device ``reference``. A backend named
explicitly either serves the call or raises :class:`BackendUnavailableError` saying why;
nothing falls back silently.

The built-in backends are registered when vaekern is imported, so every kernel is in place
before any trace; the table is then a plain dict that ``torch.compile`` reads as a
constant. Registering costs no import of Triton (its launchers load their modules on
their first launch) and needs no GPU; the extension, where it is built, is loaded here.

:func:`register` and :func:`override` add or replace the kernels that serve a backend on a
device type: any namespace whose kernels implement the schemas of ``vaekern._ops`` (the
tests point ``cuda`` at the CUDA kernels run under a CPU emulation this way).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator

import torch

from vaekern import _extension, _ops

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "auto",
    "available_backends",
    "override",
    "register",
    "resolve",
    "unregister",
]

BACKENDS = ("reference", "triton", "cuda", "cpu")
_AUTO_ORDER = {"cuda": ("triton", "cuda"), "cpu": ("cpu",)}
_DISPATCH_KEY = {"cpu": "CPU", "cuda": "CUDA"}

# (backend, device type) -> the kernels serving it. The reference backend needs no entry.
_TABLE: dict[tuple[str, str], _ops.Kernels] = {}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend is not available for these tensors on this install."""


def register(backend: str, device_type: str, namespace: str) -> None:
    """Serve ``backend`` on ``device_type`` with the kernels of op namespace ``namespace``.

    The namespace gets vaekern's schemas, fakes and autograd if it has none yet; every
    op must then have a kernel for the device type's dispatch key, or this raises."""
    if backend not in BACKENDS[1:]:
        raise ValueError(f"backend must be one of {BACKENDS[1:]}, got {backend!r}")
    if device_type not in _DISPATCH_KEY:
        raise ValueError(f"device_type must be one of {tuple(_DISPATCH_KEY)}, got {device_type!r}")
    kernels = _ops.define(namespace)
    key = _DISPATCH_KEY[device_type]
    missing = [n for n in _ops.SCHEMAS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"{namespace}::{n}", key)]
    if missing:
        raise ValueError(f"namespace {namespace!r} has no {key} kernel for {missing}")
    _TABLE[(backend, device_type)] = kernels


def unregister(backend: str, device_type: str) -> None:
    """Stop serving ``backend`` on ``device_type`` (it then raises BackendUnavailableError)."""
    _TABLE.pop((backend, device_type), None)


@contextlib.contextmanager
def override(backend: str, device_type: str, namespace: str) -> Iterator[None]:
    """Within the block, ``backend`` on ``device_type`` is served by ``namespace``; restored after."""
    previous = _TABLE.get((backend, device_type))
    register(backend, device_type, namespace)
    try:
        yield
    finally:
        if previous is None:
            unregister(backend, device_type)
        else:
            _TABLE[(backend, device_type)] = previous


def auto(device: torch.device) -> str:
    """The backend that ``backend="auto"`` picks for tensors on ``device``."""
    for candidate in _AUTO_ORDER.get(device.type, ()):
        if (candidate, device.type) in _TABLE:
            return candidate
    return "reference"


def resolve(backend: str, device: torch.device) -> _ops.Kernels | None:
    """The kernels that serve ``backend`` for tensors on ``device``; None for the reference.

    Raises ValueError for an unknown name and BackendUnavailableError for one that this
    install cannot serve on ``device``."""
    kernels = _TABLE.get((backend, device.type))
    if kernels is not None:
        return kernels
    if backend == "auto":
        backend = auto(device)
        return None if backend == "reference" else _TABLE[(backend, device.type)]
    if backend == "reference":
        return None
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    raise BackendUnavailableError(f"backend={backend!r} is not available: {_why_not(backend, device.type)}")


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """The backends that can serve tensors on ``device`` here.

    With no device: the CPU, plus CUDA when a GPU is visible.
    """
    if device is not None:
        types = {torch.device(device).type}
    else:
        types = {"cpu", "cuda"} if torch.cuda.is_available() else {"cpu"}
    return [b for b in BACKENDS if b == "reference" or any((b, t) in _TABLE for t in types)]


def _triton_device_types() -> tuple[str, ...]:
    # Triton's interpreter runs the same kernels on CPU tensors; it is chosen by this
    # variable before triton is first imported, and so is the CPU registration here.
    return ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET", "0") == "1" else ("cuda",)


def _why_not(backend: str, device_type: str) -> str:
    match backend:
        case "triton":
            if device_type not in _triton_device_types():
                return f"it runs on CUDA tensors (or on CPU tensors with TRITON_INTERPRET=1), got {device_type}"
            return "triton is not installed"
        case "cuda" | "cpu":
            if device_type != backend:
                return f"it runs on {_DISPATCH_KEY[backend]} tensors, got {device_type}"
            return (
                f"the extension vaekern._C is not built, or was built without {_DISPATCH_KEY[backend]} "
                "kernels (see README: building)"
            )
    raise AssertionError(backend)


def _register_builtins() -> None:
    if importlib.util.find_spec("triton") is not None:
        from vaekern import _triton

        _triton.register_launchers(_triton_device_types())
        for device_type in _triton_device_types():
            register("triton", device_type, _triton.NAMESPACE)
    # The extension first: its kernels and C++ autograd are in place before the schemas are
    # defined, so that define() adds no Python autograd over the C++ one.
    _extension.load()
    _ops.define(_extension.NAMESPACE)
    for device_type, key in _DISPATCH_KEY.items():
        if _extension.has_kernels(key):
            register(device_type, device_type, _extension.NAMESPACE)


_register_builtins()
