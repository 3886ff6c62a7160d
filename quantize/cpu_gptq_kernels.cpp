// CPU kernels that read a GPTQ layer's packed codes as they are stored (qweight int32 [words, N]: each word holds
// 32 / BITS consecutive input rows of one output column, lowest bits first) and compute in float32:
//   gemv:       y[m, n] = sum_g s[g, n] * sum_{k in g} x[m, k] (q[k, n] - z[g, n]), for a few rows m (decode);
//   dequantize: W^T[k, n] = s[g, n] (q[k, n] - z[g, n]) in float32 or bfloat16, for a GEMM (prefill).
// Groups are runs of whole words (group_words[g] .. group_words[g + 1]); scales and true zero points are float16
// [G, N]. Codes convert in registers. dequantize computes s (q - z) exactly in float32 (an exact small integer times
// a float16), the reference's weight bit for bit; gemv sums x . q per group in float32 and applies s and z once per
// group, so both differ from the dequantize reference only by float32 rounding of sums. Threads (at::parallel_for)
// take contiguous blocks of words (gemv) or whole groups (dequantize). The GEMV itself is gptq_gemv.h (shared with
// the fused decode step). Built and loaded by quantize/cpu_gptq.py.
#include "gptq_gemv.h"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

using namespace gptq_gemv;

// partial [parts, rows, N] -> its first block holds the sum of the parts plus the bias (sum_parts).
at::Tensor finish_parts(at::Tensor partial, const c10::optional<at::Tensor>& bias) {
  float* out = partial.data_ptr<float>();
  sum_parts(out, partial.size(0), partial.size(1), partial.size(2), bias_data(bias), out);
  return partial[0];
}

template <int BITS>
at::Tensor gemv_bits(const at::Tensor& x, const Layer& layer) {
  const int64_t parts = word_parts(layer);
  const int64_t size = x.size(0) * layer.words.size(1);
  at::Tensor partial = at::empty({parts, x.size(0), layer.words.size(1)}, x.options());
  float* out = partial.data_ptr<float>();
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t part = begin; part < end; ++part)
      gemv_part<BITS>(x.data_ptr<float>(), x.size(0), x.size(1), layer, out + part * size, part, parts);
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
      gemv_part<BITS>(x.data_ptr<float>(), rows, x.size(1), up, up_out + part * size, part, parts);
      gemv_part<BITS>(x.data_ptr<float>(), rows, x.size(1), gate, gate_out + part * size, part, parts);
    }
  });
  at::Tensor hidden = finish_parts(up_partial, up.bias).mul_(at::silu(finish_parts(gate_partial, gate.bias)));
  return gemv_bits<BITS>(hidden, proj);
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
