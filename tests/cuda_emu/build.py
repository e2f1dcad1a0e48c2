"""Builds csrc/cuda as a CPU library that runs its kernels under emulation (vkemu.h).

The sources are rewritten as vkemu.h's header says (kernel launches, the dispatch key, the
device check, pointer casts, shared memory), compiled as C++ with
``torch.utils.cpp_extension.load`` and registered as the CPU kernels of the namespace
``vaekern_cuda_emu`` (``vaekern_cuda_emu_<variant>`` for the other VARIANTS), which gets
the schemas and autograd of every other namespace through ``vaekern.backends``. Nothing of
csrc/cuda is copied by hand: what the GPU runs is what this runs.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
from pathlib import Path

import pytest
from torch.utils import cpp_extension

import vaekern

NAMESPACE = "vaekern_cuda_emu"
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CSRC = ROOT / "csrc" / "cuda"
BUILD = ROOT / "build" / "cuda_emu"

_LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>;()]*>)?)<<<")
_BOUNDS = re.compile(r"__launch_bounds__\(\s*([^,)]+?)\s*(?:,[^)]*)?\)\s*(\w+)\s*\(")
_SHARED = re.compile(r"(__shared__\s+[^;]*?\b(\w+)\s*(?:\[[^\]]*\]\s*)*;)")
# A pointer cast: how the kernels make vector accesses (load_vec, store_vec).
_POINTER_CAST = re.compile(r"reinterpret_cast<((?:const\s+)?[A-Za-z_][\w:]*(?:<[^<>]*>)?)\s*\*>\(")


def _split_top(text: str) -> list[str]:
    """``text`` split at the commas outside any brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{<":
            depth += 1
        elif ch in ")]}>":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts]


def _closing(text: str, open_at: int) -> int:
    """Index of the parenthesis that closes the one at ``open_at``."""
    depth = 0
    for i in range(open_at, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i
    raise ValueError("unbalanced parentheses in a kernel launch")


def launch_bounds(source: str) -> dict[str, str]:
    """Kernel name -> the max-threads expression of its __launch_bounds__."""
    return {name: bound for bound, name in _BOUNDS.findall(source)}


def rewrite(source: str, ns: str = NAMESPACE, bounds: dict[str, str] | None = None) -> str:
    """One csrc/cuda source as C++ for vkemu.h, registering its ops in namespace ``ns``.

    ``bounds`` adds the launch bounds of kernels declared in other files (headers)."""
    bounds = {**(bounds or {}), **launch_bounds(source)}
    out, pos = [], 0
    for m in _LAUNCH.finditer(source):
        if m.start() < pos:
            continue
        cfg_end = source.index(">>>", m.end())
        config = _split_top(source[m.end() : cfg_end])
        open_at = cfg_end + 3
        while source[open_at].isspace():
            open_at += 1
        assert source[open_at] == "(", source[m.start() : open_at + 20]
        close = _closing(source, open_at)
        grid, block = config[0], config[1]
        assert len(config) <= 2 or config[2] == "0", "dynamic shared memory is not emulated"
        # A block larger than the kernel's __launch_bounds__ fails on the device.
        bound = bounds.get(re.match(r"\w+", m.group(1)).group(0), "1024")
        out.append(source[pos : m.start()])
        # The arguments are evaluated once, on the host, as for a real launch: an exception
        # there is an ordinary C++ exception, not one inside a thread.
        out.append(
            f"{{ auto vkemu_args = std::make_tuple{source[open_at : close + 1]}; "
            f"::vkemu::launch({grid}, {block}, [&] {{ std::apply([](auto&... a) {{ {m.group(1)}(a...); }}, vkemu_args); }}, "
            f"{bound}); }}"
        )
        pos = close + 1
    out.append(source[pos:])
    text = "".join(out)
    text = text.replace("TORCH_LIBRARY_IMPL(vaekern, CUDA, m)", f"TORCH_LIBRARY_IMPL({ns}, CPU, m)")
    assert not re.search(r"TORCH_LIBRARY_IMPL\([^)]*CUDA", text), "a CUDA registration was not rewritten"
    text = text.replace(".is_cuda()", ".is_cpu()")
    # Every access through a cast pointer is checked for the alignment its type needs:
    # x86 forgives a misaligned vector load, the GPU faults ("misaligned address").
    text = _POINTER_CAST.sub(r"::vkemu::aligned_ptr<\1>(", text)
    # Shared memory holds 0xFF bytes at the start of each block, not the last block's data.
    text, n_shared = _SHARED.subn(r"\1 ::vkemu::fresh_shared(&\2, sizeof(\2));", text)
    assert n_shared == text.count("__shared__"), "a __shared__ declaration was not rewritten"
    assert "<<<" not in text, "a kernel launch was not rewritten"
    assert not re.search(r"reinterpret_cast<(?!uintptr_t>)", text), "a pointer cast was not rewritten"
    return text


# Builds of the same sources. "small" shrinks the tiling and grid constants of common.cuh
# so that small tests take the paths that otherwise only inputs of millions of elements
# take: several vector loads per lane in a tile, grid-stride loops past the grid cap, and
# several passes of stage 2's segment pre-pass. "asan" and "asan_small" add
# AddressSanitizer, for a process that has libasan preloaded (tests/cuda_emu/bounds.py).
_SMALL = {"kWantTiles": "1", "kMaxBlocks": "3", "kFlatMax": "40", "kSegment": "7"}
VARIANTS = {"": {}, "small": _SMALL, "asan": {}, "asan_small": _SMALL}


def _with_constants(text: str, constants: dict[str, str]) -> tuple[str, set[str]]:
    """``constexpr <type> <name> = <value>;`` lines with new values; the names replaced."""
    done = set()
    for name, value in constants.items():
        text, n = re.subn(rf"(constexpr\s+\w+\s+{name}\s*=\s*)[^;]+;", rf"\g<1>{value};", text)
        if n:
            done.add(name)
    return text, done


def namespace(variant: str = "") -> str:
    return NAMESPACE + (f"_{variant}" if variant else "")


@functools.cache
def load(variant: str = "") -> str:
    """Builds (or reuses) one variant of the emulated library, registers its schemas, and
    returns its op namespace."""
    ns = namespace(variant)
    out = BUILD / (variant or "default")
    src = out / "src"
    src.mkdir(parents=True, exist_ok=True)
    sources, replaced = [], set()
    paths = sorted(CSRC.iterdir())
    bounds = {name: bound for path in paths for name, bound in launch_bounds(path.read_text()).items()}
    for path in paths:
        target = src / (path.stem + (".cpp" if path.suffix == ".cu" else path.suffix))
        text, done = _with_constants(rewrite(path.read_text(), ns, bounds), VARIANTS[variant])
        replaced |= done
        if not target.exists() or target.read_text() != text:  # keep ninja's timestamps
            tmp = target.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(text)
            os.replace(tmp, target)  # whole, for another process building at the same time
        if path.suffix == ".cu":
            sources.append(str(target))
    missing = set(VARIANTS[variant]) - replaced
    assert not missing, f"constants not found in csrc/cuda: {missing}"
    asan = variant.startswith("asan")
    cpp_extension.load(
        name=ns,
        sources=sources,
        # csrc itself, as for the real build: the headers shared with csrc/cpu (conventions.h).
        extra_include_paths=[str(HERE / "include"), str(src), str(CSRC.parent)],
        # The C++ namespace is renamed too, so that no symbol of vaekern._C or of another
        # variant, when it is loaded as well, stands in for one of these.
        extra_cflags=["-O1", "-std=c++20", "-include", str(HERE / "vkemu.h"), "-fno-strict-aliasing",
                      "-Wno-unknown-pragmas", f"-Dvaekern={ns}"]
        + (["-fsanitize=address", "-fno-omit-frame-pointer"] if asan else []),
        extra_ldflags=["-fsanitize=address"] if asan else [],
        build_directory=str(out),
        is_python_module=False,
        verbose=False,
    )
    # Kernels may be registered before their schema; the registry defines the schemas
    # (and vaekern's fakes and autograd) when the emulated backend is first put in place.
    return ns


@contextlib.contextmanager
def emulated_cuda_backend(variant: str = ""):
    """Within the block, backend="cuda" runs the emulated csrc/cuda kernels (one of
    VARIANTS) on CPU tensors, through vaekern's public backend registry. Yields their op
    namespace. A failed build is an error, not a skip."""
    if not sys.platform.startswith("linux"):
        pytest.skip("backend cuda: no GPU here, and its CPU emulation needs Linux (ucontext)")
    ns = load(variant)
    with vaekern.backends.override("cuda", "cpu", ns):
        yield ns
