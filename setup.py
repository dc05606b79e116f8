"""Builds the C++ CPU kernels `sgsd_fast._C` at install time when torch is importable, else nothing.

* torch importable in the build environment (``pip install --no-build-isolation .``, ``make
  install``): the extension is compiled now, against that torch. CUDA sources
  (sgsd_fast/csrc/*.cu) are added only when both a CUDA toolkit and a CUDA-enabled torch are present.
* torch not importable (a plain ``pip install .``: pip builds in an isolated environment that
  holds only setuptools): a pure-Python wheel. The same sources ship inside the package and
  `sgsd_fast._ext` compiles them once on first CPU use, or falls back to PyTorch ops without a
  compiler. Torch is deliberately not a build requirement: an unpinned one would make pip fetch a
  multi-GB (CUDA) torch into the build environment, possibly another version than the one the
  package then runs with.

No C++ standard is forced: torch's BuildExtension picks the one its headers need (C++20 for 2.13).
"""
import glob
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    torch = None


def extension_kwargs() -> dict:
    """setup() arguments that build sgsd_fast._C, or {} without torch (compiled at first use instead)."""
    if torch is None:
        return {}
    cpp_sources = sorted(glob.glob(os.path.join("sgsd_fast", "csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("sgsd_fast", "csrc", "*.cu")))
    use_cuda = bool(cuda_sources) and torch.version.cuda is not None and CUDA_HOME is not None
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    extra = {"cxx": ["-O3", *openmp]}
    if use_cuda:
        extra["nvcc"] = ["-O3", "--use_fast_math"]
        ext = CUDAExtension("sgsd_fast._C", cpp_sources + cuda_sources, extra_compile_args=extra,
                            define_macros=[("SGSD_WITH_CUDA", "1")], extra_link_args=openmp)
    else:
        ext = CppExtension("sgsd_fast._C", cpp_sources, extra_compile_args=extra, extra_link_args=openmp)
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(**extension_kwargs())
