// params[l] += sign * alpha_l * eta_l in one pass per tensor (eta: NaN -> 0, +inf -> max_ratio[l]).
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "perturb.h"

namespace mnemo_fast {
namespace cpu {
namespace {

template <typename S, typename P>
void shift_tensor(P* p, const S* f, const S* r, int64_t numel, S max_ratio, S alpha, S sign) {
  using opmath = at::opmath_type<P>;
#ifdef MNEMO_FAST_AVX2
  if constexpr (std::is_same_v<S, float> && std::is_same_v<P, float>) {
    if (has_avx2()) {  // the common case in one vectorised read-modify-write, no eta buffer
      at::parallel_for(0, numel, kChunk * 32, [&](int64_t begin, int64_t end) {
        shift_avx2(p + begin, f + begin, r + begin, end - begin, max_ratio, alpha, sign);
      });
      return;
    }
  }
#endif
  for_each_eta_chunk(f, r, numel, [&](int64_t c, const S* eta, int64_t n) {
    P* pc = p + c;
    for (int64_t i = 0; i < n; ++i) {
      const S e = std::isinf(eta[i]) ? max_ratio : eta[i];
      const P step = static_cast<P>(sign * (alpha * e));
      pc[i] = static_cast<P>(static_cast<opmath>(pc[i]) + static_cast<opmath>(step));
    }
  });
}

void perturb_shift_(at::TensorList params, at::TensorList forget, at::TensorList remain,
                    const at::Tensor& max_ratio, double lambda1, double lambda2, double sign) {
  check_fishers("perturb_shift_", forget, remain);
  check_params("perturb_shift_", params, forget, max_ratio);
  for (size_t l = 0; l < params.size(); ++l) {
    auto [f, r] = fisher_pair(forget[l], remain[l]);
    AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "perturb_shift_", [&] {
      using S = scalar_t;
      const S m = max_ratio[l].item().to<S>();
      const S alpha = alpha_of<S>(m, lambda1, lambda2);
      at::Tensor p = params[l];
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.scalar_type(), "perturb_shift_", [&] {
        shift_tensor<S, scalar_t>(p.data_ptr<scalar_t>(), f.const_data_ptr<S>(), r.const_data_ptr<S>(),
                                  p.numel(), m, alpha, static_cast<S>(sign));
      });
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(mnemo_fast, CPU, m) {
  m.impl("perturb_shift_", &perturb_shift_);
}

}  // namespace cpu
}  // namespace mnemo_fast
