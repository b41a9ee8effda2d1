// CUDA perturb_dampen_: params[l] *= (eta > threshold ? min(lam / eta, 1) : 1), in place, for all
// tensors at once (mode="dampen", docs/METHOD.md "Dampening").
//
// eta = f_F / f_R (raw_eta) with NaN -> 0 (never dampened) and +inf kept (the element becomes 0).
// One fused pass reads the two Fishers, and reads and writes only the parameters it dampens;
// launches are batched over tensors (multi_tensor.cuh), one instantiation per parameter dtype
// present. The factor and the product are computed in fp32 (fp64 for fp64 Fishers) and rounded
// once to the parameter dtype, as the CPU kernel and the reference do.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <type_traits>

#include "multi_tensor.cuh"

namespace mnemo_fast::cuda {
namespace {

__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }

template <typename param_t, typename fisher_t>
__global__ void __launch_bounds__(kPerturbThreads)
    dampen_kernel(const TensorBatch<param_t, fisher_t> batch, fisher_t threshold, fisher_t lam) {
  using acc_t = fisher_t;  // float or double: see multi_tensor.cuh
  for_each_chunk(batch, [&](int slot, int64_t begin, int64_t end) {
    param_t* param = batch.param[slot];
    const fisher_t* forget = batch.forget[slot];
    const fisher_t* remain = batch.remain[slot];
    for (int64_t i = begin + threadIdx.x; i < end; i += kPerturbThreads) {
      const acc_t eta = raw_eta(static_cast<acc_t>(forget[i]), static_cast<acc_t>(remain[i]));
      if (!(eta > threshold)) continue;  // NaN compares false: never dampened
      const acc_t factor = min(div_rn(lam, eta), acc_t(1));
      param[i] = static_cast<param_t>(mul_rn(static_cast<acc_t>(param[i]), factor));
    }
  });
}

void perturb_dampen_cuda(at::TensorList params, at::TensorList forget, at::TensorList remain,
                         double threshold, double lam) {
  check_fishers("perturb_dampen_", forget, remain);
  check_param_list("perturb_dampen_", params, forget);
  if (params.empty()) return;

  const c10::cuda::CUDAGuard guard(params[0].device());
  const ComputeFishers fishers = compute_fishers(forget, remain);
  launch_perturb<true>(
      params, fishers, at::Tensor(), {},
      [&](const auto& batch, const auto* /*ratio*/, unsigned grid, cudaStream_t stream) {
        using Batch = std::decay_t<decltype(batch)>;
        using acc_t = typename Batch::fisher_type;
        dampen_kernel<typename Batch::param_type, acc_t><<<grid, kPerturbThreads, 0, stream>>>(
            batch, static_cast<acc_t>(threshold), static_cast<acc_t>(lam));
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(mnemo_fast, CUDA, m) {
  m.impl("perturb_dampen_", &perturb_dampen_cuda);
}

}  // namespace mnemo_fast::cuda
