// CUDA perturb_max_ratio: out[l] = the largest finite eta = f_F / f_R (raw_eta, multi_tensor.cuh) of tensor l
// (NaN counts as 0), or 0 when tensor l has no finite eta.
//
// One launch per batch of up to 64 tensors (multi_tensor.cuh). Each block reduces a chunk in
// registers, then across the block (warp shuffles, then one word per warp in shared memory),
// and thread 0 merges the chunk's max into out[l] with an integer atomicMax on the float's bits:
// every candidate is a finite float >= +0 and out starts at +0, and for non-negative IEEE floats
// the bit patterns order like the values.
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <type_traits>

#include "multi_tensor.cuh"

namespace mnemo_fast::cuda {
namespace {

__device__ __forceinline__ void atomic_max_nonnegative(float* address, float value) {
  atomicMax(reinterpret_cast<unsigned int*>(address), __float_as_uint(value));
}
__device__ __forceinline__ void atomic_max_nonnegative(double* address, double value) {
  atomicMax(reinterpret_cast<unsigned long long*>(address),
            static_cast<unsigned long long>(__double_as_longlong(value)));
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_max(acc_t value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    value = max(value, __shfl_xor_sync(0xffffffffu, value, offset));
  }
  return value;
}

// Max over the block; the result is valid in thread 0. Reuses `scratch`, so it ends with a
// barrier before the next chunk's call can write it again.
template <typename acc_t>
__device__ __forceinline__ acc_t block_max(acc_t value, acc_t* scratch) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  value = warp_max(value);
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  constexpr int kWarps = kPerturbThreads / 32;
  value = threadIdx.x < kWarps ? scratch[threadIdx.x] : acc_t(0);
  if (warp == 0) value = warp_max(value);
  __syncthreads();
  return value;
}

template <typename fisher_t>
__global__ void __launch_bounds__(kPerturbThreads)
    max_ratio_kernel(const TensorBatch<fisher_t, fisher_t> batch, fisher_t* out) {
  using acc_t = fisher_t;
  __shared__ acc_t scratch[kPerturbThreads / 32];
  for_each_chunk(batch, [&](int slot, int64_t begin, int64_t end) {
    const fisher_t* forget = batch.forget[slot];
    const fisher_t* remain = batch.remain[slot];
    // 0 is both the identity here and the answer when nothing is finite.
    acc_t local = acc_t(0);
    for (int64_t i = begin + threadIdx.x; i < end; i += kPerturbThreads) {
      const acc_t eta =
          raw_eta(static_cast<acc_t>(forget[i]), static_cast<acc_t>(remain[i]));
      // isfinite also drops NaN (-> 0, which cannot raise the max) and +inf.
      if (isfinite(eta)) local = max(local, eta);
    }
    const acc_t chunk_max = block_max(local, scratch);
    if (threadIdx.x == 0 && chunk_max > acc_t(0)) {
      atomic_max_nonnegative(out + batch.index[slot], chunk_max);
    }
  });
}

at::Tensor perturb_max_ratio_cuda(at::TensorList forget, at::TensorList remain) {
  check_fishers("perturb_max_ratio", forget, remain);
  const at::ScalarType dtype = check_max_ratio_dtypes(forget);
  const int64_t L = static_cast<int64_t>(forget.size());
  if (L == 0) return at::zeros({0}, at::TensorOptions().dtype(at::kFloat));

  const c10::cuda::CUDAGuard guard(forget[0].device());
  // Zero is the answer for tensors without a finite eta and the atomicMax identity.
  at::Tensor out = at::zeros({L}, forget[0].options().dtype(dtype));
  const ComputeFishers fishers = compute_fishers(forget, remain);
  launch_perturb<false>(
      {}, fishers, at::Tensor(), {},
      [&](const auto& batch, const auto*, unsigned grid, cudaStream_t stream) {
        // fisher_t is `dtype` (every Fisher computes in it, checked above), as is `out`.
        using fisher_t = typename std::decay_t<decltype(batch)>::fisher_type;
        max_ratio_kernel<fisher_t>
            <<<grid, kPerturbThreads, 0, stream>>>(batch, out.mutable_data_ptr<fisher_t>());
      });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mnemo_fast, CUDA, m) {
  m.impl("perturb_max_ratio", &perturb_max_ratio_cuda);
}

}  // namespace mnemo_fast::cuda
