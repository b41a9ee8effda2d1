// params[l] *= (eta > threshold ? min(lam / eta, 1) : 1) in one pass per tensor (eta: NaN -> 0,
// +inf kept, so such an element becomes 0). The product is taken in the Fisher's compute dtype
// and rounded once to the parameter's dtype, as the reference (reference/perturb.py, dampen_).
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "perturb.h"

namespace mnemo_fast {
namespace cpu {
namespace {

template <typename S, typename P>
void dampen_tensor(P* p, const S* f, const S* r, int64_t numel, S threshold, S lam) {
#ifdef MNEMO_FAST_AVX2
  if constexpr (std::is_same_v<S, float> && std::is_same_v<P, float>) {
    if (has_avx2()) {  // the common case vectorised, without an eta buffer or a branch per element
      at::parallel_for(0, numel, kChunk * 32, [&](int64_t begin, int64_t end) {
        dampen_avx2(p + begin, f + begin, r + begin, end - begin, threshold, lam);
      });
      return;
    }
  }
#endif
  for_each_eta_chunk(f, r, numel, [&](int64_t c, const S* eta, int64_t n) {
    P* pc = p + c;
    for (int64_t i = 0; i < n; ++i) {
      if (!(eta[i] > threshold)) continue;  // most elements: read, not written
      const S factor = std::min(lam / eta[i], S(1));
      pc[i] = static_cast<P>(static_cast<S>(pc[i]) * factor);
    }
  });
}

void perturb_dampen_(at::TensorList params, at::TensorList forget, at::TensorList remain,
                     double threshold, double lam) {
  check_fishers("perturb_dampen_", forget, remain);
  check_param_list("perturb_dampen_", params, forget);
  for (size_t l = 0; l < params.size(); ++l) {
    auto [f, r] = fisher_pair(forget[l], remain[l]);
    AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "perturb_dampen_", [&] {
      using S = scalar_t;
      at::Tensor p = params[l];
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.scalar_type(), "perturb_dampen_", [&] {
        dampen_tensor<S, scalar_t>(p.data_ptr<scalar_t>(), f.const_data_ptr<S>(), r.const_data_ptr<S>(),
                                   p.numel(), static_cast<S>(threshold), static_cast<S>(lam));
      });
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(mnemo_fast, CPU, m) {
  m.impl("perturb_dampen_", &perturb_dampen_);
}

}  // namespace cpu
}  // namespace mnemo_fast
