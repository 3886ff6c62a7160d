// A decoded token's small per-row ops, shared by the model's CPU decode ops (qwen_model/cpu_decode_ops.cpp) and the
// fused decode step (qwen_model/cpu_decode_step.cpp), so both compute the same bits:
//   rms_norm_row: x * rsqrt(mean(x^2) + eps) * w for one float32 row;
//   rotate_head:  one head's rotary, t * cos + rotate_half(t) * sin (NeoX halves: channel j pairs with j + d / 2).
// The rotary is the arithmetic of kvcache.rotary.apply_rotary_pos_emb step by step (each product rounded, then the
// sum), so its output is bit-identical; products are not contracted into FMAs. The functions are compiled that way
// (and never inlined into callers compiled otherwise) in every file that includes this one.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__clang__)
#define QWEN_NO_CONTRACT __attribute__((noinline))
#define QWEN_NO_CONTRACT_BODY _Pragma("clang fp contract(off)")
#else
#define QWEN_NO_CONTRACT __attribute__((noinline, optimize("fp-contract=off")))
#define QWEN_NO_CONTRACT_BODY
#endif

namespace decode_ops {

// out[0:n] = row * rstd * w with rstd from float32 sums of squares in 16 lanes, as ATen's rms_norm orders the
// products.
QWEN_NO_CONTRACT inline void rms_norm_row(const float* row, const float* w, int64_t n, float eps, float* out) {
  QWEN_NO_CONTRACT_BODY
  float lanes[16] = {};
  int64_t k = 0;
  for (; k + 16 <= n; k += 16)
#pragma omp simd
    for (int l = 0; l < 16; ++l) lanes[l] += row[k + l] * row[k + l];
  float total = 0.f;
  for (int l = 0; l < 16; ++l) total += lanes[l];
  for (; k < n; ++k) total += row[k] * row[k];
  const float rstd = 1.f / std::sqrt(total / static_cast<float>(n) + eps);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] = row[j] * rstd * w[j];
}

// o[0:d] = x * c + rotate_half(x) * s for one head of d (even) channels.
QWEN_NO_CONTRACT inline void rotate_head(const float* x, const float* c, const float* s, int64_t d, float* o) {
  QWEN_NO_CONTRACT_BODY
  const int64_t half = d / 2;
  for (int64_t j = 0; j < half; ++j) {
    o[j] = x[j] * c[j] - x[j + half] * s[j];
    o[j + half] = x[j + half] * c[j + half] + x[j] * s[j + half];
  }
}

}  // namespace decode_ops
