// CPU kernels for attention over a per-token quantized KV layer (8-bit codes, or 4-bit codes two per byte with the
// even channel in the low nibble). They read the uint8 codes straight from the cache and convert them in registers,
// so a decoded token reads 1 (8-bit) or 0.5 (4-bit) bytes per cached element instead of the float cache's 4; the
// per-token scale s and zero z are applied by algebra (kvcache/cpu_kernels.py states it). Rows are batch x heads and
// run in parallel (at::parallel_for). The one-pass decode attention is attend_blocks.h and the per-token codes'
// arithmetic token_codes.h, both shared with the fused decode step. Built and loaded by kvcache/cpu_kernels.py.
#include "attend_blocks.h"
#include "token_codes.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <tuple>
#include <utility>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

using namespace one_pass;
using namespace token_codes;

// CPU tensor of `dtype` and `dim` dimensions, contiguous except for the stride of its first (row) dimension: the
// cache's codes and scales are views into a larger reserved buffer (kvcache/reserved.py).
void check(const at::Tensor& t, at::ScalarType dtype, int64_t dim, const char* name) {
  bool dense = true;
  for (int64_t d = dim - 1, expected = 1; d >= 1; expected *= t.size(d), --d)
    dense = dense && (t.size(d) == 1 || t.stride(d) == expected);
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.dim() == dim && dense, name,
              " must be a CPU ", c10::toString(dtype), " tensor of ", dim, " dimensions, dense within a row");
}

// [R, blocks, Q, D] per-block sums -> [R, Q, D].
inline at::Tensor sum_blocks(const at::Tensor& partial) {
  return partial.size(1) == 1 ? partial.select(1, 0) : partial.sum(1);
}

template <int64_t W, int64_t BITS>
void score_rows(const at::Tensor& q, const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero,
                at::Tensor& out) {
  const int64_t R = q.size(0), Q = q.size(1), D = q.size(2), T = codes.size(1);
  const float* qp = q.data_ptr<float>();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* zp = zero.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t ss = scale.stride(0), zs = zero.stride(0), cs = codes.stride(0), qs = q.stride(0);
  for_row_blocks(R, T, [&](int64_t r, int64_t, int64_t t0, int64_t t1) {
    const uint8_t* c = cp + r * cs;
    const float* s = sp + r * ss;
    const float* z = zp + r * zs;
    for (int64_t i = 0; i < Q; ++i) {
      const float* qi = qp + r * qs + i * D;
      float* o = op + (r * Q + i) * T;
      for (int64_t t = t0; t < t1; ++t) {
        prefetch_ahead(c + t * W, W);
        o[t] = s[t] * dot<W, BITS>(qi, c + t * W, z[t]);
      }
    }
  });
}

// scores[r, i, t] = s[r, t] * q[r, i] . (codes[r, t] - z[r, t]) for t < codes.size(1).
// 8 bits: codes [R, T, D]; 4 bits: codes [R, T, D / 2] and q in split order (even channels, then odd ones).
at::Tensor token_scores(const at::Tensor& q, const at::Tensor& codes, const at::Tensor& scale,
                        const at::Tensor& zero, int64_t bits) {
  check(q, at::kFloat, 3, "q");
  check(codes, at::kByte, 3, "codes");
  check(scale, at::kFloat, 2, "scale");
  check(zero, at::kFloat, 2, "zero");
  const int64_t R = q.size(0), Q = q.size(1), D = q.size(2), T = codes.size(1), W = codes.size(2);
  TORCH_CHECK(bits == 8 || bits == 4, "bits must be 8 or 4");
  TORCH_CHECK(codes.size(0) == R && W == (bits == 8 ? D : D / 2) && D % (bits == 8 ? 1 : 2) == 0,
              "codes do not fit q");
  TORCH_CHECK(scale.size(0) == R && zero.size(0) == R && scale.size(1) >= T && zero.size(1) >= T,
              "scale/zero do not fit codes");
  auto out = at::empty({R, Q, T}, q.options());
  switch (bits * 1000 + W) {
    case 8064: score_rows<64, 8>(q, codes, scale, zero, out); break;
    case 8128: score_rows<128, 8>(q, codes, scale, zero, out); break;
    case 4032: score_rows<32, 4>(q, codes, scale, zero, out); break;
    case 4064: score_rows<64, 4>(q, codes, scale, zero, out); break;
    default: TORCH_CHECK(false, "CPU cache kernels take head_dim 64 or 128, got ", D);
  }
  return out;
}

template <int64_t W, int64_t BITS>
at::Tensor value_rows(const at::Tensor& probs, const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero,
                      int64_t D) {
  const int64_t R = probs.size(0), Q = probs.size(1), P = probs.size(2), T = codes.size(1), blocks = num_blocks(T);
  const float* pp = probs.data_ptr<float>();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* zp = zero.data_ptr<float>();
  auto partial = at::empty({R, blocks, Q, D}, probs.options());
  float* part = partial.data_ptr<float>();
  const int64_t ss = scale.stride(0), zs = zero.stride(0), cs = codes.stride(0), ps = probs.stride(0);
  for_row_blocks(R, T, [&](int64_t r, int64_t b, int64_t t0, int64_t t1) {
    const uint8_t* c = cp + r * cs;
    const float* s = sp + r * ss;
    const float* z = zp + r * zs;
    for (int64_t i = 0; i < Q; ++i) {
      const float* p = pp + r * ps + i * P;
      float* acc = part + ((r * blocks + b) * Q + i) * D;
      std::fill(acc, acc + D, 0.f);
      for (int64_t t = t0; t < t1; ++t) {
        prefetch_ahead(c + t * W, W);
        axpy<W, BITS>(acc, p[t] * s[t], c + t * W, z[t]);
      }
    }
  });
  return sum_blocks(partial);
}

// out[r, i] = sum_t p[r, i, t] * s[r, t] * (codes[r, t] - z[r, t]) over t < codes.size(1), in float32.
// 4 bits: the output comes in split order (even channels, then odd ones).
at::Tensor token_values(const at::Tensor& probs, const at::Tensor& codes, const at::Tensor& scale,
                        const at::Tensor& zero, int64_t bits, int64_t head_dim) {
  check(probs, at::kFloat, 3, "probs");
  check(codes, at::kByte, 3, "codes");
  check(scale, at::kFloat, 2, "scale");
  check(zero, at::kFloat, 2, "zero");
  const int64_t R = probs.size(0), Q = probs.size(1), P = probs.size(2), T = codes.size(1), W = codes.size(2);
  const int64_t D = head_dim;
  TORCH_CHECK(bits == 8 || bits == 4, "bits must be 8 or 4");
  TORCH_CHECK(codes.size(0) == R && W == (bits == 8 ? D : D / 2) && P >= T, "codes do not fit probs");
  TORCH_CHECK(scale.size(0) == R && zero.size(0) == R && scale.size(1) >= T && zero.size(1) >= T,
              "scale/zero do not fit codes");
  switch (bits * 1000 + W) {
    case 8064: return value_rows<64, 8>(probs, codes, scale, zero, D);
    case 8128: return value_rows<128, 8>(probs, codes, scale, zero, D);
    case 4032: return value_rows<32, 4>(probs, codes, scale, zero, D);
    case 4064: return value_rows<64, 4>(probs, codes, scale, zero, D);
    default: TORCH_CHECK(false, "CPU cache kernels take head_dim 64 or 128, got ", D);
  }
}

// Natural-order float codes k[0:D] of one 4-bit position (byte j: channel 2j low nibble, 2j + 1 high), dequantized
// with one group's per-channel scale and -zero * scale: k = codes * s + nzs.
template <int64_t D>
inline void dequantize_grouped(float* __restrict__ k, const uint8_t* __restrict__ c, const float* __restrict__ s,
                               const float* __restrict__ nzs) {
  for (int64_t j = 0; j < D / 2; ++j) {
    k[2 * j] = static_cast<float>(c[j] & 0x0F) * s[2 * j] + nzs[2 * j];
    k[2 * j + 1] = static_cast<float>(c[j] >> 4) * s[2 * j + 1] + nzs[2 * j + 1];
  }
}

// Rotates a key k[0:D] in place by its position's angles (NeoX halves: (k_i, k_{i+half}) for i < half, the rest
// passed through), then writes q[i] . k to out[i * stride] for each of the Q queries q [Q, D].
template <int64_t D>
inline void rotate_and_score(float* __restrict__ k, const float* cr, const float* sr, int64_t half, const float* q,
                             int64_t Q, float* out, int64_t stride) {
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const float lo = k[i], hi = k[i + half];
    k[i] = lo * cr[i] - hi * sr[i];
    k[i + half] = hi * cr[i] + lo * sr[i];
  }
  for (int64_t i = 0; i < Q; ++i) {
    const float* qi = q + i * D;
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t d = 0; d < D; ++d) acc += qi[d] * k[d];
    out[i * stride] = acc;
  }
}

// Position of slot i in a [B, >= slots] int32 or int64 table whose rows have stride `stride`.
struct Positions {
  const int32_t* p32;
  const int64_t* p64;
  int64_t stride;
  int64_t operator()(int64_t b, int64_t i) const { return p32 ? p32[b * stride + i] : p64[b * stride + i]; }
};

template <int64_t D, bool FULL_ROTARY>
void grouped_rows(const at::Tensor& q, const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero,
                  const at::Tensor& residual, const at::Tensor& cos, const at::Tensor& sin, const Positions& pos,
                  int64_t heads, int64_t group, at::Tensor& out) {
  const int64_t R = q.size(0), Q = q.size(1), T = codes.size(1), half = cos.size(2), P = cos.size(1);
  const int64_t OT = out.size(2), Tr = OT - T;  // output width: the quantized positions, then the float residual
  const float* rp = residual.data_ptr<float>();
  const int64_t rs = residual.stride(0);
  const float* qp = q.data_ptr<float>();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* zp = zero.data_ptr<float>();
  const float* cosp = cos.data_ptr<float>();
  const float* sinp = sin.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t cs = codes.stride(0), ss = scale.stride(0), zs = zero.stride(0), qs = q.stride(0);
  const bool per_batch = cos.size(0) > 1;
  for_row_blocks(R, OT, [&](int64_t r, int64_t, int64_t t0, int64_t t1) {
    alignas(64) float k[D];
    alignas(64) float nz[D];  // -zero * scale of the current group: stored, then read by the dequantizing FMAs
    int64_t nz_group = -1;
    const int64_t b = r / heads;
    const float* table_c = cosp + (per_batch ? b * P * half : 0);
    const float* table_s = sinp + (per_batch ? b * P * half : 0);
    for (int64_t t = t0; t < std::min(t1, T); ++t) {
      const int64_t g = t / group;
      const uint8_t* c = cp + r * cs + t * (D / 2);
      prefetch_ahead(c, D / 2);
      const float* sc = sp + r * ss + g * D;
      if (g != nz_group) {
        const float* z = zp + r * zs + g * D;
        for (int64_t d = 0; d < D; ++d) nz[d] = -(z[d] * sc[d]);
        nz_group = g;
      }
      const int64_t at_pos = std::max<int64_t>(pos(b, t), 0);  // padding slots (-1): masked anyway
      const float* cr = table_c + at_pos * half;
      const float* sr = table_s + at_pos * half;
#if defined(__AVX512BW__)
      if constexpr (FULL_ROTARY) {  // the whole position in D / 16 registers; half = D / 2
        constexpr int64_t V = D / 16, H = V / 2;
        __m512 kv[V];
        for (int64_t b0 = 0; b0 < D / 2; b0 += 32) {  // 32 bytes -> 64 channels in natural order
          const __m512i x = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + b0)));
          const __m512i pairs = _mm512_or_si512(_mm512_and_si512(x, _mm512_set1_epi16(0x0F)),
                                                _mm512_slli_epi16(_mm512_srli_epi16(x, 4), 8));
          const __m128i part[4] = {_mm512_extracti32x4_epi32(pairs, 0), _mm512_extracti32x4_epi32(pairs, 1),
                                   _mm512_extracti32x4_epi32(pairs, 2), _mm512_extracti32x4_epi32(pairs, 3)};
          for (int64_t j = 0; j < 4; ++j) {
            const int64_t v = b0 / 8 + j;
            kv[v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(part[j])), _mm512_loadu_ps(sc + 16 * v),
                                    _mm512_loadu_ps(nz + 16 * v));
          }
        }
        for (int64_t v = 0; v < H; ++v) {  // NeoX halves rotated by the position's angles
          const __m512 cv = _mm512_loadu_ps(cr + 16 * v), sv = _mm512_loadu_ps(sr + 16 * v);
          const __m512 lo = kv[v], hi = kv[v + H];
          kv[v] = _mm512_fmsub_ps(lo, cv, _mm512_mul_ps(hi, sv));
          kv[v + H] = _mm512_fmadd_ps(hi, cv, _mm512_mul_ps(lo, sv));
        }
        for (int64_t i = 0; i < Q; ++i) {
          const float* qi = qp + r * qs + i * D;
          __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(qi), kv[0]);
          for (int64_t v = 1; v < V; ++v) acc = _mm512_fmadd_ps(_mm512_loadu_ps(qi + 16 * v), kv[v], acc);
          op[(r * Q + i) * OT + t] = _mm512_reduce_add_ps(acc);
        }
        continue;
      }
#endif
      dequantize_grouped<D>(k, c, sc, nz);
      rotate_and_score<D>(k, cr, sr, half, qp + r * qs, Q, op + r * Q * OT + t, OT);
    }
    for (int64_t t = std::max(t0, T) - T; t < t1 - T; ++t) {  // the float residual (pre-RoPE, a partial group)
      const float* src = rp + r * rs + t * D;
      std::copy(src, src + D, k);
      const int64_t at_pos = std::max<int64_t>(pos(b, T + t), 0);
      rotate_and_score<D>(k, table_c + at_pos * half, table_s + at_pos * half, half, qp + r * qs, Q,
                          op + r * Q * OT + T + t, OT);
    }
  });
}

// Scores q . RoPE(k) of "channel_groups" keys: 4-bit codes [R, T, D / 2] in groups of `group` positions with
// per-channel scale and zero point [R, T / group, D] (k = scale * (code - zero), formed as code * scale + -(zero *
// scale)), then the float residual [R, Tr, D] (pre-RoPE), rotated at positions [B, >= T + Tr] (int32 or int64; row r
// is batch r / heads; negative = padding, taken as 0) with cos/sin tables [1 or B, > max position, rot_dim / 2].
// q [R, Q, D] in natural order; the result is [R, Q, T + Tr].
at::Tensor grouped_scores(const at::Tensor& q, const at::Tensor& codes, const at::Tensor& scale,
                          const at::Tensor& zero, const at::Tensor& residual, const at::Tensor& cos,
                          const at::Tensor& sin, const at::Tensor& positions, int64_t heads, int64_t group) {
  check(q, at::kFloat, 3, "q");
  check(codes, at::kByte, 3, "codes");
  check(residual, at::kFloat, 3, "residual");
  check(scale, at::kFloat, 3, "scale");
  check(zero, at::kFloat, 3, "zero");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous(), "cos and sin must be contiguous");
  check(cos, at::kFloat, 3, "cos");
  check(sin, at::kFloat, 3, "sin");
  TORCH_CHECK(positions.device().is_cpu() && positions.dim() == 2 && positions.stride(1) == 1 &&
                  (positions.scalar_type() == at::kInt || positions.scalar_type() == at::kLong),
              "positions must be a CPU int32 or int64 tensor [batch, slots] with contiguous rows");
  const int64_t R = q.size(0), Q = q.size(1), D = q.size(2), T = codes.size(1), Tr = residual.size(1);
  TORCH_CHECK(codes.size(0) == R && codes.size(2) == D / 2 && T % group == 0 && scale.size(0) == R &&
              scale.size(1) * group == T && scale.size(2) == D && zero.sizes() == scale.sizes() &&
              residual.size(0) == R && residual.size(2) == D, "codes/scales/residual do not fit q");
  TORCH_CHECK(2 * cos.size(2) <= D && cos.sizes() == sin.sizes() && R % heads == 0 &&
              positions.size(0) * heads == R && positions.size(1) >= T + Tr &&
              (cos.size(0) == 1 || cos.size(0) == positions.size(0)), "rotary tables/positions do not fit q");
  const bool narrow = positions.scalar_type() == at::kInt;
  const Positions pos{narrow ? positions.data_ptr<int32_t>() : nullptr,
                      narrow ? nullptr : positions.data_ptr<int64_t>(), positions.stride(0)};
  for (int64_t b = 0; b < positions.size(0); ++b)
    for (int64_t i = 0; i < T + Tr; ++i)
      TORCH_CHECK(pos(b, i) < cos.size(1), "positions outside the rotary table");
  auto out = at::empty({R, Q, T + Tr}, q.options());
  switch (D) {
    case 64:
      if (2 * cos.size(2) == D) grouped_rows<64, true>(q, codes, scale, zero, residual, cos, sin, pos, heads, group, out);
      else grouped_rows<64, false>(q, codes, scale, zero, residual, cos, sin, pos, heads, group, out);
      break;
    case 128:
      if (2 * cos.size(2) == D) grouped_rows<128, true>(q, codes, scale, zero, residual, cos, sin, pos, heads, group, out);
      else grouped_rows<128, false>(q, codes, scale, zero, residual, cos, sin, pos, heads, group, out);
      break;
    default: TORCH_CHECK(false, "CPU cache kernels take head_dim 64 or 128, got ", D);
  }
  return out;
}

// softmax(scores * scale + mask) in float32 over the last axis; mask (optional) broadcasts to [B, heads, Q, T].
at::Tensor probabilities(at::Tensor scores, double scale, const c10::optional<at::Tensor>& mask, int64_t heads) {
  scores.mul_(scale);
  if (mask.has_value() && mask->defined()) {
    auto view = scores.view({scores.size(0) / heads, heads, scores.size(1), scores.size(2)});
    view.add_(*mask);
  }
  return at::softmax(scores, -1);
}

// 4-bit codes hold channel 2j in byte j's low nibble and 2j + 1 in its high one, and the kernels above take the query
// (and give the output) in split order: even channels, then odd ones. x [N..., D] float32 -> a new contiguous tensor
// in split order (to_split) or back in natural order: a permutation, so exact.
at::Tensor reorder_channels(const at::Tensor& x, bool to_split) {
  const auto src_t = x.contiguous();
  auto y = at::empty_like(src_t);
  const int64_t D = x.size(-1), H = D / 2, N = D ? x.numel() / D : 0;
  const float* src = src_t.data_ptr<float>();
  float* dst = y.data_ptr<float>();
  for (int64_t n = 0; n < N; ++n, src += D, dst += D)
    for (int64_t j = 0; j < H; ++j) {
      if (to_split) {
        dst[j] = src[2 * j];
        dst[H + j] = src[2 * j + 1];
      } else {
        dst[2 * j] = src[j];
        dst[2 * j + 1] = src[H + j];
      }
    }
  return y;
}

// The decode-step entry points take the cache's own tensors, [B, H, ...] views into its reserved buffers in the
// stored dtypes, and do here the reshapes, float32 conversions and channel reordering that cost a few microseconds
// each as Python tensor ops (~50 us a layer and step for the 4-bit cache).

// [B, H, n, W] -> [B * H, n, W] (a view of a reserved buffer).
at::Tensor head_rows(const at::Tensor& t) { return t.flatten(0, 1); }

// A per-position scale or zero [B, H, n, 1] -> float32 [B * H, n] (a view when it is float32 already).
at::Tensor position_rows(const at::Tensor& t) { return t.flatten(0, 1).select(-1, 0).to(at::kFloat); }

c10::optional<at::Tensor> float_mask(const c10::optional<at::Tensor>& mask) {
  if (!mask.has_value() || !mask->defined()) return c10::nullopt;
  return mask->to(at::kFloat);
}

// A floating-point CPU query [B, H, Q, D] and the layer's tensors, each [B, H, ...] (their dtypes and the rest of their
// shapes are the scoring and value kernels' checks).
void check_step(const at::Tensor& query,
                std::initializer_list<std::pair<const at::Tensor*, const char*>> layer) {
  TORCH_CHECK(query.dim() == 4 && query.device().is_cpu() && at::isFloatingType(query.scalar_type()),
              "query must be a floating-point CPU tensor [batch, heads, q, head_dim]");
  for (const auto& [t, name] : layer)
    TORCH_CHECK(t->dim() == 4 && t->size(0) == query.size(0) && t->size(1) == query.size(1), name,
                " must be [batch, heads, ...] like the query [", query.size(0), ", ", query.size(1), ", ...]");
}

// out [B * H, Q, D] float32 (split order for 4-bit values) -> [B, H, Q, D] in natural order and the query's dtype.
at::Tensor finish(at::Tensor out, const at::Tensor& query, bool split) {
  if (split) out = reorder_channels(out, false);
  return out.reshape(query.sizes()).to(query.scalar_type());
}

// A token-layout decode step in one pass (attend_blocks): scores s_k[t] q . (k_q[t] - z_k[t]) as score_rows gives
// them, values s_v[t] (v_q[t] - z_v[t]) weighted as value_rows weights them; the value codes of a block are fetched
// into L2 while its keys are scored. q [R, Q, D] (split order for 4 bits); codes [R, T, W]; scales, zeros [R, T].
template <int64_t W, int64_t BITS>
at::Tensor token_rows(const at::Tensor& q, const at::Tensor& key_codes, const at::Tensor& key_scale,
                      const at::Tensor& key_zero, const at::Tensor& value_codes, const at::Tensor& value_scale,
                      const at::Tensor& value_zero, const c10::optional<at::Tensor>& mask, double scale,
                      int64_t heads) {
  auto side = [](const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero) {
    return TokenSide{codes.data_ptr<uint8_t>(), codes.stride(0), scale.data_ptr<float>(), scale.stride(0),
                     zero.data_ptr<float>(), zero.stride(0)};
  };
  const TokenRows<W, BITS> rows{q.data_ptr<float>(), q.stride(0), q.size(2), side(key_codes, key_scale, key_zero),
                                side(value_codes, value_scale, value_zero)};
  auto score = [&](int64_t r, int64_t i, int64_t t) { return rows.score(r, i, t); };
  auto weigh = [&](float* acc, int64_t r, int64_t t0, int64_t t1, const float* p) { rows.weigh(acc, r, t0, t1, p); };
  return attend_blocks(q.size(0), q.size(1), key_codes.size(1), q.size(2), heads, mask, scale, score, weigh);
}

// One call for a decode step over a token-layout layer: softmax(s q . (k_q - z) * scale + mask) weighted values.
// query [B, H, Q, D]; codes [B, H, T, W]; scales and zeros [B, H, T, 1]; mask optional, broadcasting to [B, H, Q, T].
at::Tensor attend_token(const at::Tensor& query, const at::Tensor& key_codes, const at::Tensor& key_scale,
                        const at::Tensor& key_zero, const at::Tensor& value_codes, const at::Tensor& value_scale,
                        const at::Tensor& value_zero, const c10::optional<at::Tensor>& mask, double scale,
                        int64_t bits) {
  check_step(query, {{&key_codes, "key codes"}, {&key_scale, "key scale"}, {&key_zero, "key zero"},
                     {&value_codes, "value codes"}, {&value_scale, "value scale"}, {&value_zero, "value zero"}});
  const int64_t heads = query.size(1), D = query.size(3);
  TORCH_CHECK(bits == 8 || bits == 4, "bits must be 8 or 4");
  auto q = query.to(at::kFloat).flatten(0, 1);
  q = bits == 4 ? reorder_channels(q, true) : q.contiguous();
  const auto kc = head_rows(key_codes), vc = head_rows(value_codes);
  const auto ks = position_rows(key_scale), kz = position_rows(key_zero), vs = position_rows(value_scale),
             vz = position_rows(value_zero);
  const int64_t R = q.size(0), T = kc.size(1), W = bits == 8 ? D : D / 2;
  using Named = std::pair<const at::Tensor*, const char*>;
  for (const auto& [codes, name] : {Named{&kc, "key codes"}, Named{&vc, "value codes"}}) {
    check(*codes, at::kByte, 3, name);
    TORCH_CHECK(codes->size(0) == R && codes->size(1) == T && codes->size(2) == W && D % 2 == 0,
                "codes do not fit q");
  }
  for (const auto* t : {&ks, &kz, &vs, &vz}) {
    check(*t, at::kFloat, 2, "scale/zero");
    TORCH_CHECK(t->size(0) == R && t->size(1) >= T, "scale/zero do not fit codes");
  }
  at::Tensor out;
  switch (bits * 1000 + W) {
    case 8064: out = token_rows<64, 8>(q, kc, ks, kz, vc, vs, vz, mask, scale, heads); break;
    case 8128: out = token_rows<128, 8>(q, kc, ks, kz, vc, vs, vz, mask, scale, heads); break;
    case 4032: out = token_rows<32, 4>(q, kc, ks, kz, vc, vs, vz, mask, scale, heads); break;
    case 4064: out = token_rows<64, 4>(q, kc, ks, kz, vc, vs, vz, mask, scale, heads); break;
    default: TORCH_CHECK(false, "CPU cache kernels take head_dim 64 or 128, got ", D);
  }
  return finish(out, query, bits == 4);
}

// The same for "channel_groups" keys and 4-bit token values: q_key [B, H, n * group, D / 2], key_scale and key_zero
// [B, H, n, D], residual [B, H, r, D] float keys, positions [B, >= n * group + r], cos/sin as grouped_scores takes.
at::Tensor attend_grouped(const at::Tensor& query, const at::Tensor& q_key, const at::Tensor& key_scale,
                          const at::Tensor& key_zero, const at::Tensor& residual, const at::Tensor& cos,
                          const at::Tensor& sin, const at::Tensor& positions, int64_t group,
                          const at::Tensor& value_codes, const at::Tensor& value_scale, const at::Tensor& value_zero,
                          const c10::optional<at::Tensor>& mask, double softmax_scale) {
  check_step(query, {{&q_key, "key codes"}, {&key_scale, "key scale"}, {&key_zero, "key zero"}, {&residual, "residual"},
                     {&value_codes, "value codes"}, {&value_scale, "value scale"}, {&value_zero, "value zero"}});
  const int64_t heads = query.size(1), D = query.size(3);
  auto scores = grouped_scores(query.to(at::kFloat).flatten(0, 1).contiguous(), head_rows(q_key),
                               key_scale.flatten(0, 1).to(at::kFloat), key_zero.flatten(0, 1).to(at::kFloat),
                               residual.flatten(0, 1).to(at::kFloat), cos, sin, positions, heads, group);
  auto probs = probabilities(scores, softmax_scale, float_mask(mask), heads);
  return finish(token_values(probs, head_rows(value_codes), position_rows(value_scale), position_rows(value_zero), 4,
                             D),
                query, true);
}

// Decode attention over a float32 layer: out[r, i] = softmax(q[r, i] . k[r, t] * scale + mask) weighted v[r, t],
// q [R, Q, D], k and v [R, T, D] (rows may be strided views into a reserved buffer). One call instead of the ~8
// tensor ops of the plain matmul attention, threads over (row, block of positions) as for the quantized layers.
template <int64_t D>
at::Tensor attend_float_rows(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const c10::optional<at::Tensor>& mask, double scale, int64_t heads) {
  const FloatRows<D> rows{q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), q.stride(0), k.stride(0),
                          v.stride(0)};
  auto score = [&](int64_t r, int64_t i, int64_t t) { return rows.score(r, i, t); };
  auto weigh = [&](float* acc, int64_t r, int64_t t0, int64_t t1, const float* p) { rows.weigh(acc, r, t0, t1, p); };
  return attend_blocks(q.size(0), q.size(1), k.size(1), D, heads, mask, scale, score, weigh);
}

// softmax(q . k * scale + mask) v over a float32 layer, [R, Q, D]; mask (optional) broadcasts to [B, heads, Q, T].
at::Tensor attend_float(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const c10::optional<at::Tensor>& mask, double scale, int64_t heads) {
  check(q, at::kFloat, 3, "q");
  check(k, at::kFloat, 3, "k");
  check(v, at::kFloat, 3, "v");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(2) == q.size(2) && k.size(1) > 0,
              "k and v must be [R, T > 0, D] with q's R and D");
  TORCH_CHECK(q.size(0) % heads == 0, "rows must be batch x heads");
  switch (q.size(2)) {
    case 64: return attend_float_rows<64>(q, k, v, mask, scale, heads);
    case 128: return attend_float_rows<128>(q, k, v, mask, scale, heads);
    default: TORCH_CHECK(false, "attend_float takes head_dim 64 or 128, got ", q.size(2));
  }
}

void check_bits_and_dim(int64_t bits, int64_t D) {
  TORCH_CHECK(bits == 8 || (bits == 4 && D % 2 == 0), "bits must be 8, or 4 with an even head_dim");
}

// quantize_row over float32 states [N, D]: (codes [N, D or D / 2], scale [N, 1], zero [N, 1], finite).
std::tuple<at::Tensor, at::Tensor, at::Tensor, bool> quantize_token(const at::Tensor& x, int64_t bits, double qmin,
                                                                    double qmax) {
  check(x, at::kFloat, 2, "x");
  TORCH_CHECK(x.is_contiguous(), "x must be contiguous");
  const int64_t N = x.size(0), D = x.size(1), W = bits == 8 ? D : D / 2;
  check_bits_and_dim(bits, D);
  auto codes = at::empty({N, W}, x.options().dtype(at::kByte));
  auto scale = at::empty({N, 1}, x.options());
  auto zero = at::empty({N, 1}, x.options());
  bool finite = true;
  for (int64_t n = 0; n < N; ++n)
    finite = quantize_row(x.data_ptr<float>() + n * D, D, bits, static_cast<float>(qmin), static_cast<float>(qmax),
                          codes.data_ptr<uint8_t>() + n * W, scale.data_ptr<float>() + n,
                          zero.data_ptr<float>() + n) && finite;
  return {codes, scale, zero, finite};
}

// quantize_row of states [B, H, n, D] (float32, contiguous) written straight into a reserved layer's buffers at
// positions old .. old + n - 1: codes [B, H, capacity, W] uint8, scale and zero [B, H, capacity, 1] float32 (any
// strides). One call instead of quantize_token and three appends (a decode step's ~30 us of tensor ops per layer).
// Returns whether the states were finite (the caller raises; nothing past the filled views is read) and the
// buffers' views of positions 0 .. old + n - 1 (what the layer holds next, made here rather than by three narrows in
// Python).
std::tuple<bool, at::Tensor, at::Tensor, at::Tensor> quantize_append(const at::Tensor& x, at::Tensor codes,
                                                                     at::Tensor scale, at::Tensor zero, int64_t old,
                                                                     int64_t bits, double qmin, double qmax) {
  check(x, at::kFloat, 4, "states");
  TORCH_CHECK(x.is_contiguous(), "states must be contiguous");
  const int64_t B = x.size(0), H = x.size(1), n = x.size(2), D = x.size(3), W = bits == 8 ? D : D / 2;
  check_bits_and_dim(bits, D);
  TORCH_CHECK(codes.scalar_type() == at::kByte && scale.scalar_type() == at::kFloat &&
                  zero.scalar_type() == at::kFloat && codes.device().is_cpu() && scale.device().is_cpu() &&
                  zero.device().is_cpu(),
              "the buffers must be uint8 codes and float32 scales and zeros on CPU");
  for (const at::Tensor* t : {&codes, &scale, &zero})
    TORCH_CHECK(t->dim() == 4 && t->size(0) == B && t->size(1) == H && old >= 0 && old + n <= t->size(2),
                "the buffers must be [batch, heads, capacity >= old + new, ...] with the states' batch and heads");
  TORCH_CHECK(codes.size(3) == W && codes.stride(3) == 1 && scale.size(3) == 1 && zero.size(3) == 1,
              "codes must hold ", W, " contiguous bytes per position, scale and zero one value");
  auto offset = [](const at::Tensor& t, int64_t b, int64_t h, int64_t p) {
    return b * t.stride(0) + h * t.stride(1) + p * t.stride(2);
  };
  bool finite = true;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t = 0; t < n; ++t) {
        const int64_t p = old + t;
        finite = quantize_row(x.data_ptr<float>() + ((b * H + h) * n + t) * D, D, bits, static_cast<float>(qmin),
                              static_cast<float>(qmax), codes.data_ptr<uint8_t>() + offset(codes, b, h, p),
                              scale.data_ptr<float>() + offset(scale, b, h, p),
                              zero.data_ptr<float>() + offset(zero, b, h, p)) &&
                 finite;
      }
  return {finite, codes.narrow(2, 0, old + n), scale.narrow(2, 0, old + n), zero.narrow(2, 0, old + n)};
}

// kvcache.reserved.append's in-place case in one call (a decode step appends two or more tensors per layer, each
// ~7 us as Python tensor ops): when `filled` is a prefix of `buffer` along `dim` (same start, strides and other
// sizes) with room after it for `fresh` of the same dtype, device and other sizes, copies `fresh` there and returns
// the grown view; otherwise nothing (the caller takes the general path).
c10::optional<at::Tensor> append_in_place(const at::Tensor& buffer, const at::Tensor& filled, const at::Tensor& fresh,
                                          int64_t dim) {
  const int64_t rank = fresh.dim();
  if (rank == 0 || buffer.dim() != rank || filled.dim() != rank || filled.numel() == 0) return c10::nullopt;
  dim = at::maybe_wrap_dim(dim, rank);
  const int64_t old = filled.size(dim), n = fresh.size(dim);
  if (filled.data_ptr() != buffer.data_ptr() || filled.strides() != buffer.strides() || buffer.size(dim) < old + n ||
      buffer.scalar_type() != fresh.scalar_type() || filled.scalar_type() != fresh.scalar_type() ||
      buffer.device() != fresh.device())
    return c10::nullopt;
  for (int64_t d = 0; d < rank; ++d)
    if (d != dim && (buffer.size(d) != fresh.size(d) || buffer.size(d) != filled.size(d))) return c10::nullopt;
  buffer.narrow(dim, old, n).copy_(fresh);
  return buffer.narrow(dim, 0, old + n);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("token_scores", &token_scores, "s q . (codes - z) of per-token quantized keys");
  m.def("token_values", &token_values, "sum_t p s (codes - z) of per-token quantized values");
  m.def("grouped_scores", &grouped_scores, "q . RoPE(k) of 4-bit channel_groups keys");
  m.def("quantize_token", &quantize_token, "per-row asymmetric 8/4-bit quantization of float32 states");
  m.def("quantize_append", &quantize_append, "quantize_token written into a reserved layer's buffers");
  m.def("attend_token", &attend_token, "decode attention over a token-layout quantized layer");
  m.def("attend_grouped", &attend_grouped, "decode attention over a channel_groups quantized layer");
  m.def("attend_float", &attend_float, "decode attention over a float32 layer");
  m.def("append_in_place", &append_in_place, "reserved.append's in-place case: fresh copied after filled");
}
