"""Tests for QuantizedKVCache through real transformers Cache method calls, and cache_nbytes."""
import pytest
import torch
from transformers import DynamicCache

from kvcache.quantize_cache import dequantize_cache_torch, quantize_cache_v
from kvcache.quantized_cache import QuantizedKVCache, QuantizedKVLayer, cache_nbytes


def _states(b=2, h=3, s=5, d=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, s, d, generator=g).to(dtype), torch.randn(b, h, s, d, generator=g).to(dtype))


def _fill(cache, layers=2, steps=(5, 1, 1), b=2, dtype=torch.float32, d=8):
    """Prefill then decode steps; returns the float states fed per layer, concatenated along seq."""
    fed = {i: ([], []) for i in range(layers)}
    for step, n in enumerate(steps):
        for layer in range(layers):
            k, v = _states(b=b, s=n, d=d, dtype=dtype, seed=100 * step + layer)
            cache.update(k, v, layer)
            fed[layer][0].append(k)
            fed[layer][1].append(v)
    return {i: (torch.cat(ks, 2), torch.cat(vs, 2)) for i, (ks, vs) in fed.items()}


@pytest.mark.parametrize("bits", (8, 4))
def test_update_returns_whole_quantized_layer(bits):
    cache = QuantizedKVCache(bits=bits, key_layout="token")
    fed = _fill(cache, steps=(5, 1, 2))
    k, v = _states(s=1, seed=999)
    (qk, ks, kz), (qv, vs, vz) = cache.update(k, v, 1)
    full_k = torch.cat((fed[1][0], k), 2)
    full_v = torch.cat((fed[1][1], v), 2)
    assert qk.shape == (2, 3, 9, 8 if bits == 8 else 4) and ks.shape == kz.shape == (2, 3, 9, 1)
    ref_k = quantize_cache_v(full_k, bits, 2**bits - 1, 0)
    ref_v = quantize_cache_v(full_v, bits, 2**bits - 1, 0)
    # token granularity: quantizing chunk by chunk equals quantizing everything at once
    for got, ref in zip((qk, ks, kz, qv, vs, vz), (*ref_k, *ref_v)):
        assert torch.equal(got, ref)
    deq = dequantize_cache_torch(qv, vs, vz, bits=bits)
    assert (deq - full_v).abs().max() <= vs.max()


def test_chunk_granularity_quantizes_each_update_separately():
    cache = QuantizedKVCache(bits=8, granularity="chunk")
    k1, v1 = _states(s=4, seed=1)
    k2, v2 = _states(s=1, seed=2)
    cache.update(k1, v1, 0)
    (qk, ks, kz), _ = cache.update(k2, v2, 0)
    q255, q0 = torch.tensor(255.0), torch.tensor(0.0)
    r1 = quantize_cache_v(k1, 8, q255, q0, granularity="chunk")
    r2 = quantize_cache_v(k2, 8, q255, q0, granularity="chunk")
    assert torch.equal(qk, torch.cat((r1[0], r2[0]), 2))
    assert torch.equal(ks, torch.cat((r1[1], r2[1]), 2))
    assert not cache.is_croppable
    with pytest.raises(ValueError, match="chunk"):
        QuantizedKVCache(bits=4, granularity="chunk")


def test_seq_length_and_mask_sizes():
    cache = QuantizedKVCache(bits=8)
    assert cache.get_seq_length() == 0
    assert cache.get_mask_sizes(4, 0) == (4, 0)
    _fill(cache, steps=(5, 1))
    assert cache.get_seq_length() == 6 and cache.get_seq_length(1) == 6
    assert cache.get_mask_sizes(1, 0) == (7, 0)
    assert len(cache) == 2


def test_crop_restores_earlier_state():
    cache = QuantizedKVCache(bits=4, key_layout="token")
    reference = QuantizedKVCache(bits=4, key_layout="token")
    _fill(cache, steps=(5, 1, 1))
    _fill(reference, steps=(5,))
    assert cache.is_croppable
    cache.crop(-2)
    assert cache.get_seq_length() == 5
    for layer, ref in zip(cache.layers, reference.layers):
        for name in ("q_key", "key_scale", "key_zero", "q_value", "value_scale", "value_zero"):
            assert torch.equal(getattr(layer, name), getattr(ref, name))
    with pytest.raises(ValueError, match="negative"):
        cache.crop(3)


def test_batch_operations():
    cache = QuantizedKVCache(bits=8)
    _fill(cache, steps=(4, 1), b=3)
    before = [t.clone() for t in cache.layers[0]._states()]
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    for t, old in zip(cache.layers[0]._states(), before):
        assert torch.equal(t, old[[2, 0, 1]])
    cache.batch_select_indices(torch.tensor([1, 2]))
    for t, old in zip(cache.layers[0]._states(), before):
        assert torch.equal(t, old[[0, 1]])
    cache.batch_repeat_interleave(2)
    for t, old in zip(cache.layers[1]._states(), before):
        assert t.shape[0] == 4
    assert torch.equal(cache.layers[0].q_key, before[0][[0, 0, 1, 1]])


def test_reset_empties_and_allows_refill():
    cache = QuantizedKVCache(bits=8)
    _fill(cache)
    assert cache_nbytes(cache) > 0
    cache.reset()
    assert cache.get_seq_length() == 0 and cache_nbytes(cache) == 0
    _fill(cache, steps=(3,))
    assert cache.get_seq_length() == 3


def test_config_preallocates_layers():
    class Cfg:
        num_hidden_layers = 4

    cache = QuantizedKVCache(bits=8, config=Cfg())
    assert len(cache) == 4 and all(isinstance(layer, QuantizedKVLayer) for layer in cache.layers)


@pytest.mark.parametrize("bits", (8, 4))
def test_cache_nbytes_exact(bits):
    b, h, s, d = 2, 3, 7, 8
    dtype = torch.bfloat16
    qcache, dcache = QuantizedKVCache(bits=bits, key_layout="token"), DynamicCache()
    _fill(qcache, layers=2, steps=(6, 1), b=b, dtype=dtype, d=d)
    _fill(dcache, layers=2, steps=(6, 1), b=b, dtype=dtype, d=d)
    per_token = (d if bits == 8 else d // 2) + 2 * 2  # uint8 payload + bf16 scale + bf16 zero
    assert cache_nbytes(qcache) == 2 * 2 * b * h * s * per_token
    assert cache_nbytes(dcache) == 2 * 2 * b * h * s * d * 2


def test_invalid_update_shapes():
    cache = QuantizedKVCache()
    with pytest.raises(ValueError, match="batch, heads, seq, head_dim"):
        cache.update(torch.randn(2, 3, 4), torch.randn(2, 3, 4), 0)
    with pytest.raises(ValueError, match="bits"):
        QuantizedKVCache(bits=2)
