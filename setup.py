"""Build of mnemo_fast._C: CPU kernels always, CUDA kernels when torch and nvcc have CUDA.

Environment switches (pytorch_scatter's names):
  FORCE_CUDA=1       build the CUDA kernels even where no GPU is visible (needs nvcc)
  FORCE_ONLY_CPU=1   never build the CUDA kernels
  TORCH_CUDA_ARCH_LIST  CUDA architectures (default "8.0;9.0")
Install: pip install --no-build-isolation -e .
"""

import glob
import os
import sys

from setuptools import setup

from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

import torch


def _flag(name):
    return os.environ.get(name, "0") == "1"


def _with_cuda():
    if _flag("FORCE_ONLY_CPU"):
        return False
    if _flag("FORCE_CUDA"):
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def _extension():
    sources = ["csrc/ops.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    depends = sorted(glob.glob("csrc/**/*.h", recursive=True))
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    cxx = ["-O3", *openmp]
    if not _with_cuda():
        return CppExtension(
            "mnemo_fast._C",
            sources,
            depends=depends,
            extra_compile_args={"cxx": cxx},
            extra_link_args=openmp,
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    cu_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    return CUDAExtension(
        "mnemo_fast._C",
        sources + cu_sources,
        depends=depends + sorted(glob.glob("csrc/**/*.cuh", recursive=True)),
        define_macros=[("MNEMO_FAST_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
        extra_link_args=openmp,
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
