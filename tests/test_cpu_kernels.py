"""The CPU KV-cache kernels (kvcache/cpu_cache_kernels.cpp, AVX-512 and portable builds) against the dequantizing
plain-torch reference `attention_torch`: 8-bit and 4-bit token layouts, 4-bit channel_groups keys, batch > 1 with
left padding, a float `fresh` tail, odd lengths, head_dim 64/128, several queries, constant and zero states."""
import pytest
import torch

from kvcache.blocked_attention import attention_blocked
from kvcache.cpu_kernels import load_cpu_kernels
from kvcache.quantized_attention import attention_torch, quantized_attention
from kvcache.quantized_cache import QuantizedKVCache

# float32 sums in another order than the reference's matmuls; the codes and scales are the same.
ATOL, RTOL = 2e-5, 1e-4
LAYOUTS = [(8, "token"), (4, "token"), (4, "channel_groups")]


@pytest.fixture(scope="module", params=[False, True], ids=["native", "portable"])
def kernels(request):
    module = load_cpu_kernels(portable=request.param)
    assert module is not None, "the CPU kernels must build here (gcc is on every CI machine)"
    return module


def inv_freq(d, rot=None):
    rot = rot or d
    return (1.0 / 10000 ** (torch.arange(0, rot, 2).float() / rot))[None]


def layer(bits, layout, key, value):
    cache = QuantizedKVCache(bits=bits, key_layout=layout)
    return cache.update(key, value, 0)


def left_padding_mask(b, q_len, kv_len, pad):
    mask = torch.zeros(b, 1, q_len, kv_len)
    for i, n in enumerate(pad):
        mask[i, ..., :n] = torch.finfo(torch.float32).min
    return mask


@pytest.mark.parametrize("bits,layout", LAYOUTS)
@pytest.mark.parametrize("b,h,kv_len,d,q_len", [(1, 3, 1, 64, 1), (2, 4, 193, 64, 1), (3, 2, 130, 128, 5),
                                                 (1, 9, 1030, 64, 1)])
def test_kernels_match_the_reference(kernels, bits, layout, b, h, kv_len, d, q_len):
    g = torch.Generator().manual_seed(kv_len + d)
    key, value = torch.randn(b, h, kv_len, d, generator=g) * 3, torch.randn(b, h, kv_len, d, generator=g)
    past = layer(bits, layout, key, value)
    query = torch.randn(b, h, q_len, d, generator=g)
    mask = left_padding_mask(b, q_len, kv_len, [min(i * 7, kv_len - 1) for i in range(b)])
    inv = inv_freq(d)
    want = attention_torch(query, past, mask, None, inv_freq=inv)
    got = attention_blocked(query, past, mask, None, inv_freq=inv, kernels=kernels)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("bits,layout", LAYOUTS)
def test_partial_rotary_bfloat16_query_and_padding_positions(kernels, bits, layout):
    """Rotary on half the channels (the kernels' portable rotation path), a bfloat16 query, and left-padding slots
    stored at position -1 (masked)."""
    b, h, kv_len, d = 2, 3, 150, 64
    g = torch.Generator().manual_seed(1)
    key, value = torch.randn(b, h, kv_len, d, generator=g), torch.randn(b, h, kv_len, d, generator=g)
    positions = torch.arange(kv_len)[None].repeat(b, 1)
    positions[1, :9] = -1
    cache = QuantizedKVCache(bits=bits, key_layout=layout)
    past = cache.update(key, value, 0, cache_kwargs={"positions": positions})
    query = torch.randn(b, h, 1, d, generator=g).bfloat16()
    mask = left_padding_mask(b, 1, kv_len, [0, 9])
    inv = inv_freq(d, rot=32)
    want = attention_torch(query, past, mask, None, inv_freq=inv)
    got = attention_blocked(query, past, mask, None, inv_freq=inv, kernels=kernels)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("bits,layout", LAYOUTS)
@pytest.mark.parametrize("fill", [0.0, 2.5])
def test_constant_and_zero_states(kernels, bits, layout, fill):
    """Constant rows quantize with a zero range: the kernels must reproduce the reference's value, not NaN."""
    b, h, kv_len, d = 1, 2, 70, 64
    key, value = torch.full((b, h, kv_len, d), fill), torch.full((b, h, kv_len, d), -fill)
    past = layer(bits, layout, key, value)
    query = torch.randn(b, h, 1, d, generator=torch.Generator().manual_seed(2))
    inv = inv_freq(d)
    want = attention_torch(query, past, None, None, inv_freq=inv)
    got = attention_blocked(query, past, None, None, inv_freq=inv, kernels=kernels)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


def test_auto_on_cpu_uses_the_kernels_for_decode(monkeypatch):
    """`quantized_attention(backend="auto")` on CPU goes through the kernels for a decoded token: with them made
    unavailable the result is the plain-torch blocks' one, and both equal the reference."""
    import kvcache.cpu_kernels as cpu_kernels

    g = torch.Generator().manual_seed(3)
    key, value = torch.randn(2, 4, 300, 64, generator=g), torch.randn(2, 4, 300, 64, generator=g)
    past = layer(8, "token", key, value)
    query = torch.randn(2, 4, 1, 64, generator=g)
    want = attention_torch(query, past, None, None)
    calls = []
    real = load_cpu_kernels()

    class Counting:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(real, name)

    monkeypatch.setitem(cpu_kernels._state, False, Counting())
    torch.testing.assert_close(quantized_attention(query, past, None, None), want, atol=ATOL, rtol=RTOL)
    assert calls == ["attend_token"]
    monkeypatch.setitem(cpu_kernels._state, False, None)
    torch.testing.assert_close(quantized_attention(query, past, None, None), want, atol=ATOL, rtol=RTOL)


def test_kernels_reject_bad_input(kernels):
    q = torch.randn(2, 1, 64)
    codes = torch.zeros(2, 10, 64, dtype=torch.uint8)
    s = torch.ones(2, 10)
    narrow = torch.zeros(2, 10, 32, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="codes do not fit q"):
        kernels.token_scores(q, narrow, s, s, 8)
    with pytest.raises(RuntimeError, match="dense within a row"):
        kernels.token_scores(q, codes[..., :32], s, s, 4)
    with pytest.raises(RuntimeError, match="must be a CPU Byte tensor"):
        kernels.token_scores(q, codes.float(), s, s, 8)
    with pytest.raises(RuntimeError, match="head_dim 64 or 128"):
        kernels.token_scores(torch.randn(2, 1, 32), narrow, s, s, 8)
    with pytest.raises(RuntimeError, match="bits must be 8 or 4"):
        kernels.token_values(torch.rand(2, 1, 10), codes, s, s, 3, 64)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_token_is_bit_identical_to_quantize_cache_v(kernels, bits):
    """The decode-step quantizer: same codes, scales and zeros as the torch reference, bit for bit, including zero
    rows, constant rows of either sign, all-positive rows and odd sequence lengths."""
    from kvcache.cpu_kernels import quantize_token_cpu
    from kvcache.quantize_cache import quantize_cache_v

    g = torch.Generator().manual_seed(bits)
    x = torch.randn(3, 5, 77, 64, generator=g) * torch.rand(3, 5, 77, 1, generator=g) * 10
    x[0, 0, :5] = 0
    x[0, 1, :5] = -2.5
    x[0, 2, :5] = 3.0
    x[1, 0, :3] = torch.rand(3, 64, generator=g) + 5
    want = quantize_cache_v(x, bits, 2**bits - 1, 0)
    got = quantize_token_cpu(kernels, x, bits, 0, 2**bits - 1)
    for a, w in zip(got, want):
        assert a.shape == w.shape and a.dtype == w.dtype and torch.equal(a, w)


def test_cache_update_refuses_non_finite_states():
    """The cache's CPU float32 update goes through the kernel quantizer and still names NaN/inf inputs."""
    cache = QuantizedKVCache(bits=8)
    key = torch.randn(1, 2, 3, 64)
    key[0, 1, 2, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        cache.update(key, torch.randn(1, 2, 3, 64), 0)
