// D = sum_n (per-sample weight gradient of a conv2d)**2, by im2col over blocks of samples.
#include <torch/library.h>

#include "sum_sq_grad.h"

namespace mnemo_fast {
namespace cpu {
namespace {

void check_pair(at::IntArrayRef v, const char* name, int64_t min) {
  TORCH_CHECK(v.size() == 2, "sum_sq_grad_conv2d: ", name, " must have 2 elements, got ", v);
  TORCH_CHECK(v[0] >= min && v[1] >= min, "sum_sq_grad_conv2d: ", name, " must be >= ", min,
              ", got ", v);
}

at::Tensor sum_sq_grad_conv2d(const at::Tensor& grad_output, const at::Tensor& input,
                              at::IntArrayRef kernel_size, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  constexpr int64_t kColsBudget = 1 << 22;  // elements of im2col workspace per block of samples
  TORCH_CHECK(grad_output.dim() == 4, "sum_sq_grad_conv2d: grad_output must be [N, out, Ho, Wo], ",
              "got ", grad_output.sizes());
  TORCH_CHECK(input.dim() == 4, "sum_sq_grad_conv2d: input must be [N, in, H, W], got ",
              input.sizes());
  TORCH_CHECK(at::isFloatingType(input.scalar_type()),
              "sum_sq_grad_conv2d: input must be floating point, got ", input.scalar_type());
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(),
              "sum_sq_grad_conv2d: grad_output (", grad_output.scalar_type(), ") and input (",
              input.scalar_type(), ") must have the same dtype");
  TORCH_CHECK(grad_output.device() == input.device(),
              "sum_sq_grad_conv2d: grad_output and input must be on the same device");
  check_pair(kernel_size, "kernel_size", 1);
  check_pair(stride, "stride", 1);
  check_pair(padding, "padding", 0);
  check_pair(dilation, "dilation", 1);
  const int64_t N = input.size(0), C = input.size(1), out = grad_output.size(1);
  TORCH_CHECK(groups >= 1 && C % groups == 0 && out % groups == 0,
              "sum_sq_grad_conv2d: groups (", groups, ") must divide in (", C, ") and out (", out,
              ")");
  TORCH_CHECK(grad_output.size(0) == N, "sum_sq_grad_conv2d: grad_output and input must have the ",
              "same N, got ", grad_output.size(0), " and ", N);
  int64_t expected[2];
  for (int k = 0; k < 2; ++k) {
    expected[k] = (input.size(2 + k) + 2 * padding[k] - dilation[k] * (kernel_size[k] - 1) - 1) /
                      stride[k] + 1;
  }
  TORCH_CHECK(grad_output.size(2) == expected[0] && grad_output.size(3) == expected[1],
              "sum_sq_grad_conv2d: grad_output spatial size ", grad_output.sizes().slice(2),
              " does not match the output size [", expected[0], ", ", expected[1],
              "] of the convolution");
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
