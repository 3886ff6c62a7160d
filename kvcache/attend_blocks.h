// One-pass decode attention, shared by the KV-cache kernels (kvcache/cpu_cache_kernels.cpp: float and token-layout
// layers) and the fused decode step (qwen_model/cpu_decode_step.cpp): softmax(score * scale + mask) weighted values
// per (row, block of BLOCK positions) unit, the blocks of a row merged by flash decoding's split softmax.
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace one_pass {

// Threads take (row, block of BLOCK positions) units, so that a few rows (SmolLM2's 9 heads at batch 1 on 2 threads)
// still split evenly; fn(r, block, t0, t1) handles positions [t0, t1) of row r. Below SERIAL_POSITIONS rows x
// positions one thread does it all: waking the others costs more (9 heads x 16 positions: 9.4 us on 2 threads, 5.3 us
// on one).
constexpr int64_t BLOCK = 256;
constexpr int64_t SERIAL_POSITIONS = 2048;

inline int64_t num_blocks(int64_t T) { return std::max<int64_t>(1, (T + BLOCK - 1) / BLOCK); }

template <typename F>
void for_row_blocks(int64_t R, int64_t T, const F& fn) {
  const int64_t blocks = num_blocks(T), units = R * blocks;
  at::parallel_for(0, units, R * T < SERIAL_POSITIONS ? units : 1, [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t b = unit % blocks;
      fn(unit / blocks, b, b * BLOCK, std::min(T, (b + 1) * BLOCK));
    }
  });
}

#if defined(__AVX512F__)
// e^x for 16 floats: x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts), e^r by Cephes' expf polynomial (~1 ulp),
// 2^n by scalef, so inputs below ~-104 give 0. NaN stays NaN (max/min return their second operand when one is NaN).
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-104.f), _mm512_min_ps(_mm512_set1_ps(88.7f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}
#endif

// p[0:n] = e^(p - m) in place; returns their sum.
inline float exp_shifted(float* __restrict__ p, int64_t n, float m) {
  int64_t t = 0;
  float total = 0.f;
#if defined(__AVX512F__)
  const __m512 mv = _mm512_set1_ps(m);
  __m512 sum = _mm512_setzero_ps();
  for (; t < n; t += 16) {
    const __mmask16 live = n - t >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - t)) - 1);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, p + t), mv));
    _mm512_mask_storeu_ps(p + t, live, e);
    sum = _mm512_mask_add_ps(sum, live, sum, e);
  }
  total = _mm512_reduce_add_ps(sum);
#endif
  for (; t < n; ++t) total += p[t] = std::exp(p[t] - m);
  return total;
}

// One position's D floats into L2.
template <int64_t D>
inline void prefetch_float(const float* position) {
  for (int64_t d = 0; d < D; d += 16) __builtin_prefetch(position + d, 0, 2);
}

// The larger of a and b, NaN if either is: a NaN score makes its row NaN, as in softmax.
inline float max_nan(float a, float b) { return std::isnan(a) || a > b ? a : b; }

// softmax(score * scale + mask) weighted values in one pass over a layer: each (row, block of BLOCK positions) unit
// scores its positions (score(r, i, t): query row i's product with key t), exponentiates them against its own
// maximum m and sums both e^(s - m) (l) and e^(s - m) v (weigh(acc, r, t0, t1, p) writes sum_t p[t - t0] v_t into
// acc[0:D]); merge then combines the blocks of a row with weights e^(m_block - m_row), the split softmax of flash
// decoding. Keys and values are read together, with no scores tensor, softmax or sum op between them. The mask
// (optional, float32) is read through strides for [R / heads, heads, Q, T]. Units are independent, so any thread may
// run any of them; merge(r) needs all of row r's units done. The caller owns the buffers (units x Q x D, units x Q).
struct SplitSoftmax {
  int64_t R, Q, T, D, heads;
  const float* mask;
  int64_t mask_stride[4];
  float scale;
  float* partial;
  float* maxima;
  float* sums;

  int64_t blocks() const { return num_blocks(T); }

  template <typename Score, typename Weigh>
  void unit(int64_t r, int64_t b, const Score& score, const Weigh& weigh) const {
    const int64_t t0 = b * BLOCK, t1 = std::min(T, (b + 1) * BLOCK), n_blocks = blocks();
    float p[BLOCK];
    for (int64_t i = 0; i < Q; ++i) {
      const float* mi = mask ? mask + (r / heads) * mask_stride[0] + (r % heads) * mask_stride[1] +
                                   i * mask_stride[2]
                             : nullptr;
      float m = -INFINITY;
      for (int64_t t = t0; t < t1; ++t) {
        float s = score(r, i, t) * scale;
        if (mi) s += mi[t * mask_stride[3]];
        p[t - t0] = s;
        m = max_nan(s, m);
      }
      const int64_t u = (r * n_blocks + b) * Q + i;
      float* acc = partial + u * D;
      maxima[u] = m;
      if (m == -INFINITY) {  // every position masked out with -inf: nothing to add
        sums[u] = 0.f;
        std::fill(acc, acc + D, 0.f);
        continue;
      }
      sums[u] = exp_shifted(p, t1 - t0, m);
      weigh(acc, r, t0, t1, p);
    }
  }

  // Row r's output [Q, D] from its blocks' sums.
  void merge(int64_t r, float* out) const {
    const int64_t n_blocks = blocks();
    for (int64_t i = 0; i < Q; ++i) {
      float m = -INFINITY, total = 0.f;
      for (int64_t b = 0; b < n_blocks; ++b) m = max_nan(maxima[(r * n_blocks + b) * Q + i], m);
      float* o = out + i * D;
      std::fill(o, o + D, 0.f);
      for (int64_t b = 0; b < n_blocks; ++b) {
        const int64_t u = (r * n_blocks + b) * Q + i;
        const float w = std::exp(maxima[u] - m);  // NaN where the row is all -inf or NaN, as softmax gives
        if (w == 0.f) continue;
        total += w * sums[u];
        const float* acc = partial + u * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) o[d] += w * acc[d];
      }
      const float inv = 1.f / total;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) o[d] *= inv;
    }
  }
};

// SplitSoftmax over its own buffers, its units threaded by for_row_blocks, its rows merged in turn: [R, Q, D] float32.
template <typename Score, typename Weigh>
at::Tensor attend_blocks(int64_t R, int64_t Q, int64_t T, int64_t D, int64_t heads,
                         const c10::optional<at::Tensor>& mask, double scale, const Score& score, const Weigh& weigh) {
  const int64_t blocks = num_blocks(T);
  at::Tensor mask_t;  // read through its strides
  if (mask.has_value() && mask->defined()) mask_t = mask->to(at::kFloat).expand({R / heads, heads, Q, T});
  std::vector<float> partial(R * blocks * Q * D), maxima(R * blocks * Q), sums(R * blocks * Q);
  SplitSoftmax split{R, Q, T, D, heads, mask_t.defined() ? mask_t.data_ptr<float>() : nullptr, {0, 0, 0, 0},
                     static_cast<float>(scale), partial.data(), maxima.data(), sums.data()};
  if (mask_t.defined())
    for (int d = 0; d < 4; ++d) split.mask_stride[d] = mask_t.stride(d);
  for_row_blocks(R, T, [&](int64_t r, int64_t b, int64_t, int64_t) { split.unit(r, b, score, weigh); });
  auto out = at::empty({R, Q, D}, at::TensorOptions().dtype(at::kFloat));
  for (int64_t r = 0; r < R; ++r) split.merge(r, out.data_ptr<float>() + r * Q * D);
  return out;
}

template <int64_t D>
inline float dot_float(const float* __restrict__ q, const float* __restrict__ k) {
#if defined(__AVX512F__)
  __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(q), _mm512_loadu_ps(k));
  for (int64_t d = 16; d < D; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), _mm512_loadu_ps(k + d), acc);
  return _mm512_reduce_add_ps(acc);
#else
  float acc[16] = {};
  for (int64_t d0 = 0; d0 < D; d0 += 16) {
#pragma omp simd
    for (int64_t j = 0; j < 16; ++j) acc[j] += q[d0 + j] * k[d0 + j];
  }
  float total = 0.f;
  for (int64_t j = 0; j < 16; ++j) total += acc[j];
  return total;
#endif
}

// A float32 layer's rows as SplitSoftmax reads them: q [R, Q, D], k and v [R, T, D], each row its stride apart
// (views into a reserved buffer are read in place).
template <int64_t D>
struct FloatRows {
  const float* q;
  const float* k;
  const float* v;
  int64_t q_stride, k_stride, v_stride;

  float score(int64_t r, int64_t i, int64_t t) const {
    if (i == 0) prefetch_float<D>(v + r * v_stride + t * D);  // the values this block weights next
    return dot_float<D>(q + r * q_stride + i * D, k + r * k_stride + t * D);
  }

  void weigh(float* acc, int64_t r, int64_t t0, int64_t t1, const float* p) const {
#if defined(__AVX512F__)
    __m512 a[D / 16];
    for (int64_t j = 0; j < D / 16; ++j) a[j] = _mm512_setzero_ps();
    for (int64_t t = t0; t < t1; ++t) {
      const __m512 w = _mm512_set1_ps(p[t - t0]);
      const float* vt = v + r * v_stride + t * D;
      for (int64_t j = 0; j < D / 16; ++j) a[j] = _mm512_fmadd_ps(w, _mm512_loadu_ps(vt + 16 * j), a[j]);
    }
    for (int64_t j = 0; j < D / 16; ++j) _mm512_storeu_ps(acc + 16 * j, a[j]);
#else
    std::fill(acc, acc + D, 0.f);
    for (int64_t t = t0; t < t1; ++t) {
      const float w = p[t - t0];
      const float* vt = v + r * v_stride + t * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) acc[d] += w * vt[d];
    }
#endif
  }
};

}  // namespace one_pass
