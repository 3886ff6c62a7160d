// The GPTQ GEMV of this package's CPU kernels, shared by the GPTQ kernels (quantize/cpu_gptq_kernels.cpp) and the
// fused decode step (qwen_model/cpu_decode_step.cpp): a layer's packed codes (qweight int32 [words, N]: each word
// holds 32 / BITS consecutive input rows of one output column, lowest bits first) read as they are stored, float32
// sums per group with the scale and zero point applied once per group. Threads take contiguous blocks of words
// ("parts", word_parts), each into its own partial output, summed in part order by sum_parts.
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace gptq_gemv {

inline void check(const at::Tensor& t, at::ScalarType dtype, int64_t dim, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.dim() == dim && t.is_contiguous(), name,
              " must be a contiguous CPU ", c10::toString(dtype), " tensor of ", dim, " dimensions");
}

// Columns per tile, whose rows x TILE partial sums stay in L1/L2 while a group's words stream by. Measured on the
// 2-core box (4096 -> 12288, one row): 512 beats 2048 and whole rows of words (1.30 / 1.30 / 1.31 ms warm, 1.65 /
// 2.16 / 1.91 ms with the words evicted).
constexpr int64_t TILE = 512;
// Software prefetch, this many row segments (one word's TILE columns, up to 2 KiB) ahead in the order the loops visit
// them: down a tile's words, then the next tile, then the next group. In a model the attention between layers evicts
// the weights, so they stream from memory, and the hardware prefetcher follows this 2-D walk poorly. Measured on the
// 2-core Intel box by benchmarks/block_linears_speed.py (SmolLM2's block layers, a layer's KV cache read between
// blocks): Int4 / Int8 8.04 / 11.93 ms a pass with a fixed 1024 words ahead in the same row (the previous scheme),
// 7.27 / 10.30 with 4 segments (the kernel calls alone with 2, 4, 8, 16 segments: Int4 5.74, 5.69, 5.22, 6.71 ms;
// Int8 7.83, 7.71, 8.06, 8.64); Qwen-7B-shaped layers 1.17x -> 1.29x (Int4) and 1.43x -> 1.60x (Int8) torch's
// int4pack in the same run.
constexpr int64_t PREFETCH = 4;

// The row segment PREFETCH steps after (group g, tile c0, word) in gemv_words' visit order over words [w0, w1): down
// the tile's words, then the next tile, then the next group holding some of those words. (offset in words, width);
// width 0 past the end.
inline std::pair<int64_t, int64_t> segment_ahead(int64_t g, int64_t c0, int64_t word, const int64_t* group_words,
                                                 int64_t n_groups, int64_t n_total, int64_t w0, int64_t w1) {
  for (int64_t step = 0; step < PREFETCH; ++step) {
    if (++word < std::min(w1, group_words[g + 1])) continue;
    c0 += TILE;
    if (c0 >= n_total) {
      c0 = 0;
      do ++g;
      while (g < n_groups && std::max(w0, group_words[g]) >= std::min(w1, group_words[g + 1]));
      if (g >= n_groups) return {0, 0};
    }
    word = std::max(w0, group_words[g]);
  }
  return {word * n_total + c0, std::min(TILE, n_total - c0)};
}

// One thread's words [w0, w1) (a contiguous block of memory, so the hardware prefetcher streams it) for all rows of
// x, adding into y [rows, N]. Within each group, column tiles of TILE: acc holds rows x TILE sums x . codes, the
// codes of a word converted once and applied to every row; at the end of the group's words y takes
// s * (acc - z * sum(x over those words' inputs)): the zero point is applied once per group, not once per code.
template <int BITS>
void gemv_words(const float* __restrict__ x, int64_t rows, int64_t x_stride, const uint32_t* __restrict__ words,
                int64_t n_total, const at::Half* scales, const at::Half* zeros, const int64_t* group_words,
                int64_t n_groups, float* __restrict__ y, int64_t w0, int64_t w1) {
  constexpr int VALUES = 32 / BITS;
  constexpr uint32_t MASK = (1u << BITS) - 1;
  std::vector<float> acc_store(rows * TILE), x_sums(rows);
  float* __restrict__ acc = acc_store.data();
#if defined(__AVX512F__)
  alignas(64) float table_values[16];
  for (int i = 0; i < 16; ++i) table_values[i] = static_cast<float>(i & MASK);
  const __m512 table = _mm512_load_ps(table_values);  // code -> float by permute: the low 4 bits index it
  // 8 bits: byte j of each dword moved to its low byte and the others zeroed by one vpshufb, instead of a shift and
  // a mask (both on the port the conversions and shifts compete for): benchmarks/block_linears_speed.py, Int8, on
  // the 2-core Intel box 9.48 / 9.54 -> 9.15 / 9.06 ms a pass; 7B-shaped layers 3.25-3.39x -> 3.70x F.linear.
#if defined(__AVX512BW__)
  auto byte_pick = [](int j) {  // per 16-byte lane: dword i takes byte 4 i + j, its other bytes zero (index 0x80)
    const int zeroed = static_cast<int>(0x80808000u);
    return _mm512_setr4_epi32(zeroed | j, zeroed | (4 + j), zeroed | (8 + j), zeroed | (12 + j));
  };
#endif
#endif
  for (int64_t g = 0; g < n_groups; ++g) {
    const int64_t first = std::max(w0, group_words[g]), last = std::min(w1, group_words[g + 1]);
    if (first >= last) continue;
    for (int64_t m = 0; m < rows; ++m) {
      float total = 0.f;
      for (int64_t k = first * VALUES; k < last * VALUES; ++k) total += x[m * x_stride + k];
      x_sums[m] = total;
    }
    for (int64_t c0 = 0; c0 < n_total; c0 += TILE) {
      const int64_t width = std::min(TILE, n_total - c0);
      std::fill(acc, acc + rows * TILE, 0.f);
      for (int64_t word = first; word < last; ++word) {
        const uint32_t* __restrict__ w = words + word * n_total + c0;
        const float* xk = x + word * VALUES;
        const auto [next_offset, next_width] =
            segment_ahead(g, c0, word, group_words, n_groups, n_total, w0, w1);
        const uint32_t* next = words + next_offset;
#if defined(__AVX512F__)
        for (int64_t c = 0; c < width; c += 16) {
          const __mmask16 live = width - c >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (width - c)) - 1);
          const __m512i packed = _mm512_maskz_loadu_epi32(live, w + c);
          if (c < next_width) _mm_prefetch(reinterpret_cast<const char*>(next + c), _MM_HINT_T0);
          __m512 q[VALUES];
          for (int j = 0; j < VALUES; ++j) {
            const __m512i shifted = _mm512_srli_epi32(packed, j * BITS);
            if (BITS <= 4) q[j] = _mm512_permutexvar_ps(shifted, table);
            else if (j == VALUES - 1) q[j] = _mm512_cvtepi32_ps(shifted);  // the top byte: nothing left to mask
#if defined(__AVX512BW__)
            else q[j] = _mm512_cvtepi32_ps(_mm512_shuffle_epi8(packed, byte_pick(j)));
#else
            else q[j] = _mm512_cvtepi32_ps(_mm512_and_si512(shifted, _mm512_set1_epi32(MASK)));
#endif
          }
          for (int64_t m = 0; m < rows; ++m) {
            float* a = acc + m * TILE + c;
            __m512 even = _mm512_loadu_ps(a), odd = _mm512_setzero_ps();
            for (int j = 0; j < VALUES; j += 2) {
              even = _mm512_fmadd_ps(_mm512_set1_ps(xk[m * x_stride + j]), q[j], even);
              odd = _mm512_fmadd_ps(_mm512_set1_ps(xk[m * x_stride + j + 1]), q[j + 1], odd);
            }
            _mm512_storeu_ps(a, _mm512_add_ps(even, odd));
          }
        }
#else
        for (int j = 0; j < VALUES; ++j) {
          for (int64_t m = 0; m < rows; ++m) {
            const float xv = xk[m * x_stride + j];
            float* __restrict__ a = acc + m * TILE;
#pragma omp simd
            for (int64_t c = 0; c < width; ++c) a[c] += xv * static_cast<float>((w[c] >> (j * BITS)) & MASK);
          }
        }
#endif
      }
      const at::Half* s = scales + g * n_total + c0;
      const at::Half* z = zeros + g * n_total + c0;
      for (int64_t m = 0; m < rows; ++m) {
        float* __restrict__ out = y + m * n_total + c0;
        const float* __restrict__ a = acc + m * TILE;
        const float x_sum = x_sums[m];
        int64_t c = 0;
#if defined(__AVX512F__)
        for (; c + 16 <= width; c += 16) {  // float16 scales/zeros converted 16 at a time (the scalar cast is slow)
          const __m512 sv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + c)));
          const __m512 zv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(z + c)));
          const __m512 shifted = _mm512_fnmadd_ps(zv, _mm512_set1_ps(x_sum), _mm512_loadu_ps(a + c));
          _mm512_storeu_ps(out + c, _mm512_fmadd_ps(sv, shifted, _mm512_loadu_ps(out + c)));
        }
#endif
        for (; c < width; ++c) out[c] += static_cast<float>(s[c]) * (a[c] - static_cast<float>(z[c]) * x_sum);
      }
    }
  }
}

// A layer as gemv takes it: packed words, float16 scales and zero points, the groups' word offsets, optional bias.
struct Layer {
  at::Tensor words, scales, zeros, group_words;
  c10::optional<at::Tensor> bias;
};

// Threads split a layer's words into this many contiguous blocks (at least 16 words each).
inline int64_t word_parts(const Layer& layer) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), layer.words.size(0) / 16));
}

// Block `part` of `parts` of the words for x [rows, K] (rows x_stride apart) into its own zeroed partial output
// out [rows, N].
template <int BITS>
void gemv_part(const float* x, int64_t rows, int64_t x_stride, const Layer& layer, float* out, int64_t part,
               int64_t parts) {
  const int64_t n_words = layer.words.size(0), n_total = layer.words.size(1);
  std::fill(out, out + rows * n_total, 0.f);
  gemv_words<BITS>(x, rows, x_stride, reinterpret_cast<const uint32_t*>(layer.words.data_ptr<int32_t>()), n_total,
                   layer.scales.data_ptr<at::Half>(), layer.zeros.data_ptr<at::Half>(),
                   layer.group_words.data_ptr<int64_t>(), layer.scales.size(0), out, n_words * part / parts,
                   n_words * (part + 1) / parts);
}

// Sums parts [parts, rows, N] (float32, the part blocks `size` = rows x N apart) into out [rows, N], part by part in
// order, then adds the bias (float32 [N], or null): the same single rounding as adding the bias to the finished
// product. out may be the first part itself.
inline void sum_parts(const float* partial, int64_t parts, int64_t rows, int64_t n_total, const float* bias,
                      float* out) {
  const int64_t size = rows * n_total;
  if (out != partial) std::copy(partial, partial + size, out);
  for (int64_t part = 1; part < parts; ++part) {  // a few thousand floats: no second parallel region
#pragma omp simd
    for (int64_t i = 0; i < size; ++i) out[i] += partial[part * size + i];
  }
  if (bias != nullptr) {
    for (int64_t m = 0; m < rows; ++m) {
#pragma omp simd
      for (int64_t n = 0; n < n_total; ++n) out[m * n_total + n] += bias[n];
    }
  }
}

inline const float* bias_data(const c10::optional<at::Tensor>& bias) {
  return bias.has_value() && bias->defined() ? bias->data_ptr<float>() : nullptr;
}

inline void check_layer(const at::Tensor& words, const at::Tensor& scales, const at::Tensor& zeros,
                 const at::Tensor& group_words, int64_t bits) {
  TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, "bits must be 2, 4 or 8, got ", bits);
  check(words, at::kInt, 2, "words");
  check(scales, at::kHalf, 2, "scales");
  check(zeros, at::kHalf, 2, "zeros");
  check(group_words, at::kLong, 1, "group_words");
  TORCH_CHECK(scales.sizes() == zeros.sizes() && scales.size(1) == words.size(1),
              "scales and zeros must be [groups, N] with the N of words");
  TORCH_CHECK(group_words.size(0) == scales.size(0) + 1, "group_words must hold groups + 1 word offsets");
  const auto* gp = group_words.data_ptr<int64_t>();
  TORCH_CHECK(gp[0] == 0 && gp[scales.size(0)] == words.size(0), "the groups must tile the words");
  for (int64_t g = 0; g < scales.size(0); ++g)
    TORCH_CHECK(gp[g] <= gp[g + 1], "group_words must be non-decreasing");
}

inline Layer make_layer(const at::Tensor& words, const at::Tensor& scales, const at::Tensor& zeros,
                 const at::Tensor& group_words, int64_t bits, const c10::optional<at::Tensor>& bias) {
  check_layer(words, scales, zeros, group_words, bits);
  if (bias.has_value() && bias->defined()) {
    check(*bias, at::kFloat, 1, "bias");
    TORCH_CHECK(bias->size(0) == words.size(1), "bias must have one value per output");
  }
  return {words, scales, zeros, group_words, bias};
}

inline void check_input(const at::Tensor& x, const Layer& layer, int64_t bits) {
  check(x, at::kFloat, 2, "x");
  TORCH_CHECK(x.size(1) == layer.words.size(0) * (32 / bits), "x must have 32 / bits columns per word");
}

// A layer from Python: (words, scales, zeros, group_words, bias or None).
inline Layer layer_from(const py::tuple& t, int64_t bits) {
  TORCH_CHECK(t.size() == 5, "a layer is (words, scales, zeros, group_words, bias or None)");
  return make_layer(t[0].cast<at::Tensor>(), t[1].cast<at::Tensor>(), t[2].cast<at::Tensor>(),
                    t[3].cast<at::Tensor>(), bits, t[4].cast<c10::optional<at::Tensor>>());
}

}  // namespace gptq_gemv
