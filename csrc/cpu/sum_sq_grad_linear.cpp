// D[o, i] = sum_n (g_n^T x_n)[o, i]**2 for a linear layer, without materialising [N, out, in].
#include <torch/library.h>

#include "sum_sq_grad.h"

namespace mnemo_fast {
namespace cpu {
namespace {

at::Tensor sum_sq_grad_linear(const at::Tensor& grad_output, const at::Tensor& input) {
  check_linear(grad_output, input);
  const auto acc = accumulate_dtype(input.scalar_type());
  const int64_t T = input.size(1);
  if (T == 1 || input.size(0) == 0) {
    // One GEMM on squared operands: sum_n g_n[o]^2 x_n[i]^2.
    // T == 1: select, not sum (a sum over one position is a zero-fill plus a copy).
    at::Tensor g2 = T == 1 ? grad_output.select(1, 0).to(acc).square() : grad_output.sum(1, false, acc).square_();
    at::Tensor x2 = T == 1 ? input.select(1, 0).to(acc).square() : input.sum(1, false, acc).square_();
    return T == 1 ? at::mm(g2.t(), x2)
                  : at::zeros({grad_output.size(2), input.size(2)}, input.options().dtype(acc));
  }
  at::Tensor g = grad_output.to(acc);
  at::Tensor x = input.to(acc);
  at::Tensor d = at::zeros({g.size(2), x.size(2)}, x.options());
  accumulate_sum_sq(g.transpose(1, 2).unsqueeze(0), x.unsqueeze(0), d.unsqueeze(0));
  return d;
}

}  // namespace

TORCH_LIBRARY_IMPL(mnemo_fast, CPU, m) {
  m.impl("sum_sq_grad_linear", &sum_sq_grad_linear);
}

}  // namespace cpu
}  // namespace mnemo_fast
