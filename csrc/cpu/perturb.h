// Shared pieces of the perturb_* CPU kernels: eta = f_F / f_R (argument checks: ../checks.h).
//
// The reference (mnemo_fast.reference.kernels) follows the authors' formula literally,
// eta = exp(log f_F - log f_R); here eta is the division itself, which is the same function
// (0/0 -> NaN -> 0, x/0 -> +inf, 0/x -> 0, NaN or negative inputs -> 0 as log would make
// them) with one rounding instead of three transcendentals: exact to 0.5 ulp, where the log
// form loses ~|log f| ulps to cancellation. The kernel is bandwidth-bound instead of
// compute-bound (benchmarks/RESULTS.md, noise pass); tests/test_ops_cpu.py holds it to the
// reference within the reference's own error.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../checks.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MNEMO_FAST_AVX2 1
#endif

namespace mnemo_fast {
namespace cpu {

// Elements per chunk: a chunk's eta lives in a stack buffer that stays in L1.
constexpr int64_t kChunk = 1024;

// eta of one element: 0 unless both Fisher values are >= 0 (NaN compares false); -0 counts
// as +0 (x + 0 = +0 for x = -0), so x / -0 is +inf like log's -inf would make it.
template <typename S>
inline S eta_scalar(S f, S r) {
  if (!(f >= S(0)) || !(r >= S(0))) return S(0);
  const S e = (f + S(0)) / (r + S(0));
  return std::isnan(e) ? S(0) : e;
}

#ifdef MNEMO_FAST_AVX2
// Eight etas with the rules of eta_scalar.
__attribute__((target("avx2"))) inline __m256 eta8(__m256 vf, __m256 vr) {
  const __m256 zero = _mm256_setzero_ps();
  const __m256 valid = _mm256_and_ps(_mm256_cmp_ps(vf, zero, _CMP_GE_OQ), _mm256_cmp_ps(vr, zero, _CMP_GE_OQ));
  const __m256 e = _mm256_div_ps(_mm256_add_ps(vf, zero), _mm256_add_ps(vr, zero));
  return _mm256_and_ps(e, _mm256_and_ps(valid, _mm256_cmp_ps(e, e, _CMP_ORD_Q)));
}

__attribute__((target("avx2"))) inline void eta_avx2(const float* f, const float* r, float* out,
                                                     int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, eta8(_mm256_loadu_ps(f + i), _mm256_loadu_ps(r + i)));
  for (; i < n; ++i) out[i] = eta_scalar(f[i], r[i]);
}

// max(best, largest finite eta of f[0:n] / r[0:n]): one read of each, no eta buffer.
__attribute__((target("avx2"))) inline float max_finite_eta_avx2(const float* f, const float* r,
                                                                 int64_t n, float best) {
  const __m256 inf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  __m256 vbest = _mm256_set1_ps(best);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = eta8(_mm256_loadu_ps(f + i), _mm256_loadu_ps(r + i));
    vbest = _mm256_max_ps(vbest, _mm256_and_ps(e, _mm256_cmp_ps(e, inf, _CMP_LT_OQ)));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vbest);
  for (float v : lanes) best = std::max(best, v);
  for (; i < n; ++i) {
    const float e = eta_scalar(f[i], r[i]);
    best = e < std::numeric_limits<float>::infinity() ? std::max(best, e) : best;
  }
  return best;
}

// p[i] += sign * (alpha * (eta_i == inf ? max_ratio : eta_i)) for float32 p and Fisher, in the
// scalar loop's order of operations (no FMA: the same roundings as the reference).
__attribute__((target("avx2"))) inline void shift_avx2(float* p, const float* f, const float* r,
                                                       int64_t n, float max_ratio, float alpha,
                                                       float sign) {
  const __m256 inf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  const __m256 vmax = _mm256_set1_ps(max_ratio), valpha = _mm256_set1_ps(alpha), vsign = _mm256_set1_ps(sign);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 e = eta8(_mm256_loadu_ps(f + i), _mm256_loadu_ps(r + i));
    e = _mm256_blendv_ps(e, vmax, _mm256_cmp_ps(e, inf, _CMP_EQ_OQ));
    const __m256 step = _mm256_mul_ps(vsign, _mm256_mul_ps(valpha, e));
    _mm256_storeu_ps(p + i, _mm256_add_ps(_mm256_loadu_ps(p + i), step));
  }
  for (; i < n; ++i) {
    const float e0 = eta_scalar(f[i], r[i]);
    const float e = std::isinf(e0) ? max_ratio : e0;
    p[i] = p[i] + sign * (alpha * e);
  }
}

// p[i] *= (eta_i > threshold ? min(lam / eta_i, 1) : 1) for float32 p and Fisher: every element
// multiplied (by exactly 1 where not dampened, which leaves it bit for bit), no branch per element;
// the same product as the scalar loop.
__attribute__((target("avx2"))) inline void dampen_avx2(float* p, const float* f, const float* r,
                                                        int64_t n, float threshold, float lam) {
  const __m256 one = _mm256_set1_ps(1.0f), vthreshold = _mm256_set1_ps(threshold), vlam = _mm256_set1_ps(lam);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = eta8(_mm256_loadu_ps(f + i), _mm256_loadu_ps(r + i));
    const __m256 factor = _mm256_min_ps(_mm256_div_ps(vlam, e), one);  // min(x, 1): 1 where x is NaN
    const __m256 use = _mm256_blendv_ps(one, factor, _mm256_cmp_ps(e, vthreshold, _CMP_GT_OQ));
    _mm256_storeu_ps(p + i, _mm256_mul_ps(_mm256_loadu_ps(p + i), use));
  }
  for (; i < n; ++i) {
    const float e = eta_scalar(f[i], r[i]);
    if (e > threshold) p[i] = p[i] * std::min(lam / e, 1.0f);
  }
}

__attribute__((target("avx2"))) inline void eta_avx2(const double* f, const double* r, double* out,
                                                     int64_t n) {
  const __m256d zero = _mm256_setzero_pd();
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const __m256d vf = _mm256_loadu_pd(f + i), vr = _mm256_loadu_pd(r + i);
    const __m256d valid = _mm256_and_pd(_mm256_cmp_pd(vf, zero, _CMP_GE_OQ), _mm256_cmp_pd(vr, zero, _CMP_GE_OQ));
    const __m256d e = _mm256_div_pd(_mm256_add_pd(vf, zero), _mm256_add_pd(vr, zero));
    const __m256d keep = _mm256_and_pd(valid, _mm256_cmp_pd(e, e, _CMP_ORD_Q));
    _mm256_storeu_pd(out + i, _mm256_and_pd(e, keep));
  }
  for (; i < n; ++i) out[i] = eta_scalar(f[i], r[i]);
}

inline bool has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2");
  return ok;
}
#endif

// out[i] = f[i] / r[i] with the rules above (NaN -> 0, +inf kept), i < n <= kChunk.
template <typename S>
inline void eta_chunk(const S* f, const S* r, S* out, int64_t n) {
#ifdef MNEMO_FAST_AVX2
  if (has_avx2()) {
    eta_avx2(f, r, out, n);
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) out[i] = eta_scalar(f[i], r[i]);
}

// Calls fn(c, eta, n) in parallel over consecutive chunks [c, c + n) of f[0:numel] / r[0:numel],
// n <= kChunk, with eta[0:n] the chunk's etas (eta_chunk) in a stack buffer: the loop every
// perturb_* kernel runs.
template <typename S, typename Fn>
inline void for_each_eta_chunk(const S* f, const S* r, int64_t numel, Fn&& fn) {
  at::parallel_for(0, numel, kChunk * 32, [&](int64_t begin, int64_t end) {
    S eta[kChunk];
    for (int64_t c = begin; c < end; c += kChunk) {
      const int64_t n = std::min(kChunk, end - c);
      eta_chunk(f + c, r + c, eta, n);
      fn(c, static_cast<const S*>(eta), n);
    }
  });
}

// Fisher pair of tensor l as contiguous tensors of the compute dtype of `forget`
// (accumulate_dtype, checks.h).
inline std::pair<at::Tensor, at::Tensor> fisher_pair(const at::Tensor& forget,
                                                     const at::Tensor& remain) {
  const auto dtype = accumulate_dtype(forget.scalar_type());
  return {forget.to(dtype).contiguous(), remain.to(dtype).contiguous()};
}

// alpha_l = min(lambda1, lambda2 / max_ratio) computed as the reference does
// (reciprocal, then multiply, in the compute dtype); lambda1 when max_ratio is 0.
template <typename S>
inline S alpha_of(S max_ratio, double lambda1, double lambda2) {
  if (max_ratio == S(0)) return static_cast<S>(lambda1);
  const S a = (S(1) / max_ratio) * static_cast<S>(lambda2);
  return std::isnan(a) ? a : std::min(a, static_cast<S>(lambda1));
}

}  // namespace cpu
}  // namespace mnemo_fast
