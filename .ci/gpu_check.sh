#!/usr/bin/env bash
# The first-GPU-run check in one command (`make gpu-check`): builds the CUDA kernels in place if
# the extension has none, then runs
#   1. the GPU test plan (tests/test_ops_cuda.py) and the CPU-side dispatch/build tests,
#   2. compute-sanitizer memcheck, racecheck and synccheck on one small call of each op
#      (.ci/gpu_ops_once.py; PyTorch's caching allocator off so memcheck sees every buffer),
#   3. the GPU benchmarks (.ci/gpu_bench.py),
# and writes everything to $GPU_CHECK_OUT (default gpu-check/): summary.md (one line per step)
# plus each step's log. Every step runs even when an earlier one fails; the exit status is 1
# if any failed. Env: PYTHON (default python3, a CUDA build of torch), GPU_CHECK_OUT,
# TORCH_CUDA_ARCH_LIST (default: this GPU's architecture), MAX_JOBS.
set -uo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
py=${PYTHON:-python3}
out=${GPU_CHECK_OUT:-gpu-check}
mkdir -p "$out"
summary=$out/summary.md
echo "# gpu-check $(date -u +%FT%TZ)" > "$summary"
status=0

step() {  # step NAME LOGFILE COMMAND...: runs, times and records one step
  local name=$1 log=$2; shift 2
  local start=$SECONDS
  "$@" > "$log" 2>&1
  local rc=$?
  local verdict=PASS; [[ $rc -ne 0 ]] && { verdict="FAIL (rc $rc)"; status=1; }
  echo "- $name: $verdict, $((SECONDS - start)) s, log $(basename "$log")" | tee -a "$summary"
}

if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "- no GPU visible to $py (torch.cuda.is_available() is False): nothing run" | tee -a "$summary"
  exit 1
fi
"$py" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'- GPU: {p.name}, sm_{p.major}{p.minor}, torch {torch.__version__}, CUDA {torch.version.cuda}')" | tee -a "$summary"

has_kernels() {
  "$py" -c "import sys, torch; from mnemo_fast.fast import _ext; sys.exit(0 if _ext.has_cuda_kernels(torch.device('cuda')) else 1)" 2>/dev/null
}
if ! has_kernels; then
  arch=$("$py" -c "import torch; print('{}.{}'.format(*torch.cuda.get_device_capability()))")
  step "build the CUDA extension in place (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch})" "$out/build.log" \
    env FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$arch}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    "$py" setup.py build_ext --inplace
fi

step "GPU test plan + dispatch/build tests" "$out/pytest.log" \
  "$py" -m pytest -q -rs tests/test_ops_cuda.py tests/test_cuda_dispatch.py tests/test_build.py \
  --junitxml="$out/pytest.xml"

sanitizer=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}"/bin/compute-sanitizer \
  /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
if [[ -n $sanitizer ]]; then
  for tool in memcheck racecheck synccheck; do
    step "compute-sanitizer $tool" "$out/sanitizer-$tool.log" \
      env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool "$tool" --error-exitcode 1 \
      "$py" .ci/gpu_ops_once.py
  done
else
  echo "- compute-sanitizer: NOT FOUND (looked on PATH and in the CUDA toolkits): skipped" | tee -a "$summary"
  status=1
fi

step "GPU benchmarks (bench.md)" "$out/bench.log" "$py" .ci/gpu_bench.py --out "$out/bench.md"

echo "gpu-check: results in $out/ ($([[ $status -eq 0 ]] && echo all passed || echo FAILURES))" | tee -a "$summary"
exit $status
