"""Build of mnemo_fast._C: CPU kernels always, CUDA kernels when torch and nvcc have CUDA.

Environment switches (pytorch_scatter's names):
  FORCE_CUDA=1       build the CUDA kernels even where no GPU is visible; fail if they cannot be
  FORCE_ONLY_CPU=1   never build the CUDA kernels
  TORCH_CUDA_ARCH_LIST  CUDA architectures (default "8.0;9.0+PTX": SASS for A100 and H100,
                        and PTX that the driver compiles for any newer GPU)
Install: pip install --no-build-isolation -e .

The CUDA headers and libraries the kernels need (cuRAND's device API, and the cuBLAS,
cuSPARSE and cuSOLVER headers that torch's CUDA headers include) are looked up in the toolkit
of nvcc (CUDA_HOME) and in the ``nvidia/*/include`` / ``nvidia/*/lib`` folders of the CUDA
wheels pip installs beside a CUDA build of torch. What is found is added to the search paths;
if something is still missing, one line says what and where it looked, and the CPU extension
is built instead (FORCE_CUDA=1: the build fails with that line).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import sys

#: header -> what needs it
REQUIRED_HEADERS = {
    "cuda_runtime.h": "the CUDA runtime",
    "curand_kernel.h": "cuRAND's device API (csrc/cuda/perturb_gaussian.cu)",
    "cublas_v2.h": "cuBLAS (included by torch's ATen/cuda/CUDAContext.h)",
    "cusparse.h": "cuSPARSE (included by torch's ATen/cuda/CUDAContext.h)",
    "cusolverDn.h": "cuSOLVER (included by torch's ATen/cuda/CUDAContext.h)",
}
#: the library torch's CUDAExtension links (-lcudart)
CUDART = "cudart"
DEFAULT_ARCHS = "8.0;9.0+PTX"
NVCC_FLAGS = ["-O3", "-lineinfo"]  # no --use_fast_math: the perturbation keeps IEEE arithmetic


def _flag(env, name):
    return env.get(name, "0") == "1"


def wheel_roots(search_path):
    """The ``nvidia/<component>`` folders of pip's CUDA wheels under the ``search_path`` dirs."""
    roots = []
    for entry in search_path:
        for root in sorted(glob.glob(os.path.join(entry or ".", "nvidia", "*"))):
            if os.path.isdir(root) and root not in roots:
                roots.append(root)
    return roots


def include_candidates(cuda_home, search_path):
    """Include folders in search order: the toolkit's, then the CUDA wheels'."""
    dirs = []
    if cuda_home:
        dirs += [os.path.join(cuda_home, "include"), *sorted(glob.glob(os.path.join(cuda_home, "targets", "*", "include")))]
    dirs += [os.path.join(root, "include") for root in wheel_roots(search_path)]
    return [d for d in dirs if os.path.isdir(d)]


def library_candidates(cuda_home, search_path):
    """Library folders in search order: the toolkit's, then the CUDA wheels'."""
    dirs = []
    if cuda_home:
        dirs += [os.path.join(cuda_home, sub) for sub in ("lib64", "lib")]
        dirs += sorted(glob.glob(os.path.join(cuda_home, "targets", "*", "lib")))
    dirs += [os.path.join(root, "lib") for root in wheel_roots(search_path)]
    return [d for d in dirs if os.path.isdir(d)]


def find_headers(names, dirs):
    """({header: first folder holding it}, [headers found nowhere])."""
    found = {}
    for name in names:
        hit = next((d for d in dirs if os.path.isfile(os.path.join(d, name))), None)
        if hit is not None:
            found[name] = hit
    return found, [name for name in names if name not in found]


def find_library(name, dirs):
    """(folder, link name) of lib<name>: the unversioned ``lib<name>.so`` links as ``name``; a
    wheel's ``lib<name>.so.<N>`` alone links as ``:lib<name>.so.<N>``. None when absent."""
    for d in dirs:
        if os.path.isfile(os.path.join(d, f"lib{name}.so")):
            return d, name
        versioned = sorted(glob.glob(os.path.join(d, f"lib{name}.so.[0-9]*")), key=len)
        if versioned:
            return d, ":" + os.path.basename(versioned[0])
    return None


@dataclasses.dataclass
class CudaPlan:
    """What to build: ``cuda`` or not, extra search paths, and the line to print (if any)."""

    cuda: bool
    include_dirs: list = dataclasses.field(default_factory=list)
    library_dirs: list = dataclasses.field(default_factory=list)
    cudart: str = CUDART  # link name of the CUDA runtime
    message: str | None = None


def plan_cuda(env, torch_cuda, cuda_home, search_path):
    """Decides the CUDA part of the build (pure: no compiler is run).

    env: the environment; torch_cuda: torch.version.cuda (None for a CPU torch); cuda_home:
    the toolkit of nvcc (None when none is found); search_path: where pip's wheels live
    (sys.path). Raises SystemExit with the message when FORCE_CUDA=1 cannot be satisfied.
    """
    if _flag(env, "FORCE_ONLY_CPU"):
        return CudaPlan(cuda=False)
    force = _flag(env, "FORCE_CUDA")
    if not force and torch_cuda is None:
        return CudaPlan(cuda=False)  # a CPU build of torch: nothing to say
    cpu_only = "building the CPU kernels only (FORCE_ONLY_CPU=1 skips this check; FORCE_CUDA=1 makes it an error)"
    if cuda_home is None:
        message = f"mnemo_fast: no CUDA kernels: nvcc not found (set CUDA_HOME or put nvcc on PATH); {cpu_only}"
        if force:
            raise SystemExit(message)
        return CudaPlan(cuda=False, message=message)
    include_dirs = include_candidates(cuda_home, search_path)
    library_dirs = library_candidates(cuda_home, search_path)
    found, missing = find_headers(list(REQUIRED_HEADERS), include_dirs)
    cudart = find_library(CUDART, library_dirs)
    if missing or cudart is None:
        what = [f"{name} ({REQUIRED_HEADERS[name]})" for name in missing]
        if cudart is None:
            what.append(f"lib{CUDART}.so (the CUDA runtime)")
        looked = (include_dirs if missing else []) + (library_dirs if cudart is None else [])
        message = (
            f"mnemo_fast: no CUDA kernels: {', '.join(what)} not found in "
            f"{', '.join(looked) or 'no folder'}; {cpu_only}"
        )
        if force:
            raise SystemExit(message)
        return CudaPlan(cuda=False, message=message)
    toolkit_include = os.path.join(cuda_home, "include")
    extra_includes = []
    for d in found.values():  # the toolkit's own folder first, so its headers win over a wheel's
        if d not in extra_includes:
            extra_includes.append(d)
    extra_includes.sort(key=lambda d: d != toolkit_include)
    lib_dir, link_name = cudart
    return CudaPlan(cuda=True, include_dirs=extra_includes, library_dirs=[lib_dir], cudart=link_name)


#: NEEDED entries that mean "the C++ runtime is a shared library" (GCC's and LLVM's)
SHARED_CXX_RUNTIMES = ("libstdc++.so", "libc++.so")


def needed_libraries(path):
    """The shared libraries a built ELF file names as NEEDED (``readelf -d``); None where it
    cannot be told (no readelf, not ELF)."""
    import re
    import shutil
    import subprocess

    readelf = shutil.which("readelf")
    if readelf is None:
        return None
    run = subprocess.run([readelf, "-d", path], capture_output=True, text=True)
    if run.returncode != 0:
        return None
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", run.stdout)


def static_cxx_runtime_message(needed, compiler):
    """The warning for an extension that carries its own copy of the C++ runtime, else None.

    A torch extension must share torch's libstdc++: with a private static copy, formatting an
    error message (an ostringstream with numbers in it) mixes two runtimes' locale state, and a
    kernel's TORCH_CHECK then crashes the process (SIGSEGV) instead of raising RuntimeError. Seen
    on a GPU machine whose CC/CXX pointed at a g++ wrapper that linked libstdc++ statically
    (benchmarks/RESULTS.md, the H200 section)."""
    if needed is None or any(lib.startswith(SHARED_CXX_RUNTIMES) for lib in needed):
        return None
    return (
        f"mnemo_fast: WARNING: the extension links no shared C++ runtime (NEEDED: {', '.join(needed) or 'none'}); "
        f"the compiler ({compiler}) linked libstdc++ statically. Errors raised by its kernels can then crash "
        "the process instead of raising RuntimeError. Rebuild with the system compiler, e.g. "
        "`env -u CC -u CXX pip install --no-build-isolation -e .` or CC=gcc CXX=g++."
    )


def _extension(plan):
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = ["csrc/ops.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    depends = sorted(glob.glob("csrc/**/*.h", recursive=True))
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    cxx = ["-O3", *openmp]
    if not plan.cuda:
        return CppExtension(
            "mnemo_fast._C",
            sources,
            depends=depends,
            extra_compile_args={"cxx": cxx},
            extra_link_args=openmp,
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    ext = CUDAExtension(
        "mnemo_fast._C",
        sources + sorted(glob.glob("csrc/cuda/*.cu")),
        depends=depends + sorted(glob.glob("csrc/**/*.cuh", recursive=True)),
        include_dirs=plan.include_dirs,
        library_dirs=plan.library_dirs,
        define_macros=[("MNEMO_FAST_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx, "nvcc": NVCC_FLAGS},
        extra_link_args=openmp,
    )
    ext.libraries = [plan.cudart if lib == CUDART else lib for lib in ext.libraries]
    return ext


if __name__ == "__main__":
    from setuptools import setup

    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension

    class BuildAndCheck(BuildExtension.with_options(use_ninja=True)):
        """torch's build, then a check that the result shares torch's C++ runtime."""

        def build_extension(self, ext):
            super().build_extension(ext)
            message = static_cxx_runtime_message(
                needed_libraries(self.get_ext_fullpath(ext.name)), os.environ.get("CXX", "c++"))
            if message:
                print(message, file=sys.stderr, flush=True)

    cuda_plan = plan_cuda(os.environ, torch.version.cuda, CUDA_HOME, sys.path)
    if cuda_plan.message:
        print(cuda_plan.message, file=sys.stderr, flush=True)
    setup(ext_modules=[_extension(cuda_plan)], cmdclass={"build_ext": BuildAndCheck})
