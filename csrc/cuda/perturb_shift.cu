// CUDA perturb_shift_: params[l] += sign * alpha_l * eta, in place, for all tensors at once.
//
// eta = f_F / f_R (raw_eta) with NaN -> 0 and +inf -> max_ratio[l]; alpha_l =
// min(lambda1, lambda2 / max_ratio[l]) (lambda1 when max_ratio[l] is 0). One fused pass reads the
// two Fishers and the parameter once and writes the parameter once; launches are batched over
// tensors (multi_tensor.cuh), one instantiation per parameter dtype present. eta is computed in
// fp32 (fp64 for fp64 Fishers); the step is rounded to the parameter dtype and added in the
// parameter's opmath type (fp32 for bf16/fp16), as `param += step` and the CPU kernel do.
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <type_traits>

#include "multi_tensor.cuh"

namespace mnemo_fast::cuda {
namespace {

template <typename param_t, typename fisher_t>
__global__ void __launch_bounds__(kPerturbThreads)
    shift_kernel(const TensorBatch<param_t, fisher_t> batch,
                 const fisher_t* __restrict__ max_ratio, fisher_t lambda1,
                 fisher_t lambda2, fisher_t sign) {
  using acc_t = fisher_t;  // float or double: see multi_tensor.cuh
  using opmath_t = at::opmath_type<param_t>;
  for_each_chunk(batch, [&](int slot, int64_t begin, int64_t end) {
    const acc_t ratio = max_ratio[batch.index[slot]];
    const acc_t alpha = perturb_alpha(ratio, lambda1, lambda2);
    param_t* param = batch.param[slot];
    const fisher_t* forget = batch.forget[slot];
    const fisher_t* remain = batch.remain[slot];
    for (int64_t i = begin + threadIdx.x; i < end; i += kPerturbThreads) {
      const acc_t eta =
          clamped_eta(static_cast<acc_t>(forget[i]), static_cast<acc_t>(remain[i]), ratio);
      // Rounded to the parameter dtype before the add, like `param += step` (and the CPU kernel).
      const param_t step = static_cast<param_t>(mul_rn(sign, mul_rn(alpha, eta)));
      param[i] = static_cast<param_t>(
          add_rn(static_cast<opmath_t>(param[i]), static_cast<opmath_t>(step)));
    }
  });
}

void perturb_shift_cuda(at::TensorList params, at::TensorList forget, at::TensorList remain,
                        const at::Tensor& max_ratio, double lambda1, double lambda2,
                        double sign) {
  check_fishers("perturb_shift_", forget, remain);
  check_params("perturb_shift_", params, forget, max_ratio);
  if (params.empty()) return;

  const c10::cuda::CUDAGuard guard(params[0].device());
  const ComputeFishers fishers = compute_fishers(forget, remain);
  launch_perturb<true>(
      params, fishers, max_ratio, {},
      [&](const auto& batch, const auto* ratio, unsigned grid, cudaStream_t stream) {
        using Batch = std::decay_t<decltype(batch)>;
        using acc_t = typename Batch::fisher_type;
        shift_kernel<typename Batch::param_type, acc_t><<<grid, kPerturbThreads, 0, stream>>>(
            batch, ratio, static_cast<acc_t>(lambda1), static_cast<acc_t>(lambda2),
            static_cast<acc_t>(sign));
      });
}

}  // namespace

// True when this library holds a kernel image for CUDA device `device` (SASS for its
// architecture, or PTX the driver can compile for it). Every .cu file is built for the same
// architecture list, so one kernel answers for all. Exposed as mnemo_fast._C.cuda_kernel_image.
bool kernel_image_available(int device) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  cudaFuncAttributes attributes;
  if (cudaFuncGetAttributes(&attributes, shift_kernel<float, float>) != cudaSuccess) {
    (void)cudaGetLastError();  // "no kernel image" is not sticky: clear it for later calls
    return false;
  }
  return true;
}

TORCH_LIBRARY_IMPL(mnemo_fast, CUDA, m) {
  m.impl("perturb_shift_", &perturb_shift_cuda);
}

}  // namespace mnemo_fast::cuda
