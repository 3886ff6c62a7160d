// A decoded token through all of a GPTQ model's blocks in one call and one parallel region (qwen_model/
// cpu_decode_step.py): per block ln_1, c_attn, the rotary, the cache's append and attention (the float cache, or the
// int8 token-layout quantized cache), c_proj and the residual, ln_2, the SwiGLU MLP and its residual. Run op by op,
// a decode step of SmolLM2-135M makes ~300 calls that each start cold (the weights and the cache stream through every
// cache level) and ~400 tensor ops between them; here the threads stay in one region, meeting at barriers, so memory
// keeps streaming between layers.
//
// Each piece is the arithmetic of the op-by-op path, shared with it through headers: the GEMV (gptq_gemv.h, the same
// word blocks summed in the same order), the norm and rotary (decode_ops.h), the one-pass attention (attend_blocks.h,
// the same units and merge; token_codes.h for the int8 cache's codes and their quantization), ATen's silu; residuals
// and the gate's product are single roundings. The result equals the op-by-op path's bit for bit. Small ops (norms,
// rotary, sums of parts, residuals) are computed by every thread into its own buffers, so they need no barrier; each
// cache row is written by one thread.
#include <torch/extension.h>

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../kvcache/attend_blocks.h"
#include "../kvcache/token_codes.h"
#include "../quantize/gptq_gemv.h"
#include "decode_ops.h"

namespace {

using gptq_gemv::Layer;

struct Block {
  at::Tensor ln_1, ln_2;
  Layer c_attn, c_proj, w1, w2, mlp_proj;
};

void check_norm(const at::Tensor& w, int64_t size, const char* name) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kFloat && w.dim() == 1 && w.size(0) == size &&
                  w.is_contiguous(),
              name, " must be a contiguous float32 CPU tensor of ", size, " values");
}

int64_t inputs(const Layer& layer, int64_t bits) { return layer.words.size(0) * (32 / bits); }
int64_t outputs(const Layer& layer) { return layer.words.size(1); }

// A block's float cache: reserved key and value buffers [B, H, capacity, D] float32.
struct FloatLayer {
  float* keys;
  float* values;
  int64_t capacity;

  bool append(int64_t r, int64_t pos, const float* key, const float* value, int64_t D) const {
    std::copy(key, key + D, keys + (r * capacity + pos) * D);
    std::copy(value, value + D, values + (r * capacity + pos) * D);
    return true;
  }

  template <int64_t D>
  one_pass::FloatRows<D> rows(const float* query) const {
    return {query, keys, values, D, capacity * D, capacity * D};
  }
};

// A block's int8 token-layout cache: reserved codes [B, H, capacity, D] uint8, scales and zeros [B, H, capacity, 1]
// float32; append quantizes each row (quantize_append's arithmetic) and returns whether it was finite.
struct Int8Layer {
  uint8_t* key_codes;
  float* key_scale;
  float* key_zero;
  uint8_t* value_codes;
  float* value_scale;
  float* value_zero;
  int64_t capacity;
  float qmin, qmax;

  bool append(int64_t r, int64_t pos, const float* key, const float* value, int64_t D) const {
    const int64_t p = r * capacity + pos;
    const bool key_finite = token_codes::quantize_row(key, D, 8, qmin, qmax, key_codes + p * D, key_scale + p,
                                                      key_zero + p);
    return token_codes::quantize_row(value, D, 8, qmin, qmax, value_codes + p * D, value_scale + p, value_zero + p) &&
           key_finite;
  }

  template <int64_t D>
  token_codes::TokenRows<D, 8> rows(const float* query) const {
    return {query, D, D, {key_codes, capacity * D, key_scale, capacity, key_zero, capacity},
            {value_codes, capacity * D, value_scale, capacity, value_zero, capacity}};
  }
};

void check_buffer(const at::Tensor& t, at::ScalarType dtype, int64_t B, int64_t H, int64_t past, int64_t last,
                  const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.dim() == 4 && t.size(0) == B && t.size(1) == H &&
                  t.size(2) > past && t.size(3) == last && t.is_contiguous(),
              what, " must be contiguous ", c10::toString(dtype), " [", B, ", ", H, ", > ", past, ", ", last, "]");
}

class DecodePlan {
 public:
  // blocks: per block (ln_1 weight, c_attn, c_proj, ln_2 weight, w1, w2, mlp c_proj), each layer a tuple as the GPTQ
  // kernels take it (words, scales, zeros, group_words, bias or None); the MLP is c_proj(w1(x) * silu(w2(x))).
  DecodePlan(const std::vector<py::tuple>& blocks, int64_t bits, int64_t heads, double eps, double scale)
      : bits_(bits), heads_(heads), eps_(static_cast<float>(eps)), scale_(static_cast<float>(scale)) {
    TORCH_CHECK(!blocks.empty(), "a decode plan needs at least one block");
    TORCH_CHECK(heads > 0, "heads must be positive");
    for (const auto& t : blocks) {
      TORCH_CHECK(t.size() == 7, "a block is (ln_1, c_attn, c_proj, ln_2, w1, w2, mlp c_proj)");
      auto layer = [&](int i) { return gptq_gemv::layer_from(t[i].cast<py::tuple>(), bits); };
      Block b{t[0].cast<at::Tensor>(), t[3].cast<at::Tensor>(), layer(1), layer(2), layer(4), layer(5), layer(6)};
      const int64_t E = inputs(b.c_attn, bits), P = outputs(b.c_attn) / 3, F = outputs(b.w1);
      if (blocks_.empty()) {
        hidden_ = E;
        head_dim_ = P / heads;
        ffn_ = F;
      }
      TORCH_CHECK(E == hidden_ && P * 3 == outputs(b.c_attn) && P == heads * head_dim_ && F == ffn_,
                  "every block must have the first block's shapes (hidden ", hidden_, ", ", heads, " heads of ",
                  head_dim_, ", MLP ", ffn_, ")");
      TORCH_CHECK(head_dim_ == 64 || head_dim_ == 128, "the fused decode step takes head_dim 64 or 128, got ",
                  head_dim_);
      TORCH_CHECK(inputs(b.c_proj, bits) == P && outputs(b.c_proj) == E, "c_proj must map heads x head_dim to hidden");
      TORCH_CHECK(inputs(b.w1, bits) == E && inputs(b.w2, bits) == E && outputs(b.w2) == F,
                  "w1 and w2 must map hidden to the same width");
      TORCH_CHECK(inputs(b.mlp_proj, bits) == F && outputs(b.mlp_proj) == E, "the MLP's c_proj must map w1's width "
                  "to hidden");
      check_norm(b.ln_1, E, "ln_1");
      check_norm(b.ln_2, E, "ln_2");
      blocks_.push_back(std::move(b));
    }
  }

  // hidden [B, E] float32: the embedded token of each sequence. keys/values: each block's reserved float cache buffer
  // [B, heads, capacity > past, head_dim], filled up to `past`; this step's key (rotated) and value are written at
  // position `past`. cos/sin [1 or B, 1, 1, head_dim] for this position; mask optional, additive, broadcasting to
  // [B, 1, 1, past + 1]; logn optional, float32 [B]: each sequence's queries scaled by it after the rotary (the
  // original's logn attention past seq_length). Returns the hidden states after the last block, [B, E].
  at::Tensor step(const at::Tensor& hidden, const std::vector<at::Tensor>& keys, const std::vector<at::Tensor>& values,
                  int64_t past, const at::Tensor& cos, const at::Tensor& sin, const c10::optional<at::Tensor>& mask,
                  const c10::optional<at::Tensor>& logn) {
    check_step(hidden, past, cos, sin, mask, logn);
    TORCH_CHECK(keys.size() == blocks_.size() && values.size() == blocks_.size(), "one key and one value buffer per "
                "block");
    const int64_t B = hidden.size(0);
    std::vector<FloatLayer> layers;
    for (size_t l = 0; l < blocks_.size(); ++l) {
      check_buffer(keys[l], at::kFloat, B, heads_, past, head_dim_, "cache buffers");
      check_buffer(values[l], at::kFloat, B, heads_, past, head_dim_, "cache buffers");
      layers.push_back({keys[l].data_ptr<float>(), values[l].data_ptr<float>(), keys[l].size(2)});
    }
    return run(hidden, layers, past, cos, sin, mask, logn).first;
  }

  // The same over the int8 token-layout quantized cache: per block (q_key, key_scale, key_zero, q_value, value_scale,
  // value_zero), the layer's reserved buffers (codes [B, heads, capacity > past, head_dim] uint8, scales and zeros
  // [B, heads, capacity, 1] float32); this step's key and value are quantized into position `past` with the codes'
  // range [qmin, qmax]. Returns (hidden states, whether every quantized row was finite): where one was not, the caller
  // must not take position `past` as filled.
  std::pair<at::Tensor, bool> step_int8(const at::Tensor& hidden, const std::vector<std::vector<at::Tensor>>& caches,
                                        int64_t past, const at::Tensor& cos, const at::Tensor& sin,
                                        const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& logn,
                                        double qmin, double qmax) {
    check_step(hidden, past, cos, sin, mask, logn);
    TORCH_CHECK(caches.size() == blocks_.size(), "one cache layer per block");
    const int64_t B = hidden.size(0);
    std::vector<Int8Layer> layers;
    for (const auto& c : caches) {
      TORCH_CHECK(c.size() == 6, "an int8 cache layer is (q_key, key_scale, key_zero, q_value, value_scale, "
                  "value_zero)");
      for (int i : {0, 3}) check_buffer(c[i], at::kByte, B, heads_, past, head_dim_, "int8 codes");
      for (int i : {1, 2, 4, 5}) check_buffer(c[i], at::kFloat, B, heads_, past, 1, "int8 scales and zeros");
      for (int i = 1; i < 6; ++i)
        TORCH_CHECK(c[i].size(2) == c[0].size(2), "an int8 cache layer's buffers must have one capacity");
      layers.push_back({c[0].data_ptr<uint8_t>(), c[1].data_ptr<float>(), c[2].data_ptr<float>(),
                        c[3].data_ptr<uint8_t>(), c[4].data_ptr<float>(), c[5].data_ptr<float>(), c[0].size(2),
                        static_cast<float>(qmin), static_cast<float>(qmax)});
    }
    return run(hidden, layers, past, cos, sin, mask, logn);
  }

 private:
  void check_step(const at::Tensor& hidden, int64_t past, const at::Tensor& cos, const at::Tensor& sin,
                  const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& logn) const {
    TORCH_CHECK(hidden.device().is_cpu() && hidden.scalar_type() == at::kFloat && hidden.dim() == 2 &&
                    hidden.size(1) == hidden_ && hidden.size(0) > 0 && hidden.is_contiguous(),
                "hidden must be a contiguous float32 CPU tensor [batch, ", hidden_, "]");
    TORCH_CHECK(past >= 0, "past must be >= 0");
    const int64_t B = hidden.size(0), D = head_dim_;
    for (const auto* t : {&cos, &sin})
      TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 4 &&
                      (t->size(0) == 1 || t->size(0) == B) && t->size(1) == 1 && t->size(2) == 1 &&
                      t->size(3) == D && t->is_contiguous(),
                  "cos and sin must be contiguous float32 [1 or batch, 1, 1, ", D, "]");
    if (mask.has_value() && mask->defined())
      TORCH_CHECK(mask->scalar_type() == at::kFloat && mask->dim() == 4 && mask->size(1) == 1 && mask->size(2) == 1 &&
                      mask->size(3) == past + 1 && (mask->size(0) == 1 || mask->size(0) == B),
                  "mask must be float32 [1 or batch, 1, 1, ", past + 1, "]");
    if (logn.has_value() && logn->defined())
      TORCH_CHECK(logn->device().is_cpu() && logn->scalar_type() == at::kFloat && logn->dim() == 1 &&
                      logn->size(0) == B && logn->is_contiguous(),
                  "logn must be a contiguous float32 CPU tensor [", B, "]");
  }

  // Every block for a checked step over `layers` (one cache layer per block, see FloatLayer / Int8Layer).
  template <typename CacheLayer>
  std::pair<at::Tensor, bool> run(const at::Tensor& hidden, const std::vector<CacheLayer>& layers, int64_t past,
                                  const at::Tensor& cos, const at::Tensor& sin, const c10::optional<at::Tensor>& mask,
                                  const c10::optional<at::Tensor>& logn) const {
    const int64_t E = hidden_, H = heads_, D = head_dim_, P = H * D, F = ffn_;
    const int64_t B = hidden.size(0), T = past + 1, R = B * H;
    at::Tensor mask_t;
    if (mask.has_value() && mask->defined()) mask_t = mask->expand({B, H, 1, T});
    const float* logn_p = logn.has_value() && logn->defined() ? logn->data_ptr<float>() : nullptr;
    std::vector<int64_t> parts(blocks_.size() * 5);
    int64_t most = 1;
    for (size_t l = 0; l < blocks_.size(); ++l) {
      const Block& b = blocks_[l];
      const Layer* linears[] = {&b.c_attn, &b.c_proj, &b.w1, &b.w2, &b.mlp_proj};
      for (int i = 0; i < 5; ++i) most = std::max(most, parts[l * 5 + i] = gptq_gemv::word_parts(*linears[i]));
    }
    // Partial outputs, one buffer per GEMV in a row of three (c_attn and w1 / c_proj / w2 and the MLP's c_proj), so
    // a GEMV never writes parts that a slower thread may still be summing.
    std::vector<float> part_a(most * B * std::max(3 * P, F)), part_b(most * B * E), part_c(most * B * F);
    const int64_t blocks_per_row = one_pass::num_blocks(T), units = R * blocks_per_row;
    std::vector<float> unit_acc(units * D), unit_max(units), unit_sum(units), attended(R * D);
    one_pass::SplitSoftmax split{R, 1, T, D, H, mask_t.defined() ? mask_t.data_ptr<float>() : nullptr, {0, 0, 0, 0},
                                 scale_, unit_acc.data(), unit_max.data(), unit_sum.data()};
    if (mask_t.defined())
      for (int d = 0; d < 4; ++d) split.mask_stride[d] = mask_t.stride(d);
    at::Tensor out = hidden.clone();
    const int threads = std::max(1, at::get_num_threads());
    std::vector<char> finite(threads, 1);
#pragma omp parallel num_threads(threads)
    {
      const int tid = omp_get_thread_num(), n = omp_get_num_threads();
      std::vector<float> h(out.data_ptr<float>(), out.data_ptr<float>() + B * E), x(B * E), qkv(B * 3 * P),
          query(R * D), key(D), y(B * E), up(B * F), gate(B * F);
      for (size_t l = 0; l < blocks_.size(); ++l) {
        const Block& b = blocks_[l];
        const int64_t* lp = parts.data() + l * 5;
        for (int64_t r = 0; r < B; ++r)
          decode_ops::rms_norm_row(h.data() + r * E, b.ln_1.data_ptr<float>(), E, eps_, x.data() + r * E);
        run_gemv(x.data(), B, b.c_attn, lp[0], part_a.data(), qkv.data(), tid, n);
        for (int64_t r = 0; r < R; ++r) {  // r = (sequence, head): its rotated query; its key and value cached
          const int64_t i = r / H, head = r % H, ci = cos.size(0) == 1 ? 0 : i;
          const float* c = cos.data_ptr<float>() + ci * D;
          const float* s = sin.data_ptr<float>() + ci * D;
          const float* row = qkv.data() + i * 3 * P;
          decode_ops::rotate_head(row + head * D, c, s, D, query.data() + r * D);
          if (logn_p != nullptr)
            for (int64_t d = 0; d < D; ++d) query[r * D + d] *= logn_p[i];
          if (r % n != tid) continue;
          decode_ops::rotate_head(row + P + head * D, c, s, D, key.data());
          if (!layers[l].append(r, past, key.data(), row + 2 * P + head * D, D)) finite[tid] = 0;
        }
#pragma omp barrier
        attend(split, layers[l], query.data(), units, blocks_per_row, attended.data(), tid, n);
        run_gemv(attended.data(), B, b.c_proj, lp[1], part_b.data(), y.data(), tid, n);
        for (int64_t k = 0; k < B * E; ++k) h[k] += y[k];
        for (int64_t r = 0; r < B; ++r)
          decode_ops::rms_norm_row(h.data() + r * E, b.ln_2.data_ptr<float>(), E, eps_, x.data() + r * E);
        gemv_parts(x.data(), B, b.w1, lp[2], part_a.data(), tid, n);  // summed after w2's barrier
        run_gemv(x.data(), B, b.w2, lp[3], part_c.data(), gate.data(), tid, n);
        gptq_gemv::sum_parts(part_a.data(), lp[2], B, F, gptq_gemv::bias_data(b.w1.bias), up.data());
        at::Tensor gate_t = at::from_blob(gate.data(), {B, F}, at::TensorOptions().dtype(at::kFloat));
        const at::Tensor silu = at::silu(gate_t);
        const float* sp = silu.data_ptr<float>();
        for (int64_t k = 0; k < B * F; ++k) up[k] *= sp[k];
        run_gemv(up.data(), B, b.mlp_proj, lp[4], part_b.data(), y.data(), tid, n);
        for (int64_t k = 0; k < B * E; ++k) h[k] += y[k];
      }
      if (tid == 0) std::copy(h.begin(), h.end(), out.data_ptr<float>());
    }
    return {out, std::all_of(finite.begin(), finite.end(), [](char f) { return f != 0; })};
  }

  // This thread's word blocks (parts) of x [rows, K] through `layer` into partial, for this plan's bits.
  void gemv_parts(const float* x, int64_t rows, const Layer& layer, int64_t parts, float* partial, int tid,
                  int threads) const {
    const int64_t size = rows * outputs(layer), k = inputs(layer, bits_);
    for (int64_t part = tid; part < parts; part += threads) {
      float* out = partial + part * size;
      if (bits_ == 2) gptq_gemv::gemv_part<2>(x, rows, k, layer, out, part, parts);
      else if (bits_ == 4) gptq_gemv::gemv_part<4>(x, rows, k, layer, out, part, parts);
      else gptq_gemv::gemv_part<8>(x, rows, k, layer, out, part, parts);
    }
  }

  // The whole GEMV: every thread its parts, then (after the barrier) all parts and the bias summed by every thread
  // into its own y [rows, N].
  void run_gemv(const float* x, int64_t rows, const Layer& layer, int64_t parts, float* partial, float* y, int tid,
                int threads) const {
    gemv_parts(x, rows, layer, parts, partial, tid, threads);
#pragma omp barrier
    gptq_gemv::sum_parts(partial, parts, rows, outputs(layer), gptq_gemv::bias_data(layer.bias), y);
  }

  // The layer's attention: each thread runs a contiguous run of the (row, block) units, then (after a barrier) merges
  // its share of the rows into the shared `attended` [R, head_dim], which every thread reads after the last barrier.
  template <typename CacheLayer>
  void attend(const one_pass::SplitSoftmax& split, const CacheLayer& layer, const float* query, int64_t units,
              int64_t blocks_per_row, float* attended, int tid, int threads) const {
    auto run = [&](auto rows) {
      auto score = [&](int64_t r, int64_t i, int64_t t) { return rows.score(r, i, t); };
      auto weigh = [&](float* acc, int64_t r, int64_t t0, int64_t t1, const float* p) {
        rows.weigh(acc, r, t0, t1, p);
      };
      for (int64_t u = units * tid / threads; u < units * (tid + 1) / threads; ++u)
        split.unit(u / blocks_per_row, u % blocks_per_row, score, weigh);
    };
    if (head_dim_ == 64) run(layer.template rows<64>(query));
    else run(layer.template rows<128>(query));
#pragma omp barrier
    for (int64_t r = tid; r < split.R; r += threads) split.merge(r, attended + r * head_dim_);
#pragma omp barrier
  }

  int64_t bits_, heads_, hidden_ = 0, head_dim_ = 0, ffn_ = 0;
  float eps_, scale_;
  std::vector<Block> blocks_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<DecodePlan>(m, "DecodePlan")
      .def(py::init<const std::vector<py::tuple>&, int64_t, int64_t, double, double>(), py::arg("blocks"),
           py::arg("bits"), py::arg("heads"), py::arg("eps"), py::arg("scale"))
      .def("step", &DecodePlan::step, py::arg("hidden"), py::arg("keys"), py::arg("values"), py::arg("past"),
           py::arg("cos"), py::arg("sin"), py::arg("mask") = py::none(), py::arg("logn") = py::none(),
           "hidden [batch, E] of one decoded token through every block; writes its keys and values at `past`")
      .def("step_int8", &DecodePlan::step_int8, py::arg("hidden"), py::arg("caches"), py::arg("past"), py::arg("cos"),
           py::arg("sin"), py::arg("mask") = py::none(), py::arg("logn") = py::none(), py::arg("qmin") = 0.0,
           py::arg("qmax") = 255.0,
           "step over the int8 token-layout cache; returns (hidden, whether every quantized row was finite)");
}
