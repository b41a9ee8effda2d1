// Per tensor l: the largest finite eta = f_F / f_R (NaN -> 0; see perturb.h), 0 if none.
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "perturb.h"

namespace mnemo_fast {
namespace cpu {
namespace {

template <typename S>
S max_finite_eta(const S* f, const S* r, int64_t numel) {
  return at::parallel_reduce(
      0, numel, kChunk * 32, S(0),
      [&](int64_t begin, int64_t end, S best) {
#ifdef MNEMO_FAST_AVX2
        if constexpr (std::is_same_v<S, float>) {
          if (has_avx2()) return max_finite_eta_avx2(f + begin, r + begin, end - begin, best);
        }
#endif
        S eta[kChunk];
        for (int64_t c = begin; c < end; c += kChunk) {
          const int64_t n = std::min(kChunk, end - c);
          eta_chunk(f + c, r + c, eta, n);
          for (int64_t i = 0; i < n; ++i) {
            best = eta[i] < std::numeric_limits<S>::infinity() ? std::max(best, eta[i]) : best;
          }
        }
        return best;
      },
      [](S a, S b) { return std::max(a, b); });
}

at::Tensor perturb_max_ratio(at::TensorList forget, at::TensorList remain) {
  check_fishers("perturb_max_ratio", forget, remain);
  const auto dtype = check_max_ratio_dtypes(forget);
  auto options = at::TensorOptions().dtype(dtype).device(at::kCPU);
  at::Tensor result = at::empty({static_cast<int64_t>(forget.size())}, options);
  AT_DISPATCH_FLOATING_TYPES(dtype, "perturb_max_ratio", [&] {
    scalar_t* out = result.data_ptr<scalar_t>();
    for (size_t l = 0; l < forget.size(); ++l) {
      auto [f, r] = fisher_pair(forget[l], remain[l]);
      out[l] = max_finite_eta(f.const_data_ptr<scalar_t>(), r.const_data_ptr<scalar_t>(), f.numel());
    }
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(mnemo_fast, CPU, m) {
  m.impl("perturb_max_ratio", &perturb_max_ratio);
}

}  // namespace cpu
}  // namespace mnemo_fast
