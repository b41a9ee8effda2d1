// Multi-tensor launch machinery and the shared eta formula of the perturb_* ops.
//
// The perturb ops touch one (param, forget Fisher, remain Fisher) triple per parameter tensor of
// a model: dozens to hundreds of tensors, many of them small. Instead of one launch per tensor,
// up to kMaxTensorsPerLaunch tensors travel by value in the kernel arguments (a TensorBatch, kept
// under the classic 4 KiB parameter limit), each cut into chunks of kChunkElems elements. Blocks
// grid-stride over the global chunk index; since chunk ranges are sorted by tensor, a block finds
// its tensor by moving a cursor forward, never searching from the start. More tensors than fit
// in one batch simply take another launch.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../checks.h"

// The perturbation promises the reference's arithmetic (IEEE division and reciprocal, no
// flush-to-zero of denormal Fishers or weights, an accurate logf in the Box-Muller transform):
// --use_fast_math would silently break all three.
#ifdef __USE_FAST_MATH__
#error "csrc/cuda perturb_* kernels must be compiled without --use_fast_math"
#endif

namespace mnemo_fast::cuda {

constexpr int kMaxTensorsPerLaunch = 64;
constexpr int kPerturbThreads = 256;
// 16 elements per thread per chunk: enough work per block-chunk to amortise the per-chunk
// bookkeeping (and, for perturb_max_ratio, the block reduction and its one atomic).
constexpr int64_t kChunkElems = 16 * kPerturbThreads;

template <typename param_t, typename fisher_t>
struct TensorBatch {
  using param_type = param_t;
  using fisher_type = fisher_t;
  param_t* param[kMaxTensorsPerLaunch];  // unused (null) for perturb_max_ratio
  const fisher_t* forget[kMaxTensorsPerLaunch];
  const fisher_t* remain[kMaxTensorsPerLaunch];
  int64_t numel[kMaxTensorsPerLaunch];
  int64_t chunk_start[kMaxTensorsPerLaunch + 1];  // prefix sums of chunks; [count] = total
  int64_t rng_base[kMaxTensorsPerLaunch];         // first Philox subsequence of each tensor
  int32_t index[kMaxTensorsPerLaunch];            // position l in the op's tensor lists
  int32_t count;
};
static_assert(sizeof(TensorBatch<double, double>) < 3900,
              "TensorBatch must fit the 4 KiB kernel-parameter limit with the other arguments");

// eta is computed in the Fisher's accumulate_dtype (checks.h): fp64 for fp64 Fishers, fp32
// otherwise (as on CPU). Kernels only ever see Fishers already converted to it (compute_fishers
// below), so their fisher_t is float or double and is also the arithmetic type.

// Visits the chunks of a batch assigned to this block: fn(slot, begin, end) with [begin, end)
// the element range in tensor `slot` of the batch. Uniform across the block, so fn may use
// __syncthreads().
template <typename Batch, typename Fn>
__device__ __forceinline__ void for_each_chunk(const Batch& batch, Fn&& fn) {
  const int64_t total = batch.chunk_start[batch.count];
  int slot = 0;
  for (int64_t chunk = blockIdx.x; chunk < total; chunk += gridDim.x) {
    while (chunk >= batch.chunk_start[slot + 1]) ++slot;
    const int64_t begin = (chunk - batch.chunk_start[slot]) * kChunkElems;
    const int64_t end = std::min(begin + kChunkElems, batch.numel[slot]);
    fn(slot, begin, end);
  }
}

// eta = f_F / f_R as a division, the same function as the CPU kernels (csrc/cpu/perturb.h) and
// the reference's exp(log f_F - log f_R): 0/0 -> NaN, x/0 -> +inf, and a NaN or negative input
// -> NaN (where log would give NaN); -0 counts as +0. One rounding instead of three
// transcendentals. Special values are left to the callers, whose rules differ.
__device__ __forceinline__ float raw_eta(float forget, float remain) {
  if (!(forget >= 0.0f) || !(remain >= 0.0f)) return __int_as_float(0x7fc00000);
  return __fdiv_rn(forget + 0.0f, remain + 0.0f);
}
__device__ __forceinline__ double raw_eta(double forget, double remain) {
  if (!(forget >= 0.0) || !(remain >= 0.0)) return __longlong_as_double(0x7ff8000000000000LL);
  return __ddiv_rn(forget + 0.0, remain + 0.0);
}

// alpha_l = min(lambda1, lambda2 / max_ratio_l), or lambda1 when no finite ratio exists
// (max_ratio_l == 0). Same arithmetic as the reference and the CPU kernel: reciprocal, then
// multiply, and a NaN (from a NaN max_ratio) propagates instead of being hidden by min.
// The intrinsics pin each rounding (IEEE round-to-nearest, whatever the flags) and keep the
// compiler from contracting a product and a sum into an FMA, which the CPU kernel never does.
__device__ __forceinline__ float rcp_rn(float a) { return __frcp_rn(a); }
__device__ __forceinline__ double rcp_rn(double a) { return __drcp_rn(a); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

template <typename acc_t>
__device__ __forceinline__ acc_t perturb_alpha(acc_t max_ratio, acc_t lambda1, acc_t lambda2) {
  if (max_ratio == acc_t(0)) return lambda1;
  const acc_t alpha = mul_rn(rcp_rn(max_ratio), lambda2);
  return isnan(alpha) ? alpha : std::min(alpha, lambda1);
}

// eta with the perturb rules: NaN -> 0, +inf -> max_ratio_l (raw_eta never yields -inf or < 0).
template <typename acc_t>
__device__ __forceinline__ acc_t clamped_eta(acc_t forget, acc_t remain, acc_t max_ratio) {
  const acc_t eta = raw_eta(forget, remain);
  if (isnan(eta)) return acc_t(0);
  if (isinf(eta)) return max_ratio;
  return eta;
}

// Host side -----------------------------------------------------------------------------------

// Fishers converted to their compute dtype and made contiguous: no copy for the usual fp32 or
// fp64 contiguous Fishers. remain[l] follows forget[l]'s compute dtype. The tensors must outlive
// the launches, which the caller's scope guarantees (frees are stream-ordered anyway).
struct ComputeFishers {
  std::vector<at::Tensor> forget, remain;
};
inline ComputeFishers compute_fishers(at::TensorList forget, at::TensorList remain) {
  ComputeFishers out;
  out.forget.reserve(forget.size());
  out.remain.reserve(remain.size());
  for (size_t l = 0; l < forget.size(); ++l) {
    const at::ScalarType dtype = accumulate_dtype(forget[l].scalar_type());
    out.forget.push_back(forget[l].to(dtype).contiguous());
    out.remain.push_back(remain[l].to(dtype).contiguous());
  }
  return out;
}

inline unsigned perturb_grid(int64_t total_chunks) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  // 8 blocks of 256 threads fill an SM; more would only grid-stride less.
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(total_chunks, sms * 8)));
}

// Packs the tensors `indices` (positions in the op's lists) into batches and calls
// launch(batch, grid) for each. `params` may be empty (perturb_max_ratio). Empty tensors are
// skipped. rng_base[l] is the first Philox subsequence of tensor l.
template <typename param_t, typename fisher_t, typename Launch>
void for_each_batch(const std::vector<int64_t>& indices, at::TensorList params,
                    const std::vector<at::Tensor>& forget, const std::vector<at::Tensor>& remain,
                    const std::vector<int64_t>& rng_base, Launch&& launch) {
  TensorBatch<param_t, fisher_t> batch{};
  auto flush = [&] {
    if (batch.count == 0) return;
    launch(batch, perturb_grid(batch.chunk_start[batch.count]));
    batch = TensorBatch<param_t, fisher_t>{};
  };
  for (const int64_t l : indices) {
    const int64_t numel = forget[l].numel();
    if (numel == 0) continue;
    const int s = batch.count;
    batch.param[s] = params.empty() ? nullptr : params[l].mutable_data_ptr<param_t>();
    batch.forget[s] = forget[l].const_data_ptr<fisher_t>();
    batch.remain[s] = remain[l].const_data_ptr<fisher_t>();
    batch.numel[s] = numel;
    batch.chunk_start[s + 1] = batch.chunk_start[s] + (numel + kChunkElems - 1) / kChunkElems;
    batch.rng_base[s] = rng_base.empty() ? 0 : rng_base[l];
    batch.index[s] = static_cast<int32_t>(l);
    batch.count = s + 1;
    if (batch.count == kMaxTensorsPerLaunch) flush();
  }
  flush();
}

// Groups tensor positions by (parameter dtype, Fisher compute dtype): one kernel instantiation
// per group; a model usually has a single group. Without params (perturb_max_ratio) the
// parameter dtype is the Fisher's.
struct DtypeGroup {
  at::ScalarType param;
  at::ScalarType fisher;
  std::vector<int64_t> indices;
};
inline std::vector<DtypeGroup> group_by_dtype(at::TensorList params,
                                              const std::vector<at::Tensor>& fishers) {
  std::vector<DtypeGroup> groups;
  for (size_t l = 0; l < fishers.size(); ++l) {
    const at::ScalarType fisher = fishers[l].scalar_type();
    const at::ScalarType param = params.empty() ? fisher : params[l].scalar_type();
    auto it = std::find_if(groups.begin(), groups.end(), [&](const DtypeGroup& g) {
      return g.param == param && g.fisher == fisher;
    });
    if (it == groups.end()) it = groups.insert(groups.end(), DtypeGroup{param, fisher, {}});
    it->indices.push_back(static_cast<int64_t>(l));
  }
  return groups;
}

template <typename T>
struct TypeTag {
  using type = T;
};

// The one launch path of the perturb_* ops. Groups the tensors by dtype, packs each group into
// batches and calls
//   launch(batch, ratio, grid, stream)
// once per batch, then checks the launch: `batch` is a TensorBatch<param_t, fisher_t> (param_t
// = fisher_t and null param pointers when kWithParams is false, as for perturb_max_ratio),
// `ratio` max_ratio converted to fisher_t (nullptr when max_ratio is undefined), `grid` the
// number of blocks, `stream` the current stream. `rng_base` may be empty. The caller holds
// the device guard and keeps the Fishers alive.
template <bool kWithParams, typename Launch>
void launch_perturb(at::TensorList params, const ComputeFishers& fishers,
                    const at::Tensor& max_ratio, const std::vector<int64_t>& rng_base,
                    Launch&& launch) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for (const DtypeGroup& group : group_by_dtype(params, fishers.forget)) {
    const at::Tensor ratio =
        max_ratio.defined() ? max_ratio.to(group.fisher).contiguous() : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(group.fisher, "launch_perturb", [&] {
      using fisher_t = scalar_t;
      const fisher_t* ratio_ptr = ratio.defined() ? ratio.const_data_ptr<fisher_t>() : nullptr;
      auto run = [&](auto tag) {
        using param_t = typename decltype(tag)::type;
        for_each_batch<param_t, fisher_t>(
            group.indices, params, fishers.forget, fishers.remain, rng_base,
            [&](const TensorBatch<param_t, fisher_t>& batch, unsigned grid) {
              launch(batch, ratio_ptr, grid, stream);
              C10_CUDA_KERNEL_LAUNCH_CHECK();
            });
      };
      if constexpr (kWithParams) {
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, group.param, "launch_perturb",
                                        [&] { run(TypeTag<scalar_t>{}); });
      } else {
        run(TypeTag<fisher_t>{});
      }
    });
  }
}

}  // namespace mnemo_fast::cuda
