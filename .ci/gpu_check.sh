#!/usr/bin/env bash
# The first-GPU-run check in one command (`make gpu-check`): builds the CUDA kernels in place if
# the extension has none, then runs
#   1. the GPU test plan (tests/test_ops_cuda.py: each op against its twin; tests/test_gpu_models.py:
#      whole models, fast against reference, on the GPU) and the CPU-side dispatch/build tests,
#   2. the GPU benchmarks (.ci/gpu_bench.py: the Linear paths' crossover table, fused kernel vs
#      chunked-bmm, which it also adds to summary.md; ops, a whole forget, transformers' Fisher),
#   3. compute-sanitizer memcheck, racecheck and synccheck on one small call of each op
#      (.ci/gpu_ops_once.py; PyTorch's caching allocator off so memcheck sees every buffer),
# and writes everything to $GPU_CHECK_OUT (default gpu-check/): summary.md (one line per step)
# plus each step's log and linear-paths.md (what a lent device machine sends back). Every step runs even
# when an earlier one fails, each under its own time limit (a lent machine's time is short);
# the exit status is 1 if any failed. Env: PYTHON (default python3, a CUDA build of torch),
# GPU_CHECK_OUT, TORCH_CUDA_ARCH_LIST (default: this GPU's architecture), MAX_JOBS,
# GPU_CHECK_SCALE (multiplies every step's time limit; default 1).
set -uo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
scale=${GPU_CHECK_SCALE:-1}
py=${PYTHON:-python3}
out=${GPU_CHECK_OUT:-gpu-check}
mkdir -p "$out"
summary=$out/summary.md
echo "# gpu-check $(date -u +%FT%TZ)" > "$summary"
status=0

step() {  # step NAME LIMIT_S LOGFILE COMMAND...: runs (at most LIMIT_S x scale), times, records
  local name=$1 limit=$(( $2 * scale )) log=$3; shift 3
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
  local rc=$?
  local verdict=PASS
  if [[ $rc -eq 124 || $rc -eq 137 ]]; then verdict="TIMED OUT after ${limit} s"; status=1
  elif [[ $rc -ne 0 ]]; then verdict="FAIL (rc $rc)"; status=1; fi
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
  # The system compiler (CC/CXX unset): a lent H200 machine sets them to a g++ wrapper that links
  # libstdc++ statically, and such an extension crashes on its own error messages (setup.py warns).
  arch=$("$py" -c "import torch; print('{}.{}'.format(*torch.cuda.get_device_capability()))")
  step "build the CUDA extension in place (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch})" 240 "$out/build.log" \
    env -u CC -u CXX FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$arch}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    "$py" setup.py build_ext --inplace
fi

step "GPU test plan + whole models on the GPU + dispatch/build tests" 120 "$out/pytest.log" \
  "$py" -m pytest -q -rs tests/test_ops_cuda.py tests/test_gpu_models.py tests/test_cuda_dispatch.py tests/test_build.py

step "GPU benchmarks (bench.md; the Linear paths' crossover table first, also in linear-paths.md)" 150 \
  "$out/bench.log" "$py" .ci/gpu_bench.py --out "$out/bench.md" --linear-out "$out/linear-paths.md"
if [[ -s $out/linear-paths.md ]]; then  # the table mnemo_fast/fast/dispatch.py's CUDA thresholds wait for
  { echo; cat "$out/linear-paths.md"; echo; } >> "$summary"
fi

sanitizer=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}"/bin/compute-sanitizer \
  /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
if [[ -n $sanitizer ]]; then
  for tool in memcheck racecheck synccheck; do
    step "compute-sanitizer $tool" 40 "$out/sanitizer-$tool.log" \
      env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool "$tool" --error-exitcode 1 \
      "$py" .ci/gpu_ops_once.py
  done
else
  echo "- compute-sanitizer: NOT FOUND (looked on PATH and in the CUDA toolkits): skipped" | tee -a "$summary"
  status=1
fi

echo "gpu-check: results in $out/ ($([[ $status -eq 0 ]] && echo all passed || echo FAILURES))" | tee -a "$summary"
exit $status
