// Python binding of the quantized KV-cache CUDA kernels, with the entry points and argument order of the original
// Qwen `cache_autogptq_cuda_256` extension (8-bit) plus 4-bit counterparts for the packed layout.
#include <torch/extension.h>
#include <c10/cuda/CUDAGuard.h>

void cache_scores_cuda(const at::Tensor& query, const at::Tensor& key_t, at::Tensor& out, const at::Tensor& scale,
                       const at::Tensor& zero, int bits);
void cache_weighted_sum_cuda(const at::Tensor& probs, const at::Tensor& value, at::Tensor& out,
                             const at::Tensor& scale, const at::Tensor& zero, int bits);

namespace {

void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t dim) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dims, got ", t.dim());
}

void check_scale_zero(const at::Tensor& scale, const at::Tensor& zero, int64_t b, int64_t h, int64_t seq) {
  check_tensor(scale, "scale", at::kHalf, 4);
  check_tensor(zero, "zero", at::kHalf, 4);
  const std::vector<int64_t> expected{b, h, seq, 1};
  TORCH_CHECK(scale.sizes() == expected, "scale must be [b, h, seq, 1] = ", expected, ", got ", scale.sizes());
  TORCH_CHECK(zero.sizes() == expected, "zero must be [b, h, seq, 1] = ", expected, ", got ", zero.sizes());
}

// query [b, h, q, d] fp16, key_t [b, h, d (or d/2), seq] uint8, out [b, h, q, seq] fp16 (accumulated into).
void scores(at::Tensor query, at::Tensor key_t, at::Tensor out, at::Tensor scale, at::Tensor zero, int bits) {
  check_tensor(query, "query", at::kHalf, 4);
  check_tensor(key_t, "q_key_T", at::kByte, 4);
  check_tensor(out, "out", at::kHalf, 4);
  const int64_t b = query.size(0), h = query.size(1), q = query.size(2), d = query.size(3), seq = key_t.size(3);
  const int64_t rows = bits == 8 ? d : d / 2;
  TORCH_CHECK(bits == 8 || d % 2 == 0, "4-bit cache needs an even head_dim");
  TORCH_CHECK(key_t.size(0) == b && key_t.size(1) == h && key_t.size(2) == rows,
              "q_key_T must be [b, h, ", rows, ", seq], got ", key_t.sizes());
  TORCH_CHECK(out.size(0) == b && out.size(1) == h && out.size(2) == q && out.size(3) == seq,
              "out must be [b, h, q_len, seq], got ", out.sizes());
  check_scale_zero(scale, zero, b, h, seq);
  TORCH_CHECK(b * h <= 65535, "batch * heads must be <= 65535 (one grid row each), got ", b * h);
  const at::cuda::OptionalCUDAGuard guard(at::device_of(query));
  cache_scores_cuda(query, key_t, out, scale, zero, bits);
}

// probs [b, h, q, seq] fp16, value [b, h, seq, d (or d/2)] uint8, out [b, h, q, d] fp16 (accumulated into).
void weighted_sum(at::Tensor probs, at::Tensor value, at::Tensor out, at::Tensor scale, at::Tensor zero, int bits) {
  check_tensor(probs, "probs", at::kHalf, 4);
  check_tensor(value, "q_value", at::kByte, 4);
  check_tensor(out, "out", at::kHalf, 4);
  const int64_t b = probs.size(0), h = probs.size(1), q = probs.size(2), seq = probs.size(3), d = out.size(3);
  const int64_t width = bits == 8 ? d : d / 2;
  TORCH_CHECK(bits == 8 || d % 2 == 0, "4-bit cache needs an even head_dim");
  TORCH_CHECK(value.size(0) == b && value.size(1) == h && value.size(2) == seq && value.size(3) == width,
              "q_value must be [b, h, seq, ", width, "], got ", value.sizes());
  TORCH_CHECK(out.size(0) == b && out.size(1) == h && out.size(2) == q, "out must be [b, h, q_len, d], got ",
              out.sizes());
  check_scale_zero(scale, zero, b, h, seq);
  TORCH_CHECK(b * h <= 65535, "batch * heads must be <= 65535 (one grid row each), got ", b * h);
  const at::cuda::OptionalCUDAGuard guard(at::device_of(probs));
  cache_weighted_sum_cuda(probs, value, out, scale, zero, bits);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("vecquant8matmul_batched_faster_old",
        [](at::Tensor query, at::Tensor q_key_t, at::Tensor out, at::Tensor scale, at::Tensor zero) {
          scores(query, q_key_t, out, scale, zero, 8);
        },
        "out += query @ dequant(q_key_T), uint8 cache");
  m.def("vecquant8matmul_batched_column_compression_faster_old",
        [](at::Tensor probs, at::Tensor q_value, at::Tensor out, at::Tensor scale, at::Tensor zero) {
          weighted_sum(probs, q_value, out, scale, zero, 8);
        },
        "out += probs @ dequant(q_value), uint8 cache");
  m.def("vecquant4matmul_batched_faster_old",
        [](at::Tensor query, at::Tensor q_key_t, at::Tensor out, at::Tensor scale, at::Tensor zero) {
          scores(query, q_key_t, out, scale, zero, 4);
        },
        "out += query @ dequant(q_key_T), packed 4-bit cache");
  m.def("vecquant4matmul_batched_column_compression_faster_old",
        [](at::Tensor probs, at::Tensor q_value, at::Tensor out, at::Tensor scale, at::Tensor zero) {
          weighted_sum(probs, q_value, out, scale, zero, 4);
        },
        "out += probs @ dequant(q_value), packed 4-bit cache");
}
