"""Compile caches apart per ATEN_CPU_CAPABILITY, for every test process that lowers it.

torch.compile's caches (Inductor's FX-graph and AOTAutograd caches and the code they hold)
do not key on ATEN_CPU_CAPABILITY: code compiled under AVX-512 and reused in a process
with ATEN_CPU_CAPABILITY=avx2 gave wrong gradients (a pure-PyTorch repro, NOTES
2026-11-30). So a process that runs at a lowered capability gets caches of its own.

Inductor writes TORCHINDUCTOR_CACHE_DIR into os.environ on its first compile, so a plain
``dict(os.environ, ATEN_CPU_CAPABILITY=...)`` would hand a child the parent's cache
explicitly: the directories are always replaced, never inherited.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from torch._inductor.runtime.cache_dir_utils import default_cache_dir

_SUFFIX = re.compile(r"\.capability-[A-Za-z0-9_]+$")


def capability_env(capability: str, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a process that runs with ATEN_CPU_CAPABILITY=capability.

    Args:
        capability: the value of ATEN_CPU_CAPABILITY ("default", "avx2", "avx512", ...).
        base: the environment to start from; os.environ when None.

    Returns:
        A copy of ``base`` with ATEN_CPU_CAPABILITY set, and TORCHINDUCTOR_CACHE_DIR and
        TRITON_CACHE_DIR set to directories of that capability's own, beside the cache
        that ``base`` uses (``<cache>.capability-<capability>``).
    """
    env = dict(os.environ if base is None else base)
    # Strip a suffix already there, so a child of a lowered process is keyed on its own value.
    root = _SUFFIX.sub("", os.path.abspath(env.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir()))
    cache = f"{root}.capability-{capability}"
    env.update(
        ATEN_CPU_CAPABILITY=capability,
        TORCHINDUCTOR_CACHE_DIR=cache,
        TRITON_CACHE_DIR=os.path.join(cache, "triton"),
    )
    return env
