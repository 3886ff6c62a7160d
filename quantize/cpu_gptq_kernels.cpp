// CPU kernels that read a GPTQ layer's packed codes as they are stored (qweight int32 [words, N]: each word holds
// 32 / BITS consecutive input rows of one output column, lowest bits first) and compute in float32:
//   gemv:       y[m, n] = sum_g s[g, n] * sum_{k in g} x[m, k] (q[k, n] - z[g, n]), for a few rows m (decode);
//   dequantize: W^T[k, n] = s[g, n] (q[k, n] - z[g, n]) in float32 or bfloat16, for a GEMM (prefill).
// Groups are runs of whole words (group_words[g] .. group_words[g + 1]); scales and true zero points are float16
// [G, N]. Codes convert in registers. dequantize computes s (q - z) exactly in float32 (an exact small integer times
// a float16), the reference's weight bit for bit; gemv sums x . q per group in float32 and applies s and z once per
// group, so both differ from the dequantize reference only by float32 rounding of sums. Threads (at::parallel_for)
// take contiguous blocks of words (gemv) or whole groups (dequantize). Built and loaded by quantize/cpu_gptq.py.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

void check(const at::Tensor& t, at::ScalarType dtype, int64_t dim, const char* name) {
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
int64_t word_parts(const Layer& layer) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), layer.words.size(0) / 16));
}

// Block `part` of `parts` of the words into its own zeroed partial output out [rows, N].
template <int BITS>
void gemv_part(const at::Tensor& x, const Layer& layer, float* out, int64_t part, int64_t parts) {
  const int64_t n_words = layer.words.size(0), n_total = layer.words.size(1);
  std::fill(out, out + x.size(0) * n_total, 0.f);
  gemv_words<BITS>(x.data_ptr<float>(), x.size(0), x.size(1),
                   reinterpret_cast<const uint32_t*>(layer.words.data_ptr<int32_t>()), n_total,
                   layer.scales.data_ptr<at::Half>(), layer.zeros.data_ptr<at::Half>(),
                   layer.group_words.data_ptr<int64_t>(), layer.scales.size(0), out, n_words * part / parts,
                   n_words * (part + 1) / parts);
}

// partial [parts, rows, N] -> its first block holds the sum of the parts plus the bias (float32 [N], optional): the
// same single rounding as adding the bias to the finished product.
at::Tensor finish_parts(at::Tensor partial, const c10::optional<at::Tensor>& bias) {
  const int64_t parts = partial.size(0), rows = partial.size(1), n_total = partial.size(2), size = rows * n_total;
  float* out = partial.data_ptr<float>();
  for (int64_t part = 1; part < parts; ++part) {  // a few thousand floats: no second parallel region
#pragma omp simd
    for (int64_t i = 0; i < size; ++i) out[i] += out[part * size + i];
  }
  if (bias.has_value() && bias->defined()) {
    const float* b = bias->data_ptr<float>();
    for (int64_t m = 0; m < rows; ++m) {
#pragma omp simd
      for (int64_t n = 0; n < n_total; ++n) out[m * n_total + n] += b[n];
    }
  }
  return partial[0];
}

template <int BITS>
at::Tensor gemv_bits(const at::Tensor& x, const Layer& layer) {
  const int64_t parts = word_parts(layer);
  const int64_t size = x.size(0) * layer.words.size(1);
  at::Tensor partial = at::empty({parts, x.size(0), layer.words.size(1)}, x.options());
  float* out = partial.data_ptr<float>();
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t part = begin; part < end; ++part) gemv_part<BITS>(x, layer, out + part * size, part, parts);
  });
  return finish_parts(partial, layer.bias);
}

// The SwiGLU MLP of a decoded token, c_proj(w1(x) * silu(w2(x))), in one call: w1 and w2 (the same input, so the
// same word blocks) in one parallel region, each thread its block of both; the gate by ATen's silu and mul (what the
// unfused layers run), then c_proj. Each product is gemv_bits' to the bit, so the result equals the three layers
// called one by one.
template <int BITS>
at::Tensor gated_mlp_bits(const at::Tensor& x, const Layer& up, const Layer& gate, const Layer& proj) {
  const int64_t parts = word_parts(up), rows = x.size(0), size = rows * up.words.size(1);
  at::Tensor up_partial = at::empty({parts, rows, up.words.size(1)}, x.options());
  at::Tensor gate_partial = at::empty_like(up_partial);
  float* up_out = up_partial.data_ptr<float>();
  float* gate_out = gate_partial.data_ptr<float>();
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t part = begin; part < end; ++part) {
      gemv_part<BITS>(x, up, up_out + part * size, part, parts);
      gemv_part<BITS>(x, gate, gate_out + part * size, part, parts);
    }
  });
  at::Tensor hidden = finish_parts(up_partial, up.bias).mul_(at::silu(finish_parts(gate_partial, gate.bias)));
  return gemv_bits<BITS>(hidden, proj);
}

void check_layer(const at::Tensor& words, const at::Tensor& scales, const at::Tensor& zeros,
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

Layer make_layer(const at::Tensor& words, const at::Tensor& scales, const at::Tensor& zeros,
                 const at::Tensor& group_words, int64_t bits, const c10::optional<at::Tensor>& bias) {
  check_layer(words, scales, zeros, group_words, bits);
  if (bias.has_value() && bias->defined()) {
    check(*bias, at::kFloat, 1, "bias");
    TORCH_CHECK(bias->size(0) == words.size(1), "bias must have one value per output");
  }
  return {words, scales, zeros, group_words, bias};
}

void check_input(const at::Tensor& x, const Layer& layer, int64_t bits) {
  check(x, at::kFloat, 2, "x");
  TORCH_CHECK(x.size(1) == layer.words.size(0) * (32 / bits), "x must have 32 / bits columns per word");
}

// A layer from Python: (words, scales, zeros, group_words, bias or None).
Layer layer_from(const py::tuple& t, int64_t bits) {
  TORCH_CHECK(t.size() == 5, "a layer is (words, scales, zeros, group_words, bias or None)");
  return make_layer(t[0].cast<at::Tensor>(), t[1].cast<at::Tensor>(), t[2].cast<at::Tensor>(),
                    t[3].cast<at::Tensor>(), bits, t[4].cast<c10::optional<at::Tensor>>());
}

}  // namespace

// y [rows, N] float32 for x [rows, K] float32, K = 32 / bits * words (zero-padded past the layer's inputs), plus the
// optional float32 bias [N].
at::Tensor gemv(const at::Tensor& x, const at::Tensor& words, const at::Tensor& scales, const at::Tensor& zeros,
                const at::Tensor& group_words, int64_t bits, const c10::optional<at::Tensor>& bias) {
  const Layer layer = make_layer(words, scales, zeros, group_words, bits, bias);
  check_input(x, layer, bits);
  if (bits == 2) return gemv_bits<2>(x, layer);
  if (bits == 4) return gemv_bits<4>(x, layer);
  return gemv_bits<8>(x, layer);
}

// c_proj(w1(x) * silu(w2(x))) for x [rows, K] float32; w1 and w2 take x as it is, c_proj their product as it is (no
// input gather or padding), all three with the same bits.
at::Tensor gated_mlp(const at::Tensor& x, const py::tuple& w1, const py::tuple& w2, const py::tuple& c_proj,
                     int64_t bits) {
  const Layer up = layer_from(w1, bits), gate = layer_from(w2, bits), proj = layer_from(c_proj, bits);
  check_input(x, up, bits);
  check_input(x, gate, bits);
  TORCH_CHECK(up.words.size(1) == gate.words.size(1), "w1 and w2 must have the same outputs");
  TORCH_CHECK(proj.words.size(0) * (32 / bits) == up.words.size(1), "c_proj must take w1's outputs as its inputs");
  if (bits == 2) return gated_mlp_bits<2>(x, up, gate, proj);
  if (bits == 4) return gated_mlp_bits<4>(x, up, gate, proj);
  return gated_mlp_bits<8>(x, up, gate, proj);
}

template <int BITS, typename T>
void dequantize_bits(const at::Tensor& words, const at::Tensor& scales, const at::Tensor& zeros,
                     const at::Tensor& group_words, at::Tensor& out) {
  constexpr int VALUES = 32 / BITS;
  constexpr uint32_t MASK = (1u << BITS) - 1;
  const int64_t n_total = words.size(1), n_groups = scales.size(0);
  const auto* wp = reinterpret_cast<const uint32_t*>(words.data_ptr<int32_t>());
  const auto* sp = scales.data_ptr<at::Half>();
  const auto* zp = zeros.data_ptr<at::Half>();
  const auto* gp = group_words.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, n_groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> z(n_total), s(n_total);
    for (int64_t g = begin; g < end; ++g) {
      for (int64_t c = 0; c < n_total; ++c) {
        z[c] = static_cast<float>(zp[g * n_total + c]);
        s[c] = static_cast<float>(sp[g * n_total + c]);
      }
      for (int64_t word = gp[g]; word < gp[g + 1]; ++word) {
        const uint32_t* w = wp + word * n_total;
        for (int j = 0; j < VALUES; ++j) {
          T* row = op + (word * VALUES + j) * n_total;
#pragma omp simd
          for (int64_t c = 0; c < n_total; ++c)
            row[c] = static_cast<T>(s[c] * (static_cast<float>((w[c] >> (j * BITS)) & MASK) - z[c]));
        }
      }
    }
  });
}

// W^T [32 / bits * words, N] in `dtype` (float32 or bfloat16).
at::Tensor dequantize(const at::Tensor& words, const at::Tensor& scales, const at::Tensor& zeros,
                      const at::Tensor& group_words, int64_t bits, at::ScalarType dtype) {
  check_layer(words, scales, zeros, group_words, bits);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "dtype must be float32 or bfloat16");
  at::Tensor out = at::empty({words.size(0) * (32 / bits), words.size(1)}, words.options().dtype(dtype));
  auto run = [&](auto tag) {
    using T = decltype(tag);
    if (bits == 2) dequantize_bits<2, T>(words, scales, zeros, group_words, out);
    else if (bits == 4) dequantize_bits<4, T>(words, scales, zeros, group_words, out);
    else dequantize_bits<8, T>(words, scales, zeros, group_words, out);
  };
  if (dtype == at::kFloat) run(float());
  else run(at::BFloat16());
  return out;
}

// x[0:K] . w[0:K] for float32 x and float16 w, in float32 (w converted in registers, four partial sums).
inline float dot_half(const float* __restrict__ x, const at::Half* __restrict__ w, int64_t k_total) {
  int64_t k = 0;
  float total = 0.f;
#if defined(__AVX512F__)
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  for (; k + 64 <= k_total; k += 64)
    for (int i = 0; i < 4; ++i)
      acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 16 * i),
                               _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k + 16 * i))),
                               acc[i]);
  for (; k + 16 <= k_total; k += 16)
    acc[0] = _mm512_fmadd_ps(_mm512_loadu_ps(x + k),
                             _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k))), acc[0]);
  total = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
#endif
  for (; k < k_total; ++k) total += x[k] * static_cast<float>(w[k]);
  return total;
}

// y [rows, N] float32 = x [rows, K] float32 @ w^T for a float16 weight w [N, K] (nn.Linear's layout): the float16
// layer a GPTQ checkpoint keeps (its lm_head), read at 2 bytes per weight with float32 products and sums. Threads
// take contiguous blocks of w's rows and prefetch the row HALF_AHEAD rows ahead into L2. SmolLM2's 49152 x 576 head
// in an Int4 model's decode step (benchmarks/decode_step_breakdown.py, 2-core Intel box): 3.10-3.25 ms without,
// 2.42-2.53 ms with 2 rows into L2; 1 or 3 rows into L2 2.52-2.63, 1 row into L1 2.97, 4-8 rows 2.64-3.09.
constexpr int64_t HALF_AHEAD = 2;
at::Tensor half_linear(const at::Tensor& x, const at::Tensor& w) {
  check(x, at::kFloat, 2, "x");
  check(w, at::kHalf, 2, "w");
  TORCH_CHECK(x.size(1) == w.size(1), "x and w must have the same number of columns");
  const int64_t rows = x.size(0), n_total = w.size(0), k_total = w.size(1);
  at::Tensor y = at::empty({rows, n_total}, x.options());
  const float* xp = x.data_ptr<float>();
  const at::Half* wp = w.data_ptr<at::Half>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, n_total, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      if (n + HALF_AHEAD < end) {
        const char* ahead = reinterpret_cast<const char*>(wp + (n + HALF_AHEAD) * k_total);
        for (int64_t byte = 0; byte < k_total * 2; byte += 64) __builtin_prefetch(ahead + byte, 0, 2);
      }
      for (int64_t m = 0; m < rows; ++m) yp[m * n_total + n] = dot_half(xp + m * k_total, wp + n * k_total, k_total);
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv", &gemv, "x @ W^T + bias for a few rows of float32 x, W read from packed GPTQ words");
  m.def("gated_mlp", &gated_mlp, "c_proj(w1(x) * silu(w2(x))) for a few rows of float32 x, three GPTQ layers");
  m.def("dequantize", &dequantize, "W^T from packed GPTQ words, float32 or bfloat16");
  m.def("half_linear", &half_linear, "x @ w^T for float32 x and a float16 weight, in float32");
#if defined(__AVX512F__)
  m.attr("vectorized") = true;
#else
  m.attr("vectorized") = false;
#endif
}
