// D = sum_n (per-sample weight gradient of a conv2d)**2, by im2col over blocks of samples.
#include <torch/library.h>

#include "sum_sq_grad.h"

namespace mnemo_fast {
namespace cpu {
namespace {

at::Tensor sum_sq_grad_conv2d(const at::Tensor& grad_output, const at::Tensor& input,
                              at::IntArrayRef kernel_size, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  constexpr int64_t kColsBudget = 1 << 22;  // elements of im2col workspace per block of samples
  const auto expected =
      check_conv2d(grad_output, input, kernel_size, stride, padding, dilation, groups);
  const int64_t N = input.size(0), C = input.size(1), out = grad_output.size(1);
  const auto acc = accumulate_dtype(input.scalar_type());
  const int64_t in_g = C / groups, out_g = out / groups;
  const int64_t kk = kernel_size[0] * kernel_size[1];
  const int64_t L = expected[0] * expected[1];
  at::Tensor d = at::zeros({groups, out_g, in_g * kk}, input.options().dtype(acc));
  const int64_t block = std::max<int64_t>(1, std::min<int64_t>(N, kColsBudget / std::max<int64_t>(1, C * kk * L)));
  for (int64_t n0 = 0; n0 < N; n0 += block) {
    const int64_t b = std::min(block, N - n0);
    at::Tensor x = input.narrow(0, n0, b).to(acc);
    at::Tensor cols = at::im2col(x, kernel_size, dilation, padding, stride);  // [b, C*kk, L]
    at::Tensor g = grad_output.narrow(0, n0, b).to(acc).reshape({b, groups, out_g, L});
    accumulate_sum_sq(g.transpose(0, 1), cols.view({b, groups, in_g * kk, L}).permute({1, 0, 3, 2}), d);
  }
  return d.view({out, in_g, kernel_size[0], kernel_size[1]});
}

}  // namespace

TORCH_LIBRARY_IMPL(mnemo_fast, CPU, m) {
  m.impl("sum_sq_grad_conv2d", &sum_sq_grad_conv2d);
}

}  // namespace cpu
}  // namespace mnemo_fast
