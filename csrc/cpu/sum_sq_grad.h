// Shared core of the sum_sq_grad_* CPU kernels: D += sum_n (A_n @ B_n)**2 without ever
// holding the per-sample products A_n @ B_n of more than a cache-sized tile.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ops/bmm_cpu_dispatch.h>

#include <algorithm>
#include <vector>

#include "../checks.h"

namespace mnemo_fast {
namespace cpu {

// Square-accumulate `count` row-major [rows, cols] tiles of `ws` into D rows of stride `ld`.
template <typename S>
inline void square_accumulate(const S* ws, int64_t count, int64_t rows, int64_t cols,
                              S* d, int64_t ld) {
  for (int64_t s = 0; s < count; ++s) {
    for (int64_t r = 0; r < rows; ++r) {
      const S* w = ws + (s * rows + r) * cols;
      S* dr = d + r * ld;
      for (int64_t j = 0; j < cols; ++j) dr[j] += w[j] * w[j];
    }
  }
}

// a: [G, N, out, T], b: [G, N, T, in] (any strides), d: contiguous [G, out, in] of the
// same floating dtype. Adds sum_n (a[g, n] @ b[g, n])**2 to d[g].
//
// Work items are (sample split, group, out tile, in tile). Each item multiplies its tile
// for a few samples at a time (one bmm, workspace <= kWorkspace elements, kept in cache)
// and squares it into its D tile. Items of one split own disjoint D tiles; splits (used
// only when there are fewer tiles than threads) accumulate into private copies of D.
inline void accumulate_sum_sq(const at::Tensor& a, const at::Tensor& b, const at::Tensor& d) {
  constexpr int64_t kTileOut = 64;
  constexpr int64_t kTileIn = 256;
  constexpr int64_t kWorkspace = 1 << 16;
  const int64_t G = a.size(0), N = a.size(1), out = a.size(2), in = b.size(3);
  if (N == 0 || out == 0 || in == 0) return;
  const int64_t to = std::min(out, kTileOut), ti = std::min(in, kTileIn);
  const int64_t n_out = (out + to - 1) / to, n_in = (in + ti - 1) / ti;
  const int64_t tiles = G * n_out * n_in;
  const int64_t threads = at::get_num_threads();
  const int64_t splits = std::max<int64_t>(1, std::min(N, (threads + tiles - 1) / tiles));
  const int64_t per_split = (N + splits - 1) / splits;
  const int64_t bs = std::max<int64_t>(1, kWorkspace / (to * ti));

  at::Tensor partial = splits == 1 ? d.unsqueeze(0) : at::zeros({splits, G, out, in}, d.options());

  at::parallel_for(0, splits * tiles, 1, [&](int64_t begin, int64_t end) {
    at::Tensor ws = at::empty({bs, to, ti}, d.options());
    for (int64_t item = begin; item < end; ++item) {
      const int64_t split = item / tiles;
      int64_t rest = item % tiles;
      const int64_t g = rest / (n_out * n_in);
      rest %= n_out * n_in;
      const int64_t o0 = (rest / n_in) * to, i0 = (rest % n_in) * ti;
      const int64_t ro = std::min(to, out - o0), ri = std::min(ti, in - i0);
      const int64_t n_begin = split * per_split, n_end = std::min(N, n_begin + per_split);
      at::Tensor a_tile = a[g].narrow(1, o0, ro);
      at::Tensor b_tile = b[g].narrow(2, i0, ri);
      for (int64_t n0 = n_begin; n0 < n_end; n0 += bs) {
        const int64_t count = std::min(bs, n_end - n0);
        at::Tensor w = ws.narrow(0, 0, count).narrow(1, 0, ro).narrow(2, 0, ri);
        if (ro != to || ri != ti) w = at::empty({count, ro, ri}, d.options());
        at::cpu::bmm_out(w, a_tile.narrow(0, n0, count), b_tile.narrow(0, n0, count));
        AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "accumulate_sum_sq", [&] {
          scalar_t* dp = partial.data_ptr<scalar_t>() + ((split * G + g) * out + o0) * in + i0;
          square_accumulate<scalar_t>(w.data_ptr<scalar_t>(), count, ro, ri, dp, in);
        });
      }
    }
  });
  if (splits > 1) d.add_(partial.sum(0));
}

}  // namespace cpu
}  // namespace mnemo_fast
