"""The block-wise CPU attention over the quantized cache (kvcache.chunked_attention) against the torch reference."""
import pytest
import torch

from kvcache.blocked_attention import attention_blocked
from kvcache.chunked_attention import attention_chunked
from kvcache.cpu_kernels import load_cpu_kernels
from kvcache.quantized_attention import KERNEL_QUERIES, attention_torch, quantized_attention
from kvcache.quantized_cache import QuantizedKVLayer
from kvcache.rotary import cached_cos_sin_at, cos_sin_at, rotary_inv_freq

LAYOUTS = [(8, "token"), (4, "token"), (4, "channel_groups")]
# float32 arithmetic in both paths differs only by summation order; the reference rounds K/V and scores to the
# query dtype, so bf16/fp16 compare to within a few of that dtype's steps.
TOL = {torch.float32: 2e-5, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def _layer(bits, layout, b, h, n, d, seed=0, keys=None, values=None, positions=None):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(b, h, n, d, generator=gen) * 3 if keys is None else keys
    values = torch.randn(b, h, n, d, generator=gen) if values is None else values
    layer = QuantizedKVLayer(bits=bits, key_layout=layout)
    kwargs = None if positions is None else {"positions": positions}
    return layer.update(keys, values, kwargs)


def _padding_mask(b, q_len, kv_len, pads):
    mask = torch.zeros(b, 1, q_len, kv_len)
    for row, pad in enumerate(pads):
        mask[row, ..., :pad] = torch.finfo(torch.float32).min
    return mask


@pytest.mark.parametrize("bits,layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kv_len,chunk", [(301, 64), (77, 1024), (1000, 128)])
def test_matches_reference_with_left_padding(bits, layout, dtype, kv_len, chunk):
    b, h, d = 3, 2, 64
    pads = [0, 17, 70]
    positions = torch.stack([torch.cat((torch.full((p,), -1), torch.arange(kv_len - p))) for p in pads])
    layer_past = _layer(bits, layout, b, h, kv_len, d, positions=positions)
    query = torch.randn(b, h, 1, d, generator=torch.Generator().manual_seed(1)).to(dtype)
    inv_freq = rotary_inv_freq([1.0], d, 10000.0)
    mask = _padding_mask(b, 1, kv_len, pads)
    ref = attention_torch(query, layer_past, mask, None, inv_freq=inv_freq)
    out = attention_chunked(query, layer_past, mask, None, inv_freq=inv_freq, chunk=chunk)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("bits,layout", LAYOUTS)
def test_prefill_chunk_with_fresh_states(bits, layout):
    b, h, kv_len, n, d = 2, 3, 200, 9, 32
    layer_past = _layer(bits, layout, b, h, kv_len, d)
    gen = torch.Generator().manual_seed(2)
    fresh = (torch.randn(b, h, n, d, generator=gen), torch.randn(b, h, n, d, generator=gen))
    query = torch.randn(b, h, n, d, generator=gen)
    mask = torch.zeros(1, 1, n, kv_len)
    mask[..., -n:] = torch.triu(torch.full((n, n), torch.finfo(torch.float32).min), diagonal=1)
    inv_freq = rotary_inv_freq([2.0], d, 10000.0)
    ref = attention_torch(query, layer_past, mask, 0.2, fresh=fresh, inv_freq=inv_freq)
    out = attention_chunked(query, layer_past, mask, 0.2, fresh=fresh, inv_freq=inv_freq, chunk=64)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("bits,layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_first_prefill_chunk_attends_its_own_states(bits, layout, dtype):
    """Nothing cached before the chunk (kv_len == fresh length, a prompt's prefill): the chunk's own float states,
    causal, with a left-padded row."""
    b, h, n, d = 2, 3, 40, 64
    gen = torch.Generator().manual_seed(4)
    fresh = (torch.randn(b, h, n, d, generator=gen) * 3, torch.randn(b, h, n, d, generator=gen))
    layer_past = _layer(bits, layout, b, h, n, d, keys=fresh[0], values=fresh[1])
    query = torch.randn(b, h, n, d, generator=gen).to(dtype)
    mask = torch.triu(torch.full((n, n), torch.finfo(torch.float32).min), diagonal=1).expand(b, 1, n, n).clone()
    mask[1, ..., :5] = torch.finfo(torch.float32).min
    inv_freq = rotary_inv_freq([1.0], d, 10000.0)
    ref = attention_torch(query, layer_past, mask, 0.125, fresh=fresh, inv_freq=inv_freq)
    out = attention_chunked(query, layer_past, mask, 0.125, fresh=fresh, inv_freq=inv_freq)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


def test_masked_positions_weigh_exactly_zero():
    """Masked scores underflow to exact zero weights (not tiny ones): huge values behind the mask leave no trace."""
    b, h, n, d = 1, 2, 16, 64
    gen = torch.Generator().manual_seed(5)
    keys, values = torch.randn(b, h, n, d, generator=gen), torch.randn(b, h, n, d, generator=gen)
    values[..., :4, :] = 1e38  # a weight of even 1e-38 would show
    mask = torch.zeros(b, 1, 1, n)
    mask[..., :4] = torch.finfo(torch.float32).min
    query = torch.randn(b, h, 1, d, generator=gen)
    layer_past = _layer(8, "token", b, h, n, d, keys=keys, values=values)
    out = attention_chunked(query, layer_past, mask, None, fresh=(keys, values))
    want = torch.softmax(query @ keys[..., 4:, :].transpose(-1, -2) / 8, dim=-1) @ values[..., 4:, :]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bits,layout", LAYOUTS)
@pytest.mark.parametrize("fill", [0.0, 2.5, -1.0])
def test_constant_and_zero_rows(bits, layout, fill):
    b, h, kv_len, d = 1, 2, 130, 16
    keys = torch.full((b, h, kv_len, d), fill)
    values = torch.full((b, h, kv_len, d), fill)
    layer_past = _layer(bits, layout, b, h, kv_len, d, keys=keys, values=values)
    query = torch.randn(b, h, 1, d, generator=torch.Generator().manual_seed(3))
    inv_freq = rotary_inv_freq([1.0], d, 10000.0)
    out = attention_chunked(query, layer_past, None, None, inv_freq=inv_freq, chunk=64)
    torch.testing.assert_close(out, attention_torch(query, layer_past, None, None, inv_freq=inv_freq),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, torch.full_like(out, fill), atol=1e-5, rtol=0)  # constant values: exact


@pytest.mark.parametrize("bits,layout", LAYOUTS)
def test_long_context_small_chunks_and_dispatch(bits, layout):
    b, h, kv_len, d = 1, 2, 5000, 64
    layer_past = _layer(bits, layout, b, h, kv_len, d, seed=4)
    query = torch.randn(b, h, 1, d, generator=torch.Generator().manual_seed(5)) * 2
    inv_freq = rotary_inv_freq([1.0], d, 10000.0)
    ref = attention_torch(query, layer_past, None, None, inv_freq=inv_freq)
    torch.testing.assert_close(attention_chunked(query, layer_past, None, None, inv_freq=inv_freq, chunk=64), ref,
                               atol=2e-5, rtol=2e-5)
    # "auto" on CPU takes the CPU kernels for a decoded token, the block-wise path for a longer chunk of queries;
    # "torch" is the reference
    auto = quantized_attention(query, layer_past, None, None, backend="auto", inv_freq=inv_freq)
    assert torch.equal(auto, attention_blocked(query, layer_past, None, None, inv_freq=inv_freq,
                                               kernels=load_cpu_kernels()))
    chunk = query.expand(b, h, KERNEL_QUERIES + 1, d)
    assert torch.equal(quantized_attention(chunk, layer_past, None, None, backend="auto", inv_freq=inv_freq),
                       attention_chunked(chunk, layer_past, None, None, inv_freq=inv_freq))
    assert torch.equal(quantized_attention(query, layer_past, None, None, backend="torch", inv_freq=inv_freq), ref)


def test_bad_arguments():
    layer_past = _layer(4, "channel_groups", 1, 1, 64, 8)
    query = torch.randn(1, 1, 1, 8)
    with pytest.raises(ValueError, match="inv_freq"):
        attention_chunked(query, layer_past)
    with pytest.raises(ValueError, match="chunk"):
        attention_chunked(query, _layer(8, "token", 1, 1, 4, 8), chunk=0)


def test_cached_cos_sin_equal_direct():
    inv_freq = rotary_inv_freq([1.0, 3.0], 64, 10000.0)
    positions = torch.randint(0, 9000, (2, 257), generator=torch.Generator().manual_seed(6))
    for rows in (inv_freq, inv_freq[:1]):
        for direct, cached in zip(cos_sin_at(positions, rows), cached_cos_sin_at(positions, rows)):
            assert torch.equal(direct, cached)
