// CUDA kernels for attention over a quantized KV cache (uint8, or two 4-bit values per byte along head_dim).
//
// Dequantization is scale[b,h,s] * (q - zero[b,h,s]) with one fp16 scale/zero per cached position (token
// granularity; the original per-chunk layout repeats the same values along seq, so it is covered too).
// Both kernels accumulate into `out` (callers pass it zero-initialised), matching the original entry points.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_fp16.h>
#include <cstdint>

namespace {

constexpr int kThreads = 128;

// Scores: out[bh, r, s] += sum_d query[bh, r, d] * scale[bh, s] * (key_t[bh, d, s] - zero[bh, s]).
// key_t is the transposed cache [bh, rows, seq] (rows = head_dim, or head_dim / 2 packed): one thread per cached
// position s, so a warp reads consecutive bytes of each row. The query row is staged in shared memory.
template <int BITS>
__global__ void scores_kernel(const half* __restrict__ query, const uint8_t* __restrict__ key_t,
                              half* __restrict__ out, const half* __restrict__ scale,
                              const half* __restrict__ zero, int q_len, int head_dim, int seq) {
  extern __shared__ float q_row[];
  const int bh = blockIdx.y;
  const int s = blockIdx.x * blockDim.x + threadIdx.x;
  const bool active = s < seq;
  const int rows = BITS == 8 ? head_dim : head_dim / 2;
  const uint8_t* key = key_t + static_cast<size_t>(bh) * rows * seq;
  const float sc = active ? __half2float(scale[static_cast<size_t>(bh) * seq + s]) : 0.f;
  const float zr = active ? __half2float(zero[static_cast<size_t>(bh) * seq + s]) : 0.f;

  for (int r = 0; r < q_len; ++r) {
    __syncthreads();
    const half* q = query + (static_cast<size_t>(bh) * q_len + r) * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) q_row[d] = __half2float(q[d]);
    __syncthreads();
    if (!active) continue;
    float dot = 0.f;
    for (int j = 0; j < rows; ++j) {
      const uint8_t byte = key[static_cast<size_t>(j) * seq + s];
      if (BITS == 8) {
        dot += q_row[j] * (static_cast<float>(byte) - zr);
      } else {
        dot += q_row[2 * j] * (static_cast<float>(byte & 0xF) - zr);
        dot += q_row[2 * j + 1] * (static_cast<float>(byte >> 4) - zr);
      }
    }
    const size_t o = (static_cast<size_t>(bh) * q_len + r) * seq + s;
    out[o] = __float2half(__half2float(out[o]) + sc * dot);
  }
}

// Weighted sum: out[bh, r, d] += sum_s probs[bh, r, s] * scale[bh, s] * (value[bh, s, d] - zero[bh, s]).
// value is the cache [bh, seq, width] (width = head_dim, or head_dim / 2 packed): one thread per output dim d.
template <int BITS>
__global__ void weighted_sum_kernel(const half* __restrict__ probs, const uint8_t* __restrict__ value,
                                    half* __restrict__ out, const half* __restrict__ scale,
                                    const half* __restrict__ zero, int q_len, int seq, int head_dim) {
  const int bh = blockIdx.y;
  const int d = blockIdx.x * blockDim.x + threadIdx.x;
  if (d >= head_dim) return;
  const int width = BITS == 8 ? head_dim : head_dim / 2;
  const int col = BITS == 8 ? d : d / 2;
  const int shift = BITS == 8 ? 0 : (d % 2) * 4;
  const uint8_t* v = value + static_cast<size_t>(bh) * seq * width + col;
  const half* sc = scale + static_cast<size_t>(bh) * seq;
  const half* zr = zero + static_cast<size_t>(bh) * seq;

  for (int r = 0; r < q_len; ++r) {
    const half* p = probs + (static_cast<size_t>(bh) * q_len + r) * seq;
    float acc = 0.f;
    for (int s = 0; s < seq; ++s) {
      int qv = v[static_cast<size_t>(s) * width];
      if (BITS == 4) qv = (qv >> shift) & 0xF;
      acc += __half2float(p[s]) * __half2float(sc[s]) * (static_cast<float>(qv) - __half2float(zr[s]));
    }
    const size_t o = (static_cast<size_t>(bh) * q_len + r) * head_dim + d;
    out[o] = __float2half(__half2float(out[o]) + acc);
  }
}

template <typename T>
T* ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

}  // namespace

// query [b, h, q_len, head_dim] fp16; key_t [b, h, rows, seq] uint8; out [b, h, q_len, seq] fp16;
// scale/zero [b, h, seq, 1] fp16. Shapes and dtypes are checked by the caller (the C++ binding).
void cache_scores_cuda(const at::Tensor& query, const at::Tensor& key_t, at::Tensor& out, const at::Tensor& scale,
                       const at::Tensor& zero, int bits) {
  const int bh = static_cast<int>(query.size(0) * query.size(1));
  const int q_len = static_cast<int>(query.size(2));
  const int head_dim = static_cast<int>(query.size(3));
  const int seq = static_cast<int>(key_t.size(3));
  if (bh == 0 || q_len == 0 || seq == 0) return;
  const dim3 grid((seq + kThreads - 1) / kThreads, bh);
  const size_t shared = static_cast<size_t>(head_dim) * sizeof(float);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (bits == 8) {
    scores_kernel<8><<<grid, kThreads, shared, stream>>>(ptr<half>(query), ptr<uint8_t>(key_t), ptr<half>(out),
                                                         ptr<half>(scale), ptr<half>(zero), q_len, head_dim, seq);
  } else {
    scores_kernel<4><<<grid, kThreads, shared, stream>>>(ptr<half>(query), ptr<uint8_t>(key_t), ptr<half>(out),
                                                         ptr<half>(scale), ptr<half>(zero), q_len, head_dim, seq);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// probs [b, h, q_len, seq] fp16; value [b, h, seq, width] uint8; out [b, h, q_len, head_dim] fp16;
// scale/zero [b, h, seq, 1] fp16.
void cache_weighted_sum_cuda(const at::Tensor& probs, const at::Tensor& value, at::Tensor& out,
                             const at::Tensor& scale, const at::Tensor& zero, int bits) {
  const int bh = static_cast<int>(probs.size(0) * probs.size(1));
  const int q_len = static_cast<int>(probs.size(2));
  const int seq = static_cast<int>(probs.size(3));
  const int head_dim = static_cast<int>(out.size(3));
  if (bh == 0 || q_len == 0 || seq == 0) return;
  const dim3 grid((head_dim + kThreads - 1) / kThreads, bh);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (bits == 8) {
    weighted_sum_kernel<8><<<grid, kThreads, 0, stream>>>(ptr<half>(probs), ptr<uint8_t>(value), ptr<half>(out),
                                                          ptr<half>(scale), ptr<half>(zero), q_len, seq, head_dim);
  } else {
    weighted_sum_kernel<4><<<grid, kThreads, 0, stream>>>(ptr<half>(probs), ptr<uint8_t>(value), ptr<half>(out),
                                                          ptr<half>(scale), ptr<half>(zero), q_len, seq, head_dim);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
