"""The compiled CUDA cache kernels against the torch reference (needs a CUDA device and a working build)."""
import pytest
import torch

from kvcache import cpp_kernels
from kvcache.quantize_cache import dequantize_cache_torch
from kvcache.quantized_attention import attention_cuda_kernels, attention_torch
from kvcache.quantized_cache import QuantizedKVCache

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def kernels():
    module = cpp_kernels.load_cache_kernels()
    if module is None:
        pytest.skip("CUDA cache kernels could not be built here")
    return module


def _layer(bits, b=2, h=3, kv=300, d=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, h, kv, d, generator=g).half().cuda()
    v = torch.randn(b, h, kv, d, generator=g).half().cuda()
    return QuantizedKVCache(bits=bits, key_layout="token").update(k, v, 0)


@pytest.mark.parametrize("bits", (8, 4))
def test_raw_entry_points_match_dequantized_matmuls(kernels, bits):
    (qk, ks, kz), (qv, vs, vz) = _layer(bits)
    q = torch.randn(2, 3, 2, 128, device="cuda", dtype=torch.float16)
    k = dequantize_cache_torch(qk, ks, kz, bits=bits).float()
    v = dequantize_cache_torch(qv, vs, vz, bits=bits).float()
    scores = torch.zeros(2, 3, 2, 300, device="cuda", dtype=torch.float16)
    fn = kernels.vecquant8matmul_batched_faster_old if bits == 8 else kernels.vecquant4matmul_batched_faster_old
    fn(q, qk.transpose(-1, -2).contiguous(), scores, ks, kz)
    assert torch.allclose(scores.float(), q.float() @ k.transpose(-1, -2), atol=0.05, rtol=1e-2)
    probs = torch.softmax(torch.randn(2, 3, 2, 300, device="cuda"), -1).half()
    out = torch.zeros(2, 3, 2, 128, device="cuda", dtype=torch.float16)
    fn = (kernels.vecquant8matmul_batched_column_compression_faster_old if bits == 8
          else kernels.vecquant4matmul_batched_column_compression_faster_old)
    fn(probs, qv, out, vs, vz)
    assert torch.allclose(out.float(), probs.float() @ v, atol=5e-3, rtol=1e-2)


@pytest.mark.parametrize("bits", (8, 4))
def test_cuda_backend_matches_reference_with_padding(kernels, bits):
    layer_past = _layer(bits, kv=77, d=64, seed=3)
    q = torch.randn(2, 3, 1, 64, device="cuda", dtype=torch.float16)
    mask = torch.zeros(2, 1, 1, 77, device="cuda")
    mask[1, ..., :20] = torch.finfo(torch.float32).min
    out = attention_cuda_kernels(kernels, q, layer_past, mask, 0.125)
    ref = attention_torch(q, layer_past, mask, 0.125)
    assert torch.allclose(out.float(), ref.float(), atol=5e-3, rtol=1e-2)
