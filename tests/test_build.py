"""The build (setup.py) and the C++ argument checks shared by the CPU and CUDA kernels.

setup.py looks for the CUDA headers and the runtime library in nvcc's toolkit and in pip's
``nvidia/*`` wheels; these tests build fake trees of both. No compiler runs here.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _load_setup():
    spec = importlib.util.spec_from_file_location("mnemo_fast_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)  # not __main__: defines the helpers, runs no setup()
    return module


setup_py = _load_setup()
WHEEL_HEADERS = ["cuda_runtime.h", "curand_kernel.h", "cublas_v2.h", "cusparse.h", "cusolverDn.h"]


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")


@pytest.fixture
def trees(tmp_path):
    """A minimal toolkit (cuda_runtime.h, libcudart.so; no cuRAND) and a site-packages with
    pip's CUDA wheel layout (nvidia/cu13/include + lib, versioned libcudart only)."""
    toolkit, site = tmp_path / "cuda", tmp_path / "site"
    _touch(toolkit / "include" / "cuda_runtime.h")
    _touch(toolkit / "lib64" / "libcudart.so")
    for name in WHEEL_HEADERS:
        _touch(site / "nvidia" / "cu13" / "include" / name)
    _touch(site / "nvidia" / "cu13" / "lib" / "libcudart.so.13")
    _touch(site / "nvidia" / "cudnn" / "include" / "cudnn.h")
    return toolkit, site


def test_headers_found_in_wheel_include_dirs(trees):
    toolkit, site = trees
    plan = setup_py.plan_cuda({}, "13.0", str(toolkit), [str(site)])
    assert plan.cuda and plan.message is None
    # the toolkit's folder first (its cuda_runtime.h wins), then the wheel's for cuRAND & co.
    assert plan.include_dirs == [str(toolkit / "include"), str(site / "nvidia" / "cu13" / "include")]
    assert plan.cudart == "cudart" and plan.library_dirs == [str(toolkit / "lib64")]


def test_versioned_cudart_of_a_wheel_links_by_file_name(trees):
    toolkit, site = trees
    (toolkit / "lib64" / "libcudart.so").unlink()
    plan = setup_py.plan_cuda({}, "13.0", str(toolkit), [str(site)])
    assert plan.cuda
    assert plan.cudart == ":libcudart.so.13"
    assert plan.library_dirs == [str(site / "nvidia" / "cu13" / "lib")]


def test_missing_header_builds_cpu_only_with_one_line(trees):
    toolkit, site = trees
    (site / "nvidia" / "cu13" / "include" / "curand_kernel.h").unlink()
    plan = setup_py.plan_cuda({}, "13.0", str(toolkit), [str(site)])
    assert not plan.cuda
    message = plan.message
    assert "\n" not in message
    assert "curand_kernel.h" in message and "cublas_v2.h" not in message
    assert str(toolkit / "include") in message and str(site / "nvidia" / "cu13" / "include") in message
    assert "FORCE_ONLY_CPU=1" in message and "CPU kernels only" in message
    assert str(toolkit / "lib64") not in message  # the library was found: its folders are not listed


def test_force_cuda_is_strict(trees):
    toolkit, site = trees
    (site / "nvidia" / "cu13" / "include" / "curand_kernel.h").unlink()
    with pytest.raises(SystemExit, match="curand_kernel.h"):
        setup_py.plan_cuda({"FORCE_CUDA": "1"}, "13.0", str(toolkit), [str(site)])
    with pytest.raises(SystemExit, match="nvcc not found"):
        setup_py.plan_cuda({"FORCE_CUDA": "1"}, "13.0", None, [str(site)])
    # nothing missing: FORCE_CUDA builds, even with a CPU torch (compile-only machines)
    _touch(site / "nvidia" / "cu13" / "include" / "curand_kernel.h")
    assert setup_py.plan_cuda({"FORCE_CUDA": "1"}, None, str(toolkit), [str(site)]).cuda


def test_missing_runtime_library(trees):
    toolkit, site = trees
    (toolkit / "lib64" / "libcudart.so").unlink()
    (site / "nvidia" / "cu13" / "lib" / "libcudart.so.13").unlink()
    plan = setup_py.plan_cuda({}, "13.0", str(toolkit), [str(site)])
    assert not plan.cuda and "libcudart.so" in plan.message and str(toolkit / "lib64") in plan.message


def test_cpu_cases_say_nothing_or_one_line(trees):
    toolkit, site = trees
    assert setup_py.plan_cuda({"FORCE_ONLY_CPU": "1"}, "13.0", str(toolkit), [str(site)]) == setup_py.CudaPlan(cuda=False)
    assert setup_py.plan_cuda({}, None, str(toolkit), [str(site)]) == setup_py.CudaPlan(cuda=False)  # CPU torch
    no_nvcc = setup_py.plan_cuda({}, "13.0", None, [str(site)])
    assert not no_nvcc.cuda and "nvcc not found" in no_nvcc.message and "\n" not in no_nvcc.message


def test_wheel_roots_skip_files_and_missing_dirs(tmp_path):
    _touch(tmp_path / "nvidia" / "not_a_dir")
    (tmp_path / "nvidia" / "cu13").mkdir()
    assert setup_py.wheel_roots([str(tmp_path), str(tmp_path / "absent")]) == [str(tmp_path / "nvidia" / "cu13")]


def test_arch_list_has_ptx_for_the_newest_arch():
    archs = setup_py.DEFAULT_ARCHS.split(";")
    assert archs[-1].endswith("+PTX") and "8.0" in archs
    assert max(float(a.split("+")[0]) for a in archs) == float(archs[-1].split("+")[0])


def test_no_fast_math_for_the_kernels():
    assert not any("fast_math" in flag or "fast-math" in flag for flag in setup_py.NVCC_FLAGS)
    # and the perturbation refuses to compile with it (nvcc defines __USE_FAST_MATH__)
    header = (ROOT / "csrc" / "cuda" / "multi_tensor.cuh").read_text()
    assert "#ifdef __USE_FAST_MATH__\n#error" in header
    assert "__frcp_rn" in header and "__drcp_rn" in header


def test_cuda_extension_flags(tmp_path):
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        pytest.skip("torch.utils.cpp_extension finds no CUDA toolkit to describe a CUDA extension")
    plan = setup_py.CudaPlan(cuda=True, include_dirs=[str(tmp_path)], library_dirs=[str(tmp_path)], cudart=":libcudart.so.13")
    ext = setup_py._extension(plan)
    assert ext.extra_compile_args["nvcc"] == setup_py.NVCC_FLAGS
    assert str(tmp_path) in ext.include_dirs and str(tmp_path) in ext.library_dirs
    assert ":libcudart.so.13" in ext.libraries and "cudart" not in ext.libraries
    assert ("MNEMO_FAST_WITH_CUDA", None) in ext.define_macros


# --- the shared argument checks (csrc/checks.h) ----------------------------------------------

from mnemo_fast.fast import _ext  # noqa: E402

needs_ext = pytest.mark.skipif(not _ext.available(), reason="mnemo_fast._C unavailable")


# --- the C++ runtime the built extension links (setup.py's check after the build) -----------

# NEEDED entries of an extension built on a lent H200 machine whose CC/CXX wrapper linked
# libstdc++ statically: every TORCH_CHECK message with a number in it crashed the process.
STATIC_BUILD_NEEDED = ["libc10.so", "libtorch_cpu.so", "libcudart.so.13", "libc10_cuda.so",
                       "libtorch_cuda.so", "libgomp.so.1", "libgcc_s.so.1", "libc.so.6", "ld-linux-x86-64.so.2"]


def test_static_cxx_runtime_is_named_with_the_fix():
    message = setup_py.static_cxx_runtime_message(STATIC_BUILD_NEEDED, "/opt/gcc/bin/g++")
    assert "links no shared C++ runtime" in message and "/opt/gcc/bin/g++" in message
    assert "env -u CC -u CXX" in message
    shared = STATIC_BUILD_NEEDED + ["libstdc++.so.6"]
    assert setup_py.static_cxx_runtime_message(shared, "g++") is None
    assert setup_py.static_cxx_runtime_message(["libc++.so.1", "libc10.so"], "clang++") is None
    assert setup_py.static_cxx_runtime_message(None, "g++") is None  # cannot tell: no warning


@needs_ext
def test_the_built_extension_shares_torchs_cxx_runtime():
    import mnemo_fast._C as compiled

    needed = setup_py.needed_libraries(compiled.__file__)
    if needed is None:
        pytest.skip("readelf is not installed: the NEEDED entries cannot be read")
    assert setup_py.static_cxx_runtime_message(needed, "the build's compiler") is None, (
        f"{compiled.__file__} links libstdc++ statically (NEEDED: {needed}): its kernels' "
        "error messages can crash the process; rebuild with the system compiler (env -u CC -u CXX)")


@needs_ext
def test_cpu_conv_refuses_a_kernel_larger_than_the_padded_input():
    from mnemo_fast.fast import ops

    # H = W = 5, kernel 6, stride 2: (5 - 6) / 2 + 1 truncates to 1, so a 1x1 grad_output
    # passed the old CPU check; the shared check names the real problem.
    x = torch.randn(1, 1, 5, 5)
    g = torch.randn(1, 1, 1, 1)
    with pytest.raises(RuntimeError, match="smaller than the dilated kernel"):
        ops.sum_sq_grad_conv2d(g, x, 6, stride=2)
    with pytest.raises(RuntimeError, match="smaller than the dilated kernel"):
        ops.sum_sq_grad_conv2d(g, x, 3, stride=2, dilation=3)  # span 7 > 5
    ops.sum_sq_grad_conv2d(g, x, 6, stride=2, padding=1)  # padded 7 >= 6: fine


@needs_ext
def test_shared_checks_on_cpu():
    from mnemo_fast.fast import ops

    with pytest.raises(RuntimeError, match="must be float64 exactly when forget"):
        ops.perturb_max_ratio([torch.ones(2), torch.ones(2, dtype=torch.float64)], [torch.ones(2)] * 2)
    with pytest.raises(RuntimeError, match="must agree on N and T"):
        ops.sum_sq_grad_linear(torch.ones(2, 3, 4), torch.ones(2, 2, 4))
