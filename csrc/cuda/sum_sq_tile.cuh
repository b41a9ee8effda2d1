// Fused "sum of squared per-sample gradients" kernel shared by the Linear (T > 1) and Conv2d ops.
//
// For every sample n (and group gi):  D[gi] += (g_n[gi]^T x_n[gi])**2   (elementwise square)
// where g_n is [T, M] and x_n is [T, K]. The per-sample gradient G_n = g_n^T x_n is never written
// to global memory: each thread block owns a kTileM x kTileK tile of D, and for each of its
// samples builds the matching tile of G_n in registers (T streamed through shared memory in
// chunks of kTileT), squares it and adds it to a second register tile that holds D. D is written
// once per launch.
//
// Parallelism: grid.x = tiles of D, grid.y = groups, grid.z = "sample splits". A small layer has
// few tiles, so the samples are split over grid.z blocks that each write a partial D into their
// own slice of a [splits, groups*M, K] buffer; the caller sums the slices (deterministic, no
// float atomics). For large layers splits == 1 and the buffer is D itself.
//
// Operands are read through explicit strides (sample, position, feature, group) so that the
// Linear layout [N, T, F] and the Conv layouts ([N, C, L] grad_output, [N, C*kh*kw, L] im2col
// columns) are both consumed without a transposing copy. Which stride is unit decides how the
// threads walk a shared-memory tile load, to keep global loads coalesced in both layouts.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>

namespace mnemo_fast::cuda {

constexpr int kTileM = 64;  // rows of D (output features) per block
constexpr int kTileK = 64;  // columns of D (input features) per block
constexpr int kTileT = 16;  // positions staged in shared memory per step
constexpr int kThreadsX = 16;
constexpr int kThreadsY = 16;
constexpr int kThreads = kThreadsX * kThreadsY;
constexpr int kRowsPerThread = kTileM / kThreadsY;  // 4
constexpr int kColsPerThread = kTileK / kThreadsX;  // 4
static_assert(kTileM % kThreadsY == 0 && kTileK % kThreadsX == 0, "tile must split evenly");
static_assert((kTileT * kTileM) % kThreads == 0 && (kTileT * kTileK) % kThreads == 0,
              "shared tile loads must split evenly over the threads");

// One operand (g or x) of the per-sample product, addressed as op[n, t, c] in group gi.
template <typename scalar_t>
struct SumSqOperand {
  const scalar_t* data;
  int64_t stride_n;      // between samples
  int64_t stride_t;      // between positions (T)
  int64_t stride_c;      // between features (M or K)
  int64_t stride_group;  // between groups (offset of feature block gi)
};

template <typename scalar_t, typename acc_t>
struct SumSqParams {
  SumSqOperand<scalar_t> g;  // [N, T, M] per group
  SumSqOperand<scalar_t> x;  // [N, T, K] per group
  acc_t* out;                // [splits, groups * M, K], contiguous
  int64_t num_samples;       // N handled by this launch
  int64_t positions;         // T
  int64_t rows;              // M (per group)
  int64_t cols;              // K (per group)
  int64_t groups;
  int64_t splits;
  int64_t tiles_k;           // ceil(K / kTileK), to decode blockIdx.x
  bool accumulate;           // add to `out` (later sample blocks of a conv) instead of overwrite
};

// Stages op[n, t0:t0+kTileT, c0:c0+width] into tile[t][c] (converted to acc_t), zero-filling
// out-of-range positions and features so the FMA loop needs no bounds checks.
template <int width, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_tile(acc_t (*tile)[width + 1], const scalar_t* base,
                                          const SumSqOperand<scalar_t>& op, int64_t t0,
                                          int64_t c0, int64_t positions, int64_t features) {
  // Walk along the unit-stride dimension first so that neighbouring threads read neighbouring
  // addresses: features for [N, T, F] (Linear), positions for [N, F, L] (Conv).
  const bool t_fastest = op.stride_t == 1 && op.stride_c != 1;
  constexpr int kPerThread = kTileT * width / kThreads;
#pragma unroll
  for (int r = 0; r < kPerThread; ++r) {
    const int e = threadIdx.x + r * kThreads;
    const int t = t_fastest ? e % kTileT : e / width;
    const int c = t_fastest ? e / kTileT : e % width;
    const int64_t tt = t0 + t;
    const int64_t cc = c0 + c;
    acc_t v = acc_t(0);
    if (tt < positions && cc < features) {
      v = static_cast<acc_t>(base[tt * op.stride_t + cc * op.stride_c]);
    }
    tile[t][c] = v;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    sum_sq_tiled_kernel(const SumSqParams<scalar_t, acc_t> p) {
  // +1 column of padding: the position-fastest load pattern writes with a stride of one row.
  __shared__ acc_t g_tile[kTileT][kTileM + 1];
  __shared__ acc_t x_tile[kTileT][kTileK + 1];

  const int64_t tile_m = blockIdx.x / p.tiles_k;
  const int64_t tile_k = blockIdx.x % p.tiles_k;
  const int64_t m0 = tile_m * kTileM;
  const int64_t k0 = tile_k * kTileK;
  const int64_t group = blockIdx.y;
  const int64_t split = blockIdx.z;

  // Thread (ty, tx) owns rows ty + 16*i and columns tx + 16*j of the tile: consecutive threads
  // read consecutive shared-memory words (no bank conflicts) and write consecutive columns of D.
  const int tx = threadIdx.x % kThreadsX;
  const int ty = threadIdx.x / kThreadsX;

  const scalar_t* g_group = p.g.data + group * p.g.stride_group;
  const scalar_t* x_group = p.x.data + group * p.x.stride_group;

  acc_t d_acc[kRowsPerThread][kColsPerThread];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
    for (int j = 0; j < kColsPerThread; ++j) d_acc[i][j] = acc_t(0);

  for (int64_t n = split; n < p.num_samples; n += p.splits) {
    const scalar_t* g_n = g_group + n * p.g.stride_n;
    const scalar_t* x_n = x_group + n * p.x.stride_n;

    acc_t grad[kRowsPerThread][kColsPerThread];
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
      for (int j = 0; j < kColsPerThread; ++j) grad[i][j] = acc_t(0);

    for (int64_t t0 = 0; t0 < p.positions; t0 += kTileT) {
      load_tile<kTileM>(g_tile, g_n, p.g, t0, m0, p.positions, p.rows);
      load_tile<kTileK>(x_tile, x_n, p.x, t0, k0, p.positions, p.cols);
      __syncthreads();
      // Positions left in this tile: the same for the whole block (no barrier inside the loop),
      // so short sequences and small conv outputs skip the zero-filled rows.
      const int t_count = static_cast<int>(std::min<int64_t>(kTileT, p.positions - t0));
#pragma unroll
      for (int t = 0; t < kTileT; ++t) {
        if (t >= t_count) break;
        acc_t a[kRowsPerThread];
        acc_t b[kColsPerThread];
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i) a[i] = g_tile[t][ty + i * kThreadsY];
#pragma unroll
        for (int j = 0; j < kColsPerThread; ++j) b[j] = x_tile[t][tx + j * kThreadsX];
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
          for (int j = 0; j < kColsPerThread; ++j) grad[i][j] += a[i] * b[j];
      }
      // The next iteration overwrites the tiles other threads may still be reading.
      __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
      for (int j = 0; j < kColsPerThread; ++j) d_acc[i][j] += grad[i][j] * grad[i][j];
  }

  // Every block writes its whole tile even when it had no samples (splits > samples in the
  // last conv block), so a non-accumulating launch fully initialises `out`.
  acc_t* out = p.out + (split * p.groups + group) * p.rows * p.cols;
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int64_t m = m0 + ty + i * kThreadsY;
    if (m >= p.rows) continue;
#pragma unroll
    for (int j = 0; j < kColsPerThread; ++j) {
      const int64_t k = k0 + tx + j * kThreadsX;
      if (k >= p.cols) continue;
      acc_t* dst = out + m * p.cols + k;
      *dst = p.accumulate ? *dst + d_acc[i][j] : d_acc[i][j];
    }
  }
}

// Number of sample splits: enough blocks to fill the GPU (a few waves of kThreads-thread blocks),
// never more splits than samples, and a bounded partial buffer (it is O(|W|) * splits).
inline int64_t choose_sum_sq_splits(int64_t num_samples, int64_t blocks_per_split,
                                    int64_t out_numel) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t target_blocks = 4 * sms;
  int64_t splits = (target_blocks + blocks_per_split - 1) / blocks_per_split;
  constexpr int64_t kMaxSplits = 64;
  constexpr int64_t kMaxPartialElems = int64_t(1) << 26;  // 256 MiB of fp32 partials
  splits = std::min({splits, num_samples, kMaxSplits,
                     std::max<int64_t>(1, kMaxPartialElems / std::max<int64_t>(1, out_numel))});
  return std::max<int64_t>(splits, 1);
}

// Launches the kernel on the current stream; `p.splits` must already be chosen and `p.out`
// sized [splits, groups * rows, cols].
template <typename scalar_t, typename acc_t>
void launch_sum_sq_tiled(SumSqParams<scalar_t, acc_t> p) {
  if (p.rows == 0 || p.cols == 0 || p.groups == 0) return;
  const int64_t tiles_m = (p.rows + kTileM - 1) / kTileM;
  p.tiles_k = (p.cols + kTileK - 1) / kTileK;
  const int64_t tiles = tiles_m * p.tiles_k;
  TORCH_CHECK(tiles <= INT32_MAX, "sum_sq_grad: weight too large for one launch (", p.rows, "x",
              p.cols, ")");
  TORCH_CHECK(p.groups <= 65535 && p.splits <= 65535, "sum_sq_grad: too many groups (", p.groups,
              ")");
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(p.groups),
                  static_cast<unsigned>(p.splits));
  sum_sq_tiled_kernel<scalar_t, acc_t>
      <<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace mnemo_fast::cuda
