// params[l] += [eta > tau] * alpha_l * eta * z, z ~ N(0, 1) drawn like torch.randn(p.shape).
#include <torch/library.h>

#include <algorithm>

#include "perturb.h"

namespace mnemo_fast {
namespace cpu {
namespace {

template <typename S, typename P>
void gaussian_tensor(P* p, const P* z, const S* f, const S* r, int64_t numel, S max_ratio,
                     S alpha, S tau) {
  using opmath = at::opmath_type<P>;
  for_each_eta_chunk(f, r, numel, [&](int64_t c, const S* eta, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
      const S e = std::isinf(eta[i]) ? max_ratio : eta[i];
      if (!(e > tau)) continue;  // masked entries stay untouched
      const P step = static_cast<P>(alpha * e * static_cast<S>(z[c + i]));
      p[c + i] = static_cast<P>(static_cast<opmath>(p[c + i]) + static_cast<opmath>(step));
    }
  });
}

void perturb_gaussian_(at::TensorList params, at::TensorList forget, at::TensorList remain,
                       const at::Tensor& max_ratio, double lambda1, double lambda2, double tau,
                       std::optional<at::Generator> generator) {
  check_fishers("perturb_gaussian_", forget, remain);
  check_params("perturb_gaussian_", params, forget, max_ratio);
  for (size_t l = 0; l < params.size(); ++l) {
    at::Tensor p = params[l];
    // Drawn tensor by tensor, in list order, exactly as torch.randn(p.shape, ...) would.
    at::Tensor z = at::randn(p.sizes(), generator, p.options());
    auto [f, r] = fisher_pair(forget[l], remain[l]);
    AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "perturb_gaussian_", [&] {
      using S = scalar_t;
      const S m = max_ratio[l].item().to<S>();
      const S alpha = alpha_of<S>(m, lambda1, lambda2);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.scalar_type(), "perturb_gaussian_", [&] {
        gaussian_tensor<S, scalar_t>(p.data_ptr<scalar_t>(), z.const_data_ptr<scalar_t>(),
                                     f.const_data_ptr<S>(), r.const_data_ptr<S>(), p.numel(), m,
                                     alpha, static_cast<S>(tau));
      });
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(mnemo_fast, CPU, m) {
  m.impl("perturb_gaussian_", &perturb_gaussian_);
}

}  // namespace cpu
}  // namespace mnemo_fast
