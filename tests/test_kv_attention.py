"""Tests for the torch reference attention over a quantized cache and the backend dispatcher."""
import math

import pytest
import torch

from kvcache.quantize_cache import dequantize_cache_torch
from kvcache.quantized_attention import attention_torch, quantized_attention
from kvcache.quantized_cache import QuantizedKVCache


def _layer(bits, b=2, h=3, kv=9, d=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, h, kv, d, generator=g).to(dtype)
    v = torch.randn(b, h, kv, d, generator=g).to(dtype)
    return QuantizedKVCache(bits=bits, key_layout="token").update(k, v, 0), k, v


def _float_attention(q, k, v, mask, scale):
    scores = q.double() @ k.double().transpose(-1, -2) * scale
    if mask is not None:
        scores = scores + mask.double()
    return torch.softmax(scores, -1) @ v.double()


@pytest.mark.parametrize("bits", (8, 4))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
def test_matches_attention_over_dequantized_cache(bits, dtype):
    layer_past, _, _ = _layer(bits, dtype=dtype)
    q = torch.randn(2, 3, 4, 16).to(dtype)
    mask = torch.zeros(2, 1, 4, 9)
    mask[0, :, :, :3] = torch.finfo(torch.float32).min  # left padding of batch row 0
    out = attention_torch(q, layer_past, mask)
    assert out.dtype == dtype and out.shape == (2, 3, 4, 16)
    (qk, ks, kz), (qv, vs, vz) = layer_past
    k = dequantize_cache_torch(qk, ks, kz, bits=bits)
    v = dequantize_cache_torch(qv, vs, vz, bits=bits)
    ref = _float_attention(q, k, v, mask, 1 / math.sqrt(16))
    tol = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}[dtype]
    assert torch.allclose(out.double(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("bits,tol", ((8, 0.03), (4, 0.4)))
def test_close_to_unquantized_attention(bits, tol):
    layer_past, k, v = _layer(bits, kv=33, d=32)
    q = torch.randn(2, 3, 1, 32)
    out = attention_torch(q, layer_past, None, scale=0.2)
    ref = _float_attention(q, k, v, None, 0.2)
    assert (out.double() - ref).abs().max() < tol


def test_mask_removes_positions_and_scale_is_used():
    layer_past, _, _ = _layer(8, b=1, h=1, kv=6)
    q = torch.randn(1, 1, 1, 16)
    mask = torch.zeros(1, 1, 1, 6)
    mask[..., 4:] = -1e9
    (qk, ks, kz), (qv, vs, vz) = layer_past
    truncated = ((qk[:, :, :4], ks[:, :, :4], kz[:, :, :4]), (qv[:, :, :4], vs[:, :, :4], vz[:, :, :4]))
    assert torch.allclose(attention_torch(q, layer_past, mask, scale=0.5), attention_torch(q, truncated, None, 0.5))
    assert not torch.allclose(attention_torch(q, layer_past, None, 0.5), attention_torch(q, layer_past, None, 2.0))


def test_softmax_precision_flag_and_invalid_inputs():
    layer_past, _, _ = _layer(8, dtype=torch.float16)
    q = torch.randn(2, 3, 1, 16, dtype=torch.float16)
    a = attention_torch(q, layer_past, None, softmax_in_fp32=True)
    b = attention_torch(q, layer_past, None, softmax_in_fp32=False)
    assert torch.allclose(a.float(), b.float(), atol=5e-3)
    with pytest.raises(ValueError, match="additive floating-point"):
        attention_torch(q, layer_past, torch.ones(2, 1, 1, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="broadcast"):
        attention_torch(q, layer_past, torch.zeros(2, 1, 1, 8))
    with pytest.raises(ValueError, match="neither 8-bit nor 4-bit"):
        attention_torch(torch.randn(2, 3, 1, 12), layer_past)
    with pytest.raises(ValueError, match="backend"):
        quantized_attention(q, layer_past, None, None, backend="flash")


def test_dispatcher_on_cpu_uses_blocked_path():
    from kvcache.blocked_attention import attention_blocked

    layer_past, _, _ = _layer(4)
    q = torch.randn(2, 3, 2, 16)
    ref = attention_torch(q, layer_past, None, 0.3)
    blocked = attention_blocked(q, layer_past, None, 0.3)
    torch.testing.assert_close(quantized_attention(q, layer_past, None, 0.3), blocked, atol=1e-6, rtol=1e-6)
    assert torch.equal(quantized_attention(q, layer_past, None, 0.3, backend="torch"), ref)
    # no CUDA here: the "cuda" backend falls back to the blocked path
    torch.testing.assert_close(quantized_attention(q, layer_past, None, 0.3, backend="cuda"), blocked, atol=1e-6,
                               rtol=1e-6)
    torch.testing.assert_close(blocked, ref, atol=1e-5, rtol=1e-5)


def test_fresh_chunk_is_read_in_full_precision():
    """With `fresh`, the last n positions come from the float key/value, the rest from the quantized cache."""
    from kvcache.quantize_cache import dequantize_cache_torch, quantize_cache_v
    from kvcache.quantized_attention import attention_torch, quantized_attention

    g = torch.Generator().manual_seed(3)
    key, value = torch.randn(2, 3, 20, 16, generator=g), torch.randn(2, 3, 20, 16, generator=g)
    query = torch.randn(2, 3, 5, 16, generator=g)
    layer_past = (quantize_cache_v(key, 4, 15, 0), quantize_cache_v(value, 4, 15, 0))
    k_ref = torch.cat([dequantize_cache_torch(*layer_past[0], bits=4)[..., :15, :], key[..., 15:, :]], dim=-2)
    v_ref = torch.cat([dequantize_cache_torch(*layer_past[1], bits=4)[..., :15, :], value[..., 15:, :]], dim=-2)
    expected = torch.softmax(query @ k_ref.transpose(-1, -2) / 4.0, dim=-1) @ v_ref
    fresh = (key[..., 15:, :], value[..., 15:, :])
    torch.testing.assert_close(attention_torch(query, layer_past, None, 0.25, fresh=fresh), expected)
    torch.testing.assert_close(quantized_attention(query, layer_past, None, 0.25, backend="triton", fresh=fresh),
                               expected)
    plain = attention_torch(query, layer_past, None, 0.25)
    assert (plain - expected).abs().max() > 1e-3
