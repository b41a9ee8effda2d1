// CUDA perturb_gaussian_: params[l] += [eta > tau] * alpha_l * eta * z, z ~ N(0, 1), in place.
//
// eta and alpha_l follow perturb_shift_ (NaN -> 0, +inf -> max_ratio[l]). The noise comes from
// Philox4x32-10 (cuRAND) keyed by the torch CUDA generator: one philox_cuda_state(4) call per op
// reserves the offset, and every group of 4 consecutive elements of tensor l gets its own
// subsequence rng_base[l] + element / 4 and one curand_normal4 call (4 x 32 bits = the reserved
// increment). The draw of an element thus depends only on (seed, offset, l, element), not on the
// launch shape or batching, so a generator state reproduces the same noise; it differs from the
// CPU kernel's stream. Normals are drawn in fp32 even for fp64 Fishers (noise needs no more).
#include <ATen/OpMathType.h>
#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/PhiloxUtils.cuh>
#include <c10/cuda/CUDAGuard.h>
#include <curand_kernel.h>
#include <torch/library.h>

#include <mutex>
#include <optional>
#include <tuple>
#include <type_traits>

#include "multi_tensor.cuh"

namespace mnemo_fast::cuda {
namespace {

constexpr int kElemsPerDraw = 4;  // curand_normal4
constexpr uint64_t kPhiloxIncrement = 4;  // 32-bit Philox outputs used per subsequence

template <typename param_t, typename fisher_t>
__global__ void __launch_bounds__(kPerturbThreads)
    gaussian_kernel(const TensorBatch<param_t, fisher_t> batch,
                    const fisher_t* __restrict__ max_ratio,
                    fisher_t lambda1, fisher_t lambda2,
                    fisher_t tau, at::PhiloxCudaState philox) {
  using acc_t = fisher_t;  // float or double: see multi_tensor.cuh
  using opmath_t = at::opmath_type<param_t>;
  // Plain variables, not a structured binding: the lambda below captures them (capturing a
  // structured binding is C++20; nvcc warned under -std=c++17).
  const auto seed_offset = at::cuda::philox::unpack(philox);
  const uint64_t seed = std::get<0>(seed_offset), offset = std::get<1>(seed_offset);
  for_each_chunk(batch, [&](int slot, int64_t begin, int64_t end) {
    const acc_t ratio = max_ratio[batch.index[slot]];
    const acc_t alpha = perturb_alpha(ratio, lambda1, lambda2);
    param_t* param = batch.param[slot];
    const fisher_t* forget = batch.forget[slot];
    const fisher_t* remain = batch.remain[slot];
    // Chunks start at multiples of kChunkElems, hence of kElemsPerDraw: draw groups never
    // straddle two chunks.
    for (int64_t first = begin + int64_t(threadIdx.x) * kElemsPerDraw; first < end;
         first += int64_t(kPerturbThreads) * kElemsPerDraw) {
      curandStatePhilox4_32_10_t state;
      curand_init(seed, static_cast<unsigned long long>(batch.rng_base[slot] + first / kElemsPerDraw),
                  offset, &state);
      const float4 z4 = curand_normal4(&state);
      const float z[kElemsPerDraw] = {z4.x, z4.y, z4.z, z4.w};
#pragma unroll
      for (int k = 0; k < kElemsPerDraw; ++k) {
        const int64_t i = first + k;
        if (i >= end) break;
        const acc_t eta =
            clamped_eta(static_cast<acc_t>(forget[i]), static_cast<acc_t>(remain[i]), ratio);
        if (!(eta > tau)) continue;  // masked entries stay untouched
        // Rounded to the parameter dtype before the add, as in the CPU kernel.
        const param_t step =
            static_cast<param_t>(mul_rn(mul_rn(alpha, eta), static_cast<acc_t>(z[k])));
        param[i] = static_cast<param_t>(
            add_rn(static_cast<opmath_t>(param[i]), static_cast<opmath_t>(step)));
      }
    }
  });
}

void perturb_gaussian_cuda(at::TensorList params, at::TensorList forget, at::TensorList remain,
                           const at::Tensor& max_ratio, double lambda1, double lambda2,
                           double tau, std::optional<at::Generator> generator) {
  check_fishers("perturb_gaussian_", forget, remain);
  check_params("perturb_gaussian_", params, forget, max_ratio);
  if (params.empty()) return;

  const at::Device device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
      generator, at::cuda::detail::getDefaultCUDAGenerator(device.index()));
  check_generator_device("perturb_gaussian_", gen->device(), device);
  at::PhiloxCudaState philox;
  {
    // The generator is shared with every other CUDA random op on this device.
    std::lock_guard<std::mutex> lock(gen->mutex_);
    philox = gen->philox_cuda_state(kPhiloxIncrement);
  }

  const ComputeFishers fishers = compute_fishers(forget, remain);
  // Disjoint subsequence ranges per tensor, in list order (independent of dtype grouping).
  std::vector<int64_t> rng_base(params.size());
  int64_t next = 0;
  for (size_t l = 0; l < params.size(); ++l) {
    rng_base[l] = next;
    next += (params[l].numel() + kElemsPerDraw - 1) / kElemsPerDraw;
  }
  launch_perturb<true>(
      params, fishers, max_ratio, rng_base,
      [&](const auto& batch, const auto* ratio, unsigned grid, cudaStream_t stream) {
        using Batch = std::decay_t<decltype(batch)>;
        using acc_t = typename Batch::fisher_type;
        gaussian_kernel<typename Batch::param_type, acc_t><<<grid, kPerturbThreads, 0, stream>>>(
            batch, ratio, static_cast<acc_t>(lambda1), static_cast<acc_t>(lambda2),
            static_cast<acc_t>(tau), philox);
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(mnemo_fast, CUDA, m) {
  m.impl("perturb_gaussian_", &perturb_gaussian_cuda);
}

}  // namespace mnemo_fast::cuda
