// CUDA sum_sq_grad_conv2d: D[out, in/groups, kh, kw] = sum_n G_n**2 with G_n the weight gradient
// of sample n alone.
//
// A convolution's weight gradient is a Linear one over the unfolded input: with L = Ho*Wo
// positions, G_n[gi] = g_n[gi] (out_g x L) times cols_n[gi]^T (L x in_g*kh*kw). So each block of
// samples is unfolded with at::im2col and fed to the fused tiled kernel of sum_sq_tile.cuh (one
// launch covers all groups through grid.y), reading grad_output and the columns in place through
// strides, position-contiguous. Samples go in blocks so the im2col workspace stays bounded; each
// block's launch accumulates into the same D.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/im2col.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <type_traits>

#include "../checks.h"
#include "sum_sq_tile.cuh"

namespace mnemo_fast::cuda {
namespace {

// Bytes of im2col columns materialised at once.
constexpr int64_t kColsWorkspaceBytes = int64_t(256) << 20;

at::Tensor sum_sq_grad_conv2d_cuda(const at::Tensor& grad_output, const at::Tensor& input,
                                   at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation,
                                   int64_t groups) {
  const auto out_size =
      check_conv2d(grad_output, input, kernel_size, stride, padding, dilation, groups);
  TORCH_CHECK(input.is_cuda(), "sum_sq_grad_conv2d: expected CUDA tensors, got ", input.device());
  const int64_t N = input.size(0), in_channels = input.size(1);
  const int64_t out_channels = grad_output.size(1);

  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t kk = kernel_size[0] * kernel_size[1];
  const int64_t L = out_size[0] * out_size[1];
  const int64_t out_g = out_channels / groups, in_g = in_channels / groups;
  const auto acc_dtype = accumulate_dtype(input.scalar_type());
  const auto acc_options = input.options().dtype(acc_dtype);
  if (N == 0 || L == 0 || out_channels == 0 || in_channels == 0) {
    return at::zeros({out_channels, in_g, kernel_size[0], kernel_size[1]}, acc_options);
  }

  // A view when grad_output's spatial dims flatten (contiguous and channels_last both do).
  const at::Tensor g = grad_output.reshape({N, out_channels, L});
  const int64_t col_rows = in_channels * kk;
  const int64_t sample_bytes = col_rows * L * static_cast<int64_t>(input.element_size());
  const int64_t block = std::clamp<int64_t>(kColsWorkspaceBytes / sample_bytes, 1, N);

  at::Tensor result;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, input.scalar_type(), "sum_sq_grad_conv2d_cuda", [&] {
        using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        SumSqParams<scalar_t, acc_t> p{};
        p.positions = L;
        p.rows = out_g;
        p.cols = in_g * kk;
        p.groups = groups;
        const int64_t tiles = ((p.rows + kTileM - 1) / kTileM) * ((p.cols + kTileK - 1) / kTileK);
        p.splits = choose_sum_sq_splits(block, tiles * groups, out_channels * p.cols);
        at::Tensor partial = at::empty({p.splits, out_channels, p.cols}, acc_options);
        p.out = partial.mutable_data_ptr<acc_t>();

        for (int64_t n0 = 0; n0 < N; n0 += block) {
          const int64_t nb = std::min(block, N - n0);
          // [nb, in*kh*kw, L]; rows ordered (channel, ki, kj), so group gi's rows are contiguous.
          const at::Tensor cols =
              at::im2col(input.narrow(0, n0, nb), kernel_size, dilation, padding, stride)
                  .contiguous();
          const at::Tensor g_block = g.narrow(0, n0, nb);
          p.g = {g_block.const_data_ptr<scalar_t>(), g_block.stride(0), g_block.stride(2),
                 g_block.stride(1), out_g * g_block.stride(1)};
          p.x = {cols.const_data_ptr<scalar_t>(), cols.stride(0), cols.stride(2), cols.stride(1),
                 p.cols * cols.stride(1)};
          p.num_samples = nb;
          p.accumulate = n0 > 0;
          launch_sum_sq_tiled(p);
        }
        result = p.splits == 1 ? partial.squeeze(0) : partial.sum(0);
      });
  return result.view({out_channels, in_g, kernel_size[0], kernel_size[1]});
}

}  // namespace

TORCH_LIBRARY_IMPL(mnemo_fast, CUDA, m) {
  m.impl("sum_sq_grad_conv2d", &sum_sq_grad_conv2d_cuda);
}

}  // namespace mnemo_fast::cuda
