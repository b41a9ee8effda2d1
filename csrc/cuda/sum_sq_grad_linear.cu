// CUDA sum_sq_grad_linear: D[out, in] = sum_n (g_n^T x_n)**2 for g [N, T, out], x [N, T, in].
//
// T == 1: G_n is the outer product g_n x_n^T, so G_n**2 = (g_n**2)(x_n**2)^T and D is one GEMM of
// the squared operands, (g*g)^T (x*x), done by cuBLAS through at::mm in fp32 (fp64), TF32 off.
// T > 1: the fused tiled kernel of sum_sq_tile.cuh, which forms tiles of G_n on chip only.
// Both paths take any strides (no copies of g or x); the kernel is fastest when the feature
// dimension is the unit-stride one, which is the layout autograd produces.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <type_traits>

#include "../checks.h"
#include "sum_sq_tile.cuh"

namespace mnemo_fast::cuda {
namespace {

at::Tensor sum_sq_grad_linear_cuda(const at::Tensor& grad_output, const at::Tensor& input) {
  check_linear(grad_output, input);
  TORCH_CHECK(input.is_cuda(), "sum_sq_grad_linear: expected CUDA tensors, got ", input.device());

  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t N = input.size(0), T = input.size(1);
  const int64_t out_features = grad_output.size(2), in_features = input.size(2);
  const auto acc_dtype = accumulate_dtype(input.scalar_type());
  const auto acc_options = input.options().dtype(acc_dtype);

  if (N == 0 || T == 0 || out_features == 0 || in_features == 0) {
    return at::zeros({out_features, in_features}, acc_options);
  }
  if (T == 1) {
    // Square after the cast: squaring in bf16/fp16 would lose precision (or overflow in fp16).
    const at::Tensor g = grad_output.select(1, 0).to(acc_dtype);
    const at::Tensor x = input.select(1, 0).to(acc_dtype);
    // Full fp32 products whatever the user's TF32 setting (allow_tf32,
    // set_float32_matmul_precision): the T > 1 kernel never rounds its operands either.
    const at::NoTF32Guard no_tf32;
    return at::mm(g.square().t(), x.square());
  }

  at::Tensor result;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, input.scalar_type(), "sum_sq_grad_linear_cuda", [&] {
        using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        SumSqParams<scalar_t, acc_t> p{};
        p.g = {grad_output.const_data_ptr<scalar_t>(), grad_output.stride(0),
               grad_output.stride(1), grad_output.stride(2), 0};
        p.x = {input.const_data_ptr<scalar_t>(), input.stride(0), input.stride(1),
               input.stride(2), 0};
        p.num_samples = N;
        p.positions = T;
        p.rows = out_features;
        p.cols = in_features;
        p.groups = 1;
        const int64_t tiles =
            ((out_features + kTileM - 1) / kTileM) * ((in_features + kTileK - 1) / kTileK);
        p.splits = choose_sum_sq_splits(N, tiles, out_features * in_features);
        p.accumulate = false;
        at::Tensor partial = at::empty({p.splits, out_features, in_features}, acc_options);
        p.out = partial.mutable_data_ptr<acc_t>();
        launch_sum_sq_tiled(p);
        result = p.splits == 1 ? partial.squeeze(0) : partial.sum(0);
      });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(mnemo_fast, CUDA, m) {
  m.impl("sum_sq_grad_linear", &sum_sq_grad_linear_cuda);
}

}  // namespace mnemo_fast::cuda
