// Shared pieces of the perturb_* CPU kernels: argument checks and eta = exp(log f - log r).
//
// eta is computed with the same SLEEF routines (exp/log, 1.0-ulp) that ATen's vectorised
// torch.exp / torch.log use on x86-64 with AVX2, so results match the reference
// (mnemo_fast.reference.perturb) bit for bit on all but the few elements ATen itself
// computes with scalar std::exp/std::log (loop tails); elsewhere std::exp/std::log are used.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MNEMO_FAST_SLEEF 1
extern "C" {
__m256 Sleef_logf8_u10(__m256);
__m256 Sleef_expf8_u10(__m256);
__m256d Sleef_logd4_u10(__m256d);
__m256d Sleef_expd4_u10(__m256d);
}
#endif

namespace mnemo_fast {
namespace cpu {

// Elements per chunk: a chunk's eta lives in a stack buffer that stays in L1.
constexpr int64_t kChunk = 1024;

#ifdef MNEMO_FAST_SLEEF
__attribute__((target("avx2,fma"))) inline void eta_avx2(const float* f, const float* r,
                                                          float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 lf = Sleef_logf8_u10(_mm256_loadu_ps(f + i));
    __m256 lr = Sleef_logf8_u10(_mm256_loadu_ps(r + i));
    _mm256_storeu_ps(out + i, Sleef_expf8_u10(_mm256_sub_ps(lf, lr)));
  }
  for (; i < n; ++i) out[i] = std::exp(std::log(f[i]) - std::log(r[i]));
}

__attribute__((target("avx2,fma"))) inline void eta_avx2(const double* f, const double* r,
                                                          double* out, int64_t n) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    __m256d lf = Sleef_logd4_u10(_mm256_loadu_pd(f + i));
    __m256d lr = Sleef_logd4_u10(_mm256_loadu_pd(r + i));
    _mm256_storeu_pd(out + i, Sleef_expd4_u10(_mm256_sub_pd(lf, lr)));
  }
  for (; i < n; ++i) out[i] = std::exp(std::log(f[i]) - std::log(r[i]));
}

inline bool has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#endif

// out[i] = exp(log f[i] - log r[i]) with NaN -> 0 (+inf kept), i < n <= kChunk.
template <typename S>
inline void eta_chunk(const S* f, const S* r, S* out, int64_t n) {
#ifdef MNEMO_FAST_SLEEF
  if (has_avx2()) {
    eta_avx2(f, r, out, n);
  } else
#endif
  {
    for (int64_t i = 0; i < n; ++i) out[i] = std::exp(std::log(f[i]) - std::log(r[i]));
  }
  for (int64_t i = 0; i < n; ++i) out[i] = std::isnan(out[i]) ? S(0) : out[i];
}

// float64 Fisher computes in float64, any other floating dtype in float32.
inline at::ScalarType compute_dtype(const at::Tensor& fisher) {
  return fisher.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Fisher pair of tensor l as contiguous tensors of the compute dtype of `forget`.
inline std::pair<at::Tensor, at::Tensor> fisher_pair(const at::Tensor& forget,
                                                     const at::Tensor& remain) {
  const auto dtype = compute_dtype(forget);
  return {forget.to(dtype).contiguous(), remain.to(dtype).contiguous()};
}

inline void check_fishers(const char* op, at::TensorList forget, at::TensorList remain) {
  TORCH_CHECK(forget.size() == remain.size(), op, ": forget and remain must have the same length, ",
              "got ", forget.size(), " and ", remain.size());
  for (size_t l = 0; l < forget.size(); ++l) {
    TORCH_CHECK(forget[l].sizes() == remain[l].sizes(), op, ": forget[", l, "] ", forget[l].sizes(),
                " and remain[", l, "] ", remain[l].sizes(), " must have the same shape");
    TORCH_CHECK(at::isFloatingType(forget[l].scalar_type()) &&
                    at::isFloatingType(remain[l].scalar_type()),
                op, ": forget[", l, "] and remain[", l, "] must be floating point");
    TORCH_CHECK(forget[l].device() == forget[0].device() && remain[l].device() == forget[0].device(),
                op, ": forget[", l, "] and remain[", l, "] must be on device ", forget[0].device());
  }
}

inline void check_params(const char* op, at::TensorList params, at::TensorList forget,
                         const at::Tensor& max_ratio) {
  TORCH_CHECK(params.size() == forget.size(), op, ": params and forget must have the same length, ",
              "got ", params.size(), " and ", forget.size());
  TORCH_CHECK(max_ratio.dim() == 1 && max_ratio.size(0) == static_cast<int64_t>(params.size()),
              op, ": max_ratio must have shape [", params.size(), "], got ", max_ratio.sizes());
  TORCH_CHECK(at::isFloatingType(max_ratio.scalar_type()), op, ": max_ratio must be floating point");
  for (size_t l = 0; l < params.size(); ++l) {
    TORCH_CHECK(params[l].sizes() == forget[l].sizes(), op, ": params[", l, "] ", params[l].sizes(),
                " and forget[", l, "] ", forget[l].sizes(), " must have the same shape");
    TORCH_CHECK(at::isFloatingType(params[l].scalar_type()), op, ": params[", l,
                "] must be floating point, got ", params[l].scalar_type());
    TORCH_CHECK(params[l].is_contiguous(), op, ": params[", l, "] must be contiguous (it is ",
                "updated in place)");
    TORCH_CHECK(params[l].device() == forget[l].device(), op, ": params[", l, "] and forget[", l,
                "] must be on the same device");
  }
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
