#!/usr/bin/env bash
# Compile-checks every csrc/cuda/*.cu (nvcc -c, no link, nothing run): the CUDA kernels cannot
# be executed on the GPU-less machines CI and the developers use, so this is their only gate.
#
# Tool: $CUDA_COMPILE_CHECK, else ../shared/tools/cuda-compile-check beside the repo (it fetches
# the CUDA build's torch headers once and caches them). Without the tool (a clean clone has no
# ../shared) the check is skipped with a message and exit 0. Architectures: $CUDA_COMPILE_ARCHS
# (space-separated, default "sm_80 sm_90", the architectures setup.py builds SASS for).
#
# perturb_gaussian.cu needs cuRAND's headers, which a full CUDA toolkit has but a bare nvcc (and
# the tool's header cache) may not: they are looked up in the toolkit, then in a cache, then
# fetched once from the nvidia-curand wheel with pip (headers only).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tool=${CUDA_COMPILE_CHECK:-$repo/../shared/tools/cuda-compile-check}
archs=${CUDA_COMPILE_ARCHS:-sm_80 sm_90}
curand_wheel=${CURAND_WHEEL_SPEC:-nvidia-curand==10.4.0.35}  # the CUDA 13 generation
curand_cache=${MNEMO_CURAND_HEADERS:-$HOME/.cache/mnemo-curand-headers}

if [[ ! -x $tool ]]; then
  if command -v nvcc >/dev/null 2>&1; then
    echo "WARNING: nvcc is installed but cuda-compile-check was not found at $tool;" \
         "set CUDA_COMPILE_CHECK to check the CUDA sources. SKIPPED."
  else
    echo "SKIPPED: cuda-compile-check tool not found (looked at $tool) and no nvcc"
  fi
  exit 0
fi
if ! command -v nvcc >/dev/null 2>&1; then
  echo "SKIPPED: cuda-compile-check found but nvcc is not installed"
  exit 0
fi

shopt -s nullglob
sources=("$repo"/csrc/cuda/*.cu)
if [[ ${#sources[@]} -eq 0 ]]; then
  echo "SKIPPED: no csrc/cuda/*.cu"
  exit 0
fi

# Prints an include directory holding curand_kernel.h, fetching the headers if need be.
find_curand() {
  local nvcc_root dir
  nvcc_root=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
  for dir in "${CUDA_HOME:-/usr/local/cuda}/include" "$nvcc_root/include" \
             "${MNEMO_CUDA_HEADERS:-$HOME/.cache/mnemo-cuda-headers}"/nvidia/*/include \
             "$curand_cache"/nvidia/*/include; do
    [[ -f $dir/curand_kernel.h ]] && { echo "$dir"; return 0; }
  done
  local tmp
  tmp=$(mktemp -d)
  if python3 -m pip download -q --no-deps -d "$tmp" "$curand_wheel" >&2; then
    mkdir -p "$curand_cache"
    for w in "$tmp"/*.whl; do unzip -q -o "$w" 'nvidia/*/include/*' -d "$curand_cache" || true; done
  fi
  rm -rf "$tmp"
  for dir in "$curand_cache"/nvidia/*/include; do
    [[ -f $dir/curand_kernel.h ]] && { echo "$dir"; return 0; }
  done
  return 1
}

includes=(-I "$repo/csrc/cuda")
checked=("${sources[@]}")
if grep -l 'curand_kernel.h' "${sources[@]}" >/dev/null; then
  if curand_inc=$(find_curand); then
    includes+=(-I "$curand_inc")
  else
    echo "WARNING: cuRAND headers unavailable; SKIPPED:" $(grep -l 'curand_kernel.h' "${sources[@]}")
    checked=()
    for f in "${sources[@]}"; do grep -q 'curand_kernel.h' "$f" || checked+=("$f"); done
  fi
fi

status=0
for arch in $archs; do
  echo "== cuda-compile-check, arch $arch: ${#checked[@]} files"
  NVCC_ARCH=$arch "$tool" "${includes[@]}" "${checked[@]}" || status=1
done
if [[ $status -ne 0 ]]; then
  echo "cuda-compile-check: FAILED"
else
  echo "cuda-compile-check: all CUDA sources compile"
fi
exit $status
