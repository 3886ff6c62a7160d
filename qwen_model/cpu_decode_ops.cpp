// The small per-layer ops of a decode step on CPU, one call each instead of a handful of tensor ops (each tensor
// op costs microseconds of dispatch, and a decoded token runs ~60 norms and 30 attention inputs):
//   qkv_heads: c_attn's output [b, s, 3P] -> rotated queries and keys [b, h, s, d] (views of one [b, 2h, s, d]
//              tensor), and the values and pre-rotary keys as views of the input;
//   rms_norm:  x * rsqrt(mean(x^2) + eps) * w over the last axis, float32.
// The per-row arithmetic is decode_ops.h (shared with the fused decode step; the rotary is bit-identical to
// kvcache.rotary.apply_rotary_pos_emb). Built and loaded by qwen_model/cpu_decode_ops.py.
#include <torch/extension.h>

#include "decode_ops.h"

#include <cmath>
#include <tuple>

namespace {

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, " must be a float32 CPU tensor");
}

// qkv [b, s, 3 * heads * d] (last axis contiguous); cos, sin [cb, 1, s, d] contiguous with cb 1 or b, both halves
// of the head rotated (NeoX halves: channel j pairs with j + d / 2).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> qkv_heads(const at::Tensor& qkv, const at::Tensor& cos,
                                                                      const at::Tensor& sin, int64_t heads) {
  check_float(qkv, "qkv");
  check_float(cos, "cos");
  check_float(sin, "sin");
  TORCH_CHECK(qkv.dim() == 3 && qkv.stride(2) == 1, "qkv must be [batch, seq, 3 * projection] with a contiguous "
              "last axis");
  const int64_t b = qkv.size(0), s = qkv.size(1), P = qkv.size(2) / 3, d = heads > 0 ? P / heads : 0;
  TORCH_CHECK(heads > 0 && qkv.size(2) == 3 * P && P == heads * d && d % 2 == 0,
              "qkv's last axis must be 3 x heads x an even head size");
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.dim() == 4 && (cos.size(0) == 1 || cos.size(0) == b) &&
                  cos.size(1) == 1 && cos.size(2) == s && cos.size(3) == d && cos.is_contiguous() &&
                  sin.is_contiguous(),
              "cos and sin must be contiguous [1 or batch, 1, seq, head size]");
  at::Tensor rotated = at::empty({b, 2 * heads, s, d}, qkv.options());
  const int64_t sb = qkv.stride(0), ss = qkv.stride(1);
  const float* in = qkv.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  float* out = rotated.data_ptr<float>();
  for (int64_t i = 0; i < b; ++i) {
    for (int64_t hh = 0; hh < 2 * heads; ++hh) {  // queries, then keys: the first 2P channels of each position
      for (int64_t t = 0; t < s; ++t) {
        const float* x = in + i * sb + t * ss + hh * d;
        const float* c = cp + ((cos.size(0) == 1 ? 0 : i) * s + t) * d;
        const float* n = sp + ((cos.size(0) == 1 ? 0 : i) * s + t) * d;
        float* o = out + ((i * 2 * heads + hh) * s + t) * d;
        decode_ops::rotate_head(x, c, n, d, o);
      }
    }
  }
  auto view = [&](int64_t offset) {  // [b, h, s, d] over qkv's channels from `offset`
    return qkv.as_strided({b, heads, s, d}, {sb, d, ss, 1}, qkv.storage_offset() + offset);
  };
  return {rotated.narrow(1, 0, heads), rotated.narrow(1, heads, heads), view(2 * P), view(P)};
}

// x [..., n] contiguous, w [n]: float32 sums of squares per row, then x * rstd (rounded) * w, as ATen's rms_norm
// orders the products.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_float(x, "x");
  check_float(w, "w");
  TORCH_CHECK(x.is_contiguous() && x.dim() >= 1 && w.dim() == 1 && w.size(0) == x.size(-1) && w.is_contiguous(),
              "x must be contiguous [..., n] and w [n]");
  const int64_t n = x.size(-1), rows = n ? x.numel() / n : 0;
  at::Tensor y = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) decode_ops::rms_norm_row(xp + r * n, wp, n, static_cast<float>(eps), yp + r * n);
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("qkv_heads", &qkv_heads, "rotated queries and keys, values and pre-rotary keys from c_attn's output");
  m.def("rms_norm", &rms_norm, "x * rsqrt(mean(x^2) + eps) * w over the last axis, float32");
}
