"""Builds vaekern and, unless VAEKERN_BUILD_EXT=0, its compiled extension vaekern._C.

VAEKERN_BUILD_EXT:
  auto (default)  build vaekern._C with the CPU kernels of csrc/cpu, plus the CUDA kernels of
                  csrc/cuda when torch is a CUDA build and a CUDA toolkit is found
                  (CUDA_HOME, else CUDA_PATH, else /usr/local/cuda). No GPU is needed.
  1               as auto, but a missing CUDA toolkit or CUDA torch is an error.
  0               no extension: the reference and Triton backends only.

TORCH_CUDA_ARCH_LIST overrides the default GPU targets, "8.0;9.0" (A100, H100).
Use `pip install --no-build-isolation -e .` so the build sees the installed torch.
"""

import glob
import os
import sys

from setuptools import find_packages, setup


def _cuda_home():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    # torch's own guess follows `nvcc` on PATH, which can be a wrapper outside the toolkit.
    return "/usr/local/cuda" if os.path.isdir("/usr/local/cuda") else None


def _extensions():
    mode = os.environ.get("VAEKERN_BUILD_EXT", "auto")
    if mode not in ("auto", "0", "1"):
        sys.exit(f"VAEKERN_BUILD_EXT must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return [], {}

    cuda_home = _cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # read when torch.utils.cpp_extension is imported
    import torch
    from torch.utils import cpp_extension

    with_cuda = torch.version.cuda is not None and cuda_home is not None
    if mode == "1" and not with_cuda:
        sys.exit("VAEKERN_BUILD_EXT=1 needs a CUDA build of torch and a CUDA toolkit (set CUDA_HOME)")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

    sources = ["csrc/vaekern.cpp", "csrc/autograd.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # CPU kernels: one portable build with run-time dispatch, no -march. The vectorized
    # loops are compiled three times, by csrc/cpu/capability/{default,avx2,avx512}.cpp, each
    # selecting its instruction set itself (a target pragma), because setuptools gives all
    # sources the same flags; kernels() picks one with at::get_cpu_capability(), as
    # PyTorch's own kernels do (ATEN_CPU_CAPABILITY=avx2|default lowers it). -fopenmp: the
    # extension's at::parallel_for is inlined from ATen's OpenMP backend.
    # -g0: Python's own CFLAGS bring -g, which made the library 59 MB and its host compiles
    # a third slower (autograd.cpp: 26 s against 17 s, one core of an Intel Xeon).
    cxx_flags = ["-O3", "-g0", "-std=c++20", "-fopenmp"]  # torch 2.14 headers need C++20
    extra = {"cxx": cxx_flags}
    kind = cpp_extension.CppExtension
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        # torch 2.14 headers need C++20 (std::strong_ordering in c10/util/intrusive_ptr.h).
        extra["nvcc"] = ["-O3", "-std=c++20", "-lineinfo"]
        kind = cpp_extension.CUDAExtension
    # Last, and the widest last: an inline function (a c10 header's, say) that several
    # objects emit is linked from the first object that has it, so code of plain objects
    # must never resolve to a copy compiled for AVX-512.
    sources += [f"csrc/cpu/capability/{isa}.cpp" for isa in ("default", "avx2", "avx512")]
    ext = kind(
        "vaekern._C",
        sources,
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["vaekern", "vaekern.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
