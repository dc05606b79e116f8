"""Builds the C++ extension `sgsd_fast._C` from csrc/ on every install.

Install with torch already present: `pip install --no-build-isolation .` (the torch-extension
convention). CUDA sources (csrc/*.cu) are compiled only when both a CUDA toolkit and a
CUDA-enabled torch are present; the CPU kernels are always built.
"""
import glob
import os
import sys

from setuptools import setup

try:
    import torch  # noqa: F401
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.exit(
        "sgsd_fast builds a torch C++ extension, so torch must be installed first and the build must "
        "see it:\n    pip install torch==2.13.0   # or your CUDA build\n"
        "    pip install --no-build-isolation .\n"
    )

here = os.path.dirname(os.path.abspath(__file__))
cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
use_cuda = bool(cuda_sources) and torch.version.cuda is not None and CUDA_HOME is not None

openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
extra = {"cxx": ["-O3", "-std=c++17", *openmp]}
if use_cuda:
    extra["nvcc"] = ["-O3", "--use_fast_math"]
    ext = CUDAExtension("sgsd_fast._C", cpp_sources + cuda_sources, extra_compile_args=extra,
                        define_macros=[("SGSD_WITH_CUDA", "1")], extra_link_args=openmp)
else:
    ext = CppExtension("sgsd_fast._C", cpp_sources, extra_compile_args=extra, extra_link_args=openmp)

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
