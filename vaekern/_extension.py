"""Loading of the compiled extension ``vaekern._C`` (csrc/).

The extension only registers kernels for the ``vaekern`` namespace with
``TORCH_LIBRARY_IMPL``; it exports nothing else. ``vaekern.backends`` loads it, where it is
built, when vaekern is imported.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util

import torch

from vaekern._ops import SCHEMAS

NAMESPACE = "vaekern"


@functools.cache
def load() -> bool:
    """Import ``vaekern._C`` once. False if it was not built; an import error is raised."""
    if importlib.util.find_spec("vaekern._C") is None:
        return False
    # A built extension that fails to import (an ABI mismatch with torch, say) is an
    # error to report, not a reason to quietly run another backend.
    importlib.import_module("vaekern._C")
    return True


def has_kernels(dispatch_key: str) -> bool:
    """True if the extension registered every vaekern op for ``dispatch_key`` ("CPU", "CUDA")."""
    if not load():
        return False
    return all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{name}", dispatch_key) for name in SCHEMAS
    )
