// Per-token codes of the quantized KV cache (8-bit codes, or 4-bit codes two per byte with the even channel in the low
// nibble), shared by the KV-cache kernels (kvcache/cpu_cache_kernels.cpp) and the fused decode step
// (qwen_model/cpu_decode_step.cpp): a row's quantization, a query's product with a position's codes, a position's
// weighted codes added to a sum, and TokenRows, a token-layout layer as the one-pass attention (attend_blocks.h)
// reads it.
#pragma once
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace token_codes {

// Software prefetch of the codes PREFETCH_BYTES after the position being read. Each (row, block) unit streams its
// codes, but a position's conversions and FMAs fill the out-of-order window, so few loads are in flight without it.
// Measured on the 2-core Intel box (9 heads x 1024 positions, 60 layers' codes read in turn): int8 token layer
// 122 -> 81 us, 4-bit channel_groups 111 -> 98 us (1 KiB ahead: 87 / 96; 4 KiB: 81 / 94); in the model the int8
// cache's decode at 16k positions went from 1.40x to 1.76-1.81x the float cache's (benchmarks/RESULTS.md).
constexpr int64_t PREFETCH_BYTES = 2048;

inline void prefetch_ahead(const uint8_t* position, int64_t width) {
  for (int64_t line = 0; line < width; line += 64) __builtin_prefetch(position + PREFETCH_BYTES + line, 0, 3);
}

// q[0:D] . (codes - z) of one position: 8 bits, W = D codes; 4 bits, W = D / 2 bytes against q in split order. The
// zero point is subtracted from each code before the product (small exact integers or a fractional 4-bit zero), so
// no large q . codes and z * sum(q) cancel. W is a compile-time constant so the loop unrolls into whole vectors.
template <int64_t W, int64_t BITS>
inline float dot(const float* __restrict__ q, const uint8_t* __restrict__ c, float z) {
  static_assert(W % 16 == 0, "W must be a multiple of 16");
#if defined(__AVX512F__)
  const __m512 zv = _mm512_set1_ps(z);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t d0 = 0; d0 < W; d0 += 16) {
    const __m512i codes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + d0)));
    if constexpr (BITS == 8) {
      acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + d0), _mm512_sub_ps(_mm512_cvtepi32_ps(codes), zv), acc);
    } else {
      const __m512 low = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_and_si512(codes, _mm512_set1_epi32(0x0F))), zv);
      const __m512 high = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(codes, 4)), zv);
      acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + d0), low, acc);
      acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + W + d0), high, acc);
    }
  }
  return _mm512_reduce_add_ps(acc);
#else
  constexpr int64_t L = 16;  // lanes of partial sums, one or two float vectors
  float acc[L] = {};
  for (int64_t d0 = 0; d0 < W; d0 += L) {
    if constexpr (BITS == 8) {
#pragma omp simd
      for (int64_t j = 0; j < L; ++j) acc[j] += q[d0 + j] * (static_cast<float>(c[d0 + j]) - z);
    } else {
#pragma omp simd
      for (int64_t j = 0; j < L; ++j)
        acc[j] += q[d0 + j] * (static_cast<float>(c[d0 + j] & 0x0F) - z) +
                  q[W + d0 + j] * (static_cast<float>(c[d0 + j] >> 4) - z);
    }
  }
  float total = 0.f;
  for (int64_t j = 0; j < L; ++j) total += acc[j];
  return total;
#endif
}

// acc[0:D] += w * (codes - z) of one position (split order for 4 bits), W a compile-time constant as in `dot`.
template <int64_t W, int64_t BITS>
inline void axpy(float* __restrict__ acc, float w, const uint8_t* __restrict__ c, float z) {
#if defined(__AVX512F__)
  const __m512 wv = _mm512_set1_ps(w), zv = _mm512_set1_ps(z);
  for (int64_t d0 = 0; d0 < W; d0 += 16) {
    const __m512i codes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + d0)));
    if constexpr (BITS == 8) {
      const __m512 v = _mm512_sub_ps(_mm512_cvtepi32_ps(codes), zv);
      _mm512_storeu_ps(acc + d0, _mm512_fmadd_ps(wv, v, _mm512_loadu_ps(acc + d0)));
    } else {
      const __m512 low = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_and_si512(codes, _mm512_set1_epi32(0x0F))), zv);
      const __m512 high = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(codes, 4)), zv);
      _mm512_storeu_ps(acc + d0, _mm512_fmadd_ps(wv, low, _mm512_loadu_ps(acc + d0)));
      _mm512_storeu_ps(acc + W + d0, _mm512_fmadd_ps(wv, high, _mm512_loadu_ps(acc + W + d0)));
    }
  }
#else
  if constexpr (BITS == 8) {
#pragma omp simd
    for (int64_t d = 0; d < W; ++d) acc[d] += w * (static_cast<float>(c[d]) - z);
  } else {
#pragma omp simd
    for (int64_t d = 0; d < W; ++d) {
      acc[d] += w * (static_cast<float>(c[d] & 0x0F) - z);
      acc[W + d] += w * (static_cast<float>(c[d] >> 4) - z);
    }
  }
#endif
}

// Per-row asymmetric quantization of one float32 row of D values with round to nearest (even), the arithmetic of
// kvcache.quantize_cache._quantize_token for float32 step by step (so the codes, scales and zeros are bit-identical):
// 8 bits widen the range to contain 0 and round the zero point onto the grid; 4 bits keep the plain min/max grid
// with a fractional zero point and pack two codes per byte (even channel low). Constant rows store scale |c| (1 for
// zeros) and a zero point one below the codes for negative c. Returns whether the row was finite.
inline bool quantize_row(const float* row, int64_t D, int64_t bits, float qmin, float qmax, uint8_t* out, float* scale,
                  float* zero) {
  const float levels = qmax - qmin;
  bool finite = true;
  float fmin = row[0], fmax = row[0];
  for (int64_t d = 0; d < D; ++d) {
    finite = finite && std::isfinite(row[d]);
    fmin = std::min(fmin, row[d]);
    fmax = std::max(fmax, row[d]);
  }
  const float lo = bits == 8 ? std::min(fmin, 0.f) : fmin, hi = bits == 8 ? std::max(fmax, 0.f) : fmax;
  const bool constant = fmax == fmin;
  float s = (hi - lo) / levels;
  float z = qmin - lo / (constant ? 1.f : s);
  if (bits == 8) z = std::min(std::max(std::nearbyint(z), qmin), qmax);
  if (constant) {
    const float abs_c = std::fabs(fmax);
    s = abs_c > 0.f ? abs_c : 1.f;
    z = fmax < 0.f ? qmin + 1.f : qmin;
  }
  *scale = s;
  *zero = z;
  auto code = [&](float v) { return static_cast<uint8_t>(std::min(std::max(std::nearbyint(v / s + z), qmin), qmax)); };
  if (bits == 8) {
    for (int64_t d = 0; d < D; ++d) out[d] = code(row[d]);
  } else {
    for (int64_t j = 0; j < D / 2; ++j) out[j] = static_cast<uint8_t>(code(row[2 * j]) | (code(row[2 * j + 1]) << 4));
  }
  return finite;
}

// One side (keys or values) of a token-layout layer: codes [R, T, W], scales and zeros [R, T], each row its stride
// apart (views into a reserved buffer are read in place).
struct TokenSide {
  const uint8_t* codes;
  int64_t codes_stride;
  const float* scale;
  int64_t scale_stride;
  const float* zero;
  int64_t zero_stride;
};

// A token-layout layer's rows as SplitSoftmax reads them, q [R, Q, D] (split order for 4 bits): score(r, i, t) is
// s_k[t] q . (k_q[t] - z_k[t]) (the value codes of the position fetched into L2 meanwhile); weigh adds
// p s_v[t] (v_q[t] - z_v[t]) over a block's positions.
template <int64_t W, int64_t BITS>
struct TokenRows {
  const float* q;
  int64_t q_stride, D;
  TokenSide key, value;

  float score(int64_t r, int64_t i, int64_t t) const {
    const uint8_t* c = key.codes + r * key.codes_stride + t * W;
    prefetch_ahead(c, W);
    if (i == 0) __builtin_prefetch(value.codes + r * value.codes_stride + t * W, 0, 2);
    return key.scale[r * key.scale_stride + t] * dot<W, BITS>(q + r * q_stride + i * D, c,
                                                               key.zero[r * key.zero_stride + t]);
  }

  void weigh(float* acc, int64_t r, int64_t t0, int64_t t1, const float* p) const {
    std::fill(acc, acc + D, 0.f);
    for (int64_t t = t0; t < t1; ++t)
      axpy<W, BITS>(acc, p[t - t0] * value.scale[r * value.scale_stride + t],
                    value.codes + r * value.codes_stride + t * W, value.zero[r * value.zero_stride + t]);
  }
};

}  // namespace token_codes
