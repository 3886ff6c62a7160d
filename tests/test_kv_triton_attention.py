"""The fused Triton kernel (run by the Triton interpreter on CPU) against the torch reference attention."""
import os

import pytest
import torch

from kvcache.quantized_attention import attention_torch, quantized_attention
from kvcache.quantized_cache import QuantizedKVCache

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs CUDA or the Triton interpreter",
)
triton_attention = pytest.importorskip("kvcache.triton_attention")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 4e-3}
NEG = torch.finfo(torch.float32).min


def _layer(bits, b, h, kv, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    cache = QuantizedKVCache(bits=bits, key_layout="token")
    split = max(kv - 2, 1)  # prefill + decode-style appends, as the model fills it
    k = torch.randn(b, h, kv, d, generator=g).to(dtype).to(DEVICE)
    v = torch.randn(b, h, kv, d, generator=g).to(dtype).to(DEVICE)
    layer_past = cache.update(k[:, :, :split], v[:, :, :split], 0)
    for pos in range(split, kv):
        layer_past = cache.update(k[:, :, pos:pos + 1], v[:, :, pos:pos + 1], 0)
    return layer_past


def _check(out, ref, dtype):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert torch.allclose(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype]), float(
        (out.float() - ref.float()).abs().max()
    )


@pytest.mark.parametrize("bits", (8, 4))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
@pytest.mark.parametrize("kv", (1, 31, 33, 70))
def test_decode_with_left_padding(bits, dtype, kv):
    b, h, d = 3, 2, 64
    layer_past = _layer(bits, b, h, kv, d, dtype, seed=kv)
    q = torch.randn(b, h, 1, d).to(dtype).to(DEVICE)
    mask = torch.zeros(b, 1, 1, kv, device=DEVICE)
    mask[1, ..., : kv // 2] = NEG  # row 1 is left-padded
    mask[2, ..., : kv - 1] = NEG  # row 2 sees a single position
    ref = attention_torch(q, layer_past, mask, scale=0.125)
    _check(triton_attention.attention_triton(q, layer_past, mask, scale=0.125), ref, dtype)


@pytest.mark.parametrize("bits", (8, 4))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
def test_short_prefill_with_causal_and_padding_mask(bits, dtype):
    b, h, q_len, past, d = 2, 3, 5, 12, 32
    kv = past + q_len
    layer_past = _layer(bits, b, h, kv, d, dtype, seed=7)
    q = torch.randn(b, h, q_len, d).to(dtype).to(DEVICE)
    causal = torch.ones(q_len, kv, dtype=torch.bool, device=DEVICE).tril(diagonal=past)
    mask = torch.zeros(b, 1, q_len, kv, device=DEVICE).masked_fill(~causal, NEG)
    mask[0, ..., :3] = NEG
    ref = attention_torch(q, layer_past, mask)
    _check(triton_attention.attention_triton(q, layer_past, mask), ref, dtype)


@pytest.mark.parametrize("bits", (8, 4))
def test_per_head_mask_odd_head_dim_and_no_mask(bits):
    dtype = torch.float32
    b, h, q_len, kv, d = 2, 3, 17, 9, 48  # q_len > BLOCK_M, head_dim not a power of two
    layer_past = _layer(bits, b, h, kv, d, dtype, seed=3)
    q = torch.randn(b, h, q_len, d).to(DEVICE)
    mask = torch.randn(b, h, q_len, kv, device=DEVICE)
    _check(triton_attention.attention_triton(q, layer_past, mask), attention_torch(q, layer_past, mask), dtype)
    _check(triton_attention.attention_triton(q, layer_past, None), attention_torch(q, layer_past, None), dtype)


def test_dispatcher_triton_backend_and_errors():
    layer_past = _layer(8, 2, 2, 10, 16, torch.float16, seed=1)
    q = torch.randn(2, 2, 1, 16, dtype=torch.float16, device=DEVICE)
    out = quantized_attention(q, layer_past, None, 0.25, backend="triton")
    _check(out, attention_torch(q, layer_past, None, 0.25), torch.float16)
    with pytest.raises(ValueError, match="broadcast"):
        triton_attention.attention_triton(q, layer_past, torch.zeros(2, 1, 1, 3, device=DEVICE))
    with pytest.raises(ValueError, match="additive floating-point"):
        triton_attention.attention_triton(q, layer_past, torch.ones(2, 1, 1, 10, dtype=torch.bool, device=DEVICE))
