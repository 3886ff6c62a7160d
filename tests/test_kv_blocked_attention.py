"""The blocked attention (codes read block by block, scale/zero algebra) against the dequantize-everything reference.

Tolerances: float32 queries 2e-5 (both compute in float32; only the order of the sums differs). bf16/fp16 queries:
the reference rounds the dequantized keys, the probabilities and the values to the query dtype while the blocked
path stays in float32, so both are compared with a float64 attention over the same dequantized float32 cache:
the blocked path within 1e-5, the reference within its dtype's rounding (fp16 3e-3, bf16 3e-2).
"""
import pytest
import torch

from kvcache.blocked_attention import attention_blocked
from kvcache.quantize_cache import dequantize_cache_torch
from kvcache.quantized_attention import attention_torch, quantized_attention, rotated_keys
from kvcache.quantized_cache import QuantizedKVCache
from kvcache.rotary import rotary_inv_freq

LAYOUTS = ((8, "token"), (4, "token"), (4, "channel_groups"))
MIN = torch.finfo(torch.float32).min


def _layer(bits, layout, b=2, h=3, kv=150, d=16, dtype=torch.float32, pad=(0, 7), seed=0, steps=(1, 1)):
    """A cache layer filled with a prompt of kv - len(steps) positions, then single decode steps; row i of the
    batch has pad[i] left-padding slots (position -1)."""
    g = torch.Generator().manual_seed(seed)
    cache = QuantizedKVCache(bits=bits, key_layout=layout)
    n0 = kv - len(steps)
    positions = torch.arange(n0).expand(b, n0) - torch.tensor(pad[:b])[:, None]
    positions = positions.masked_fill(positions < 0, -1)
    chunks = [(n0, positions)] + [(1, positions[:, -1:] + i + 1) for i in range(len(steps))]
    for n, pos in chunks:
        k, v = (torch.randn(b, h, n, d, generator=g).to(dtype) for _ in range(2))
        layer_past = cache.update(k, v, 0, {"positions": pos})
    mask = torch.zeros(b, 1, 1, kv)
    for i, p in enumerate(pad[:b]):
        mask[i, ..., :p] = MIN
    return layer_past, mask


def _float64_attention(query, layer_past, mask, scale, bits, inv_freq):
    keys, (qv, vs, vz) = layer_past
    if isinstance(keys, tuple) and not hasattr(keys, "positions"):
        k = dequantize_cache_torch(*(t.float() if t.is_floating_point() else t for t in keys), bits=bits)
    else:
        k = rotated_keys(keys._replace(scale=keys.scale.float(), zero=keys.zero.float(),
                                       residual=keys.residual.float()), inv_freq, torch.float32)
    v = dequantize_cache_torch(qv, vs.float(), vz.float(), bits=bits)
    scores = query.double() @ k.double().transpose(-1, -2) * scale
    if mask is not None:
        scores = scores + mask.double()
    return torch.softmax(scores, -1) @ v.double()


@pytest.mark.parametrize("bits,layout", LAYOUTS)
@pytest.mark.parametrize("block", (None, 64, 100))
def test_matches_reference_float32_batch_padding_odd_length(bits, layout, block):
    layer_past, mask = _layer(bits, layout)
    inv_freq = rotary_inv_freq([1.0, 3.0], 16, 10000.0)  # one NTK factor per batch row
    query = torch.randn(2, 3, 1, 16)
    out = attention_blocked(query, layer_past, mask, 0.3, inv_freq=inv_freq, block=block)
    ref = attention_torch(query, layer_past, mask, 0.3, inv_freq=inv_freq)
    assert out.shape == ref.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("bits,layout", LAYOUTS)
@pytest.mark.parametrize("dtype,ref_tol", ((torch.float16, 3e-3), (torch.bfloat16, 3e-2)))
def test_half_precision_queries(bits, layout, dtype, ref_tol):
    layer_past, mask = _layer(bits, layout, dtype=dtype, kv=131)
    inv_freq = rotary_inv_freq([1.0], 16, 10000.0)
    query = torch.randn(2, 3, 2, 16).to(dtype)
    out = attention_blocked(query, layer_past, mask, 0.25, inv_freq=inv_freq, block=64)
    assert out.dtype == dtype
    exact = _float64_attention(query, layer_past, mask, 0.25, bits, inv_freq)
    eps = torch.finfo(dtype).eps
    assert (out.double() - exact).abs().max() <= 2 * eps  # the output's own rounding
    ref = attention_torch(query, layer_past, mask, 0.25, inv_freq=inv_freq)
    assert (ref.double() - exact).abs().max() <= ref_tol


@pytest.mark.parametrize("bits,layout", LAYOUTS)
def test_long_context_small_blocks(bits, layout):
    layer_past, mask = _layer(bits, layout, b=1, h=2, kv=1000, d=32, pad=(5,), steps=(1, 1, 1))
    inv_freq = rotary_inv_freq([1.0], 32, 10000.0)
    query = torch.randn(1, 2, 1, 32) * 3
    ref = attention_torch(query, layer_past, mask, 0.2, inv_freq=inv_freq)
    for block in (64, 192, 5000):
        out = attention_blocked(query, layer_past, mask, 0.2, inv_freq=inv_freq, block=block)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("bits,layout", LAYOUTS)
def test_constant_rows_and_zeros(bits, layout):
    cache = QuantizedKVCache(bits=bits, key_layout=layout)
    k = torch.zeros(1, 2, 70, 8)
    k[:, :, 10:20] = 1.5  # constant rows / channels
    v = torch.full((1, 2, 70, 8), -0.75)
    v[:, :, :5] = 0.0
    layer_past = cache.update(k, v, 0)
    inv_freq = rotary_inv_freq([1.0], 8, 10000.0)
    for query in (torch.zeros(1, 2, 1, 8), torch.randn(1, 2, 1, 8)):
        out = attention_blocked(query, layer_past, None, 0.5, inv_freq=inv_freq, block=64)
        torch.testing.assert_close(out, attention_torch(query, layer_past, None, 0.5, inv_freq=inv_freq),
                                   atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("bits,layout", LAYOUTS)
def test_fresh_prefill_chunk(bits, layout):
    """A prefill chunk reads its own positions from the float key/value, earlier ones from the codes."""
    layer_past, _ = _layer(bits, layout, kv=140, pad=(0, 0), steps=())
    g = torch.Generator().manual_seed(5)
    n = 12
    fresh = (torch.randn(2, 3, n, 16, generator=g), torch.randn(2, 3, n, 16, generator=g))
    query = torch.randn(2, 3, n, 16, generator=g)
    causal = torch.zeros(1, 1, n, 140)
    causal[..., -n:] = torch.triu(torch.full((n, n), MIN), 1)
    inv_freq = rotary_inv_freq([1.0], 16, 10000.0)
    ref = attention_torch(query, layer_past, causal, 0.3, fresh=fresh, inv_freq=inv_freq)
    out = attention_blocked(query, layer_past, causal, 0.3, fresh=fresh, inv_freq=inv_freq, block=64)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(quantized_attention(query, layer_past, causal, 0.3, fresh=fresh, inv_freq=inv_freq),
                               attention_blocked(query, layer_past, causal, 0.3, fresh=fresh, inv_freq=inv_freq),
                               atol=2e-5, rtol=2e-5)  # the dispatcher takes the blocked path (default block)
    without = attention_blocked(query, layer_past, causal, 0.3, inv_freq=inv_freq, block=64)
    assert (without - out).abs().max() > 1e-3


def test_bad_block_and_missing_inv_freq():
    layer_past, _ = _layer(4, "channel_groups")
    query = torch.randn(2, 3, 1, 16)
    with pytest.raises(ValueError, match="inv_freq"):
        attention_blocked(query, layer_past)
    with pytest.raises(ValueError, match="block"):
        attention_blocked(query, _layer(8, "token")[0], block=0)
