"""The CPU KV-cache kernels (kvcache/cpu_cache_kernels.cpp, AVX-512 and portable builds) against the dequantizing
plain-torch reference `attention_torch`: 8-bit and 4-bit token layouts, 4-bit channel_groups keys, batch > 1 with
left padding, a float `fresh` tail, odd lengths, head_dim 64/128, several queries, constant and zero states; and the
fused float32 decode attention (`attend_float`) against the model's plain matmul attention."""
import pytest
import torch

from kvcache.blocked_attention import _merge_nibbles, _split_nibbles, attention_blocked
from kvcache.cpu_kernels import attend_float_cpu, load_cpu_kernels
from kvcache.quantize_cache import KEY_GROUP_SIZE
from kvcache.quantized_attention import attention_torch, quantized_attention
from kvcache.quantized_cache import QuantizedKVCache
from kvcache.rotary import cos_sin_table
from qwen_model.configuration_qwen import QWenConfig
from qwen_model.create_tiny import TINY_CONFIG
from qwen_model.modeling_qwen import eager_attention

# float32 sums in another order than the reference's matmuls; the codes and scales are the same.
ATOL, RTOL = 2e-5, 1e-4
LAYOUTS = [(8, "token"), (4, "token"), (4, "channel_groups")]


@pytest.fixture(scope="module", params=[False, True], ids=["native", "portable"])
def kernels(request):
    module = load_cpu_kernels(portable=request.param)
    assert module is not None, "the CPU kernels must build here (gcc is on every CI machine)"
    return module


@pytest.fixture
def tiny_config_head64():
    return QWenConfig(**{**TINY_CONFIG, "hidden_size": 128, "num_attention_heads": 2, "kv_channels": 64})


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


@pytest.mark.parametrize("bits,layout", LAYOUTS)
@pytest.mark.parametrize("states,q_len", [(torch.float32, 1), (torch.bfloat16, 1), (torch.float32, 3)])
def test_decode_call_equals_its_kernels_composed_in_torch(kernels, bits, layout, states, q_len):
    """`attend_token` / `attend_grouped` take the cache's own [b, h, ...] tensors (reserved views, stored dtype, int32
    positions) and do the reshapes, conversions, -(zero * scale) and 4-bit channel order in C++: what the scoring and
    value kernels give on inputs prepared with tensor ops (q split, positions int64, ...), softmax between. Bit for
    bit for `attend_grouped`, which runs them; `attend_token` runs the same scores and values in one pass with a
    softmax split by blocks of positions (`attend_blocks`), equal to float32 rounding."""
    b, h, kv_len, d = 2, 3, 600, 64  # three blocks of 256 positions
    g = torch.Generator().manual_seed(7)
    key, value = (torch.randn(b, h, kv_len, d, generator=g).to(states) for _ in range(2))
    positions = torch.arange(kv_len)[None].repeat(b, 1)
    positions[1, :5] = -1
    cache = QuantizedKVCache(bits=bits, key_layout=layout, capacity=kv_len + 40)
    keys, values = cache.update(key, value, 0, cache_kwargs={"positions": positions})
    query = torch.randn(b, h, q_len, d, generator=g).to(states)
    mask = left_padding_mask(b, q_len, kv_len, [0, 5])  # q_len > 1: the "chunk" granularity's prefill queries
    scale = 0.125
    rows = b * h
    q = query.float().reshape(rows, q_len, d)
    q_value, value_scale, value_zero = values
    vcodes = q_value.reshape(rows, kv_len, -1)
    vs, vz = value_scale.reshape(rows, -1).float(), value_zero.reshape(rows, -1).float()
    if layout == "channel_groups":
        assert keys.positions.dtype == torch.int32
        cos, sin = cos_sin_table(inv_freq(d), kv_len)
        got = kernels.attend_grouped(query, keys.q_key, keys.scale, keys.zero, keys.residual, cos, sin, keys.positions,
                                     KEY_GROUP_SIZE, *values, mask, scale)
        scores = kernels.grouped_scores(q, keys.q_key.reshape(rows, -1, d // 2),
                                        keys.scale.reshape(rows, -1, d).float().contiguous(),
                                        keys.zero.reshape(rows, -1, d).float().contiguous(),
                                        keys.residual.reshape(rows, -1, d).float(), cos, sin, keys.positions.long(),
                                        h, KEY_GROUP_SIZE)
    else:
        got = kernels.attend_token(query, *keys, *values, mask, scale, bits)
        q_key, key_scale, key_zero = keys
        scores = kernels.token_scores(_split_nibbles(q) if bits == 4 else q, q_key.reshape(rows, kv_len, -1),
                                      key_scale.reshape(rows, -1).float(), key_zero.reshape(rows, -1).float(), bits)
    probs = torch.softmax((scores * scale).view(b, h, q_len, kv_len) + mask, dim=-1).view(rows, q_len, kv_len)
    out = kernels.token_values(probs, vcodes, vs, vz, bits, d)
    want = (_merge_nibbles(out) if bits == 4 else out).reshape(b, h, q_len, d).to(states)
    assert got.dtype == states
    if layout == "channel_groups":
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got.float(), want.float(), atol=ATOL, rtol=RTOL) if states == torch.float32 else \
            torch.testing.assert_close(got, want)  # bfloat16 states: both rounded to bfloat16 at the end


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
    query, layer_codes, layer_s = torch.randn(1, 2, 1, 64), codes[None], s[None, ..., None]
    with pytest.raises(RuntimeError, match="query must be a floating-point CPU tensor"):
        kernels.attend_token(q, layer_codes, layer_s, layer_s, layer_codes, layer_s, layer_s, None, 1.0, 8)
    with pytest.raises(RuntimeError, match="value zero must be"):
        kernels.attend_token(query, layer_codes, layer_s, layer_s, layer_codes, layer_s, s, None, 1.0, 8)
    scale = torch.ones(1, 2, 1, 64)
    cos, sin = cos_sin_table(inv_freq(64), 64)
    packed = torch.zeros(1, 2, 64, 32, dtype=torch.uint8)
    grouped = (query, packed, scale, scale, torch.zeros(1, 2, 0, 64), cos, sin)
    values = (packed, torch.ones(1, 2, 64, 1), torch.ones(1, 2, 64, 1), None, 1.0)
    positions = torch.arange(64)[None]
    kernels.attend_grouped(*grouped, positions.int(), KEY_GROUP_SIZE, *values)
    with pytest.raises(RuntimeError, match="positions must be a CPU int32 or int64"):
        kernels.attend_grouped(*grouped, positions.float(), KEY_GROUP_SIZE, *values)
    with pytest.raises(RuntimeError, match="positions outside the rotary table"):
        kernels.attend_grouped(*grouped, positions + cos.shape[1] - 63, KEY_GROUP_SIZE, *values)


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


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_append_writes_quantize_tokens_rows_into_the_buffers(kernels, bits):
    """quantize_append: the rows of quantize_token, bit for bit, at positions old.. of strided [b, h, capacity, .]
    buffers, nothing else touched; the finite flag; the buffers' views of the filled positions; shape errors."""
    from kvcache.cpu_kernels import quantize_token_cpu

    g = torch.Generator().manual_seed(10 + bits)
    x = torch.randn(2, 3, 4, 64, generator=g) * 3
    x[1, 2, 0] = -1.5  # a constant row
    width = 64 if bits == 8 else 32
    codes = torch.full((2, 3, 10, width + 3), 7, dtype=torch.uint8)[..., :width]  # rows with a gap: strided
    scale, zero = torch.full((2, 3, 10, 1), 9.0), torch.full((2, 3, 10, 1), 9.0)
    finite, *views = kernels.quantize_append(x, codes, scale, zero, 5, bits, 0, 2**bits - 1)
    assert finite
    for got, view, want in zip((codes, scale, zero), views, quantize_token_cpu(kernels, x, bits, 0, 2**bits - 1)):
        assert torch.equal(got[:, :, 5:9], want)
        assert (got[:, :, :5] == (7 if got.dtype == torch.uint8 else 9)).all() and (got[:, :, 9:] != 0).all()
        assert view.data_ptr() == got.data_ptr() and view.stride() == got.stride()
        assert view.shape == got[:, :, :9].shape and torch.equal(view, got[:, :, :9])
    x[0, 1, 2, 3] = float("inf")
    assert not kernels.quantize_append(x, codes, scale, zero, 0, bits, 0, 2**bits - 1)[0]
    with pytest.raises(RuntimeError, match="capacity"):
        kernels.quantize_append(x, codes, scale, zero, 7, bits, 0, 2**bits - 1)  # 7 + 4 positions > 10
    with pytest.raises(RuntimeError, match="contiguous bytes"):
        kernels.quantize_append(x, codes[..., :width - 2], scale, zero, 0, bits, 0, 2**bits - 1)


@pytest.mark.parametrize("bits,layout", [(8, "token"), (4, "token"), (4, "channel_groups")])
def test_cache_decode_update_quantizes_into_the_reservation(bits, layout, kernel_calls):
    """A reserved layer's decode updates go through quantize_append (no quantize_token call, buffers kept), give the
    unreserved cache's states bit for bit, and a non-finite key or value raises with the layer unchanged."""
    g = torch.Generator().manual_seed(bits)
    steps = [torch.randn(2, 3, n, 64, generator=g) for n in (9, 1, 1, 2)]
    reserved = QuantizedKVCache(bits=bits, key_layout=layout, capacity=32)
    plain = QuantizedKVCache(bits=bits, key_layout=layout)
    reserved.update(steps[0], steps[0] * 2, 0)
    plain.update(steps[0], steps[0] * 2, 0)
    layer = reserved.layers[0]
    value_buffer = layer._buffers["q_value"].data_ptr()
    with kernel_calls(load_cpu_kernels) as calls:
        for step in steps[1:]:
            got = reserved.update(step, step * 2, 0)
    for step in steps[1:]:
        want = plain.update(step, step * 2, 0)
    assert "quantize_token" not in calls and calls.count("quantize_append") == (6 if layout == "token" else 3)
    assert layer._buffers["q_value"].data_ptr() == value_buffer
    flat = lambda states: [t for part in states for t in (part if isinstance(part, tuple) else [part])]  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(flat(got), flat(want)))
    before = [t.clone() for t in flat(got)]
    for bad_key in (True, False):
        key, value = torch.randn(2, 3, 1, 64), torch.randn(2, 3, 1, 64)
        (key if bad_key else value)[1, 0, 0, 3] = float("nan")
        if layout == "channel_groups" and bad_key:
            continue  # pre-RoPE keys wait in the float residual; only values are quantized per token
        with pytest.raises(ValueError, match="NaN or inf"):
            reserved.update(key, value, 0)
        assert reserved.get_seq_length() == 13
        state = reserved.layers[0]
        now = [state.q_value, state.value_scale, state.value_zero]
        assert all(torch.equal(a, b) for a, b in zip(now, before[-3:]))


def test_cache_update_refuses_non_finite_states():
    """The cache's CPU float32 update goes through the kernel quantizer and still names NaN/inf inputs."""
    cache = QuantizedKVCache(bits=8)
    key = torch.randn(1, 2, 3, 64)
    key[0, 1, 2, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        cache.update(key, torch.randn(1, 2, 3, 64), 0)


def reserved_views(b, h, kv_len, d, g, capacity_extra=5):
    """Keys/values as prefix views of a larger buffer along the sequence axis, as ReservedCache returns them."""
    buffer = torch.randn(2, b, h, kv_len + capacity_extra, d, generator=g)
    return buffer[0, :, :, :kv_len], buffer[1, :, :, :kv_len]


@pytest.mark.parametrize("b,h,kv_len,d", [(1, 3, 1, 64), (2, 4, 255, 64), (3, 2, 257, 128), (1, 9, 1030, 64)])
def test_attend_float_matches_eager_attention(kernels, b, h, kv_len, d):
    """The fused float32 decode step against the model's plain matmul attention, on strided cache views, with a
    left-padding mask for batch > 1 (block edges at 256 positions: 255, 257, 1030)."""
    g = torch.Generator().manual_seed(kv_len + d)
    key, value = reserved_views(b, h, kv_len, d, g)
    query = torch.randn(b, h, 1, d, generator=g) * 2
    mask = left_padding_mask(b, 1, kv_len, [min(i * 7, kv_len - 1) for i in range(b)]) if b > 1 else None
    scale = d ** -0.5
    want = eager_attention(query, key, value, mask, scale)
    got = kernels.attend_float(query.reshape(b * h, 1, d), key.reshape(b * h, kv_len, d),
                               value.reshape(b * h, kv_len, d), mask, scale, h).view(b, h, 1, d)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


def test_attend_float_constant_zero_and_non_finite_states(kernels):
    b, h, kv_len, d = 1, 2, 300, 64
    query = torch.randn(b, h, 1, d, generator=torch.Generator().manual_seed(1))
    zeros = torch.zeros(b, h, kv_len, d)
    values = torch.arange(kv_len, dtype=torch.float32)[None, None, :, None].expand(b, h, kv_len, d).contiguous()
    # zero keys: uniform weights, the values' mean
    got = kernels.attend_float(query.reshape(h, 1, d), zeros.reshape(h, kv_len, d), values.reshape(h, kv_len, d),
                               None, 0.125, h)
    torch.testing.assert_close(got, torch.full((h, 1, d), (kv_len - 1) / 2), atol=1e-3, rtol=1e-6)
    # a NaN key poisons its head's row, a NaN value its channel, as in the plain attention; the rest stays finite
    for poisoned in ("key", "value"):
        key, value = torch.randn(b, h, kv_len, d), torch.randn(b, h, kv_len, d)
        (key if poisoned == "key" else value)[0, 1, 17, 3] = float("nan")
        want = eager_attention(query, key, value, None, 0.125)
        got = kernels.attend_float(query.reshape(h, 1, d), key.reshape(h, kv_len, d), value.reshape(h, kv_len, d),
                                   None, 0.125, h).view(b, h, 1, d)
        assert got[0, 1, 0, 3].isnan() and got[0, 0].isfinite().all()
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL, equal_nan=True)


def test_attend_float_split_softmax_edges(kernels):
    """The one-pass kernel takes each block of 256 positions' softmax against its own maximum and merges the blocks:
    blocks masked out entirely with -inf, near one-hot scores (exponents down to the float32 underflow) and a row
    masked everywhere (NaN, as softmax gives) match the plain attention."""
    b, h, kv_len, d = 2, 2, 700, 64
    g = torch.Generator().manual_seed(3)
    key, value = reserved_views(b, h, kv_len, d, g)
    query = torch.randn(b, h, 1, d, generator=g)
    mask = torch.zeros(b, 1, 1, kv_len)
    mask[0, ..., :600] = float("-inf")  # blocks 0-1 and most of 2 of row 0
    mask[1, ..., 300:] = float("-inf")
    for q_scale in (1.0, 40.0):  # 40: scores spread over hundreds, exponents far below float32's range
        want = eager_attention(query * q_scale, key, value, mask, 0.125)
        got = kernels.attend_float((query * q_scale).reshape(b * h, 1, d), key.reshape(b * h, kv_len, d),
                                   value.reshape(b * h, kv_len, d), mask, 0.125, h).view(b, h, 1, d)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    mask[1] = float("-inf")
    got = kernels.attend_float(query.reshape(b * h, 1, d), key.reshape(b * h, kv_len, d),
                               value.reshape(b * h, kv_len, d), mask, 0.125, h).view(b, h, 1, d)
    assert got[1].isnan().all() and eager_attention(query, key, value, mask, 0.125)[1].isnan().all()
    assert got[0].isfinite().all()


def test_attend_float_cpu_applies_to_float32_decode_only():
    q, k = torch.randn(1, 2, 1, 64), torch.randn(1, 2, 9, 64)
    assert attend_float_cpu(q, k, k, None, 0.125) is not None
    assert attend_float_cpu(q.bfloat16(), k.bfloat16(), k.bfloat16(), None, 0.125) is None
    assert attend_float_cpu(torch.randn(1, 2, 3, 64), k, k, None, 0.125) is None  # prefill: the caller's GEMMs
    assert attend_float_cpu(torch.randn(1, 2, 1, 80), torch.randn(1, 2, 9, 80), torch.randn(1, 2, 9, 80), None,
                            0.125) is None
    with pytest.raises(RuntimeError, match="head_dim 64 or 128"):
        load_cpu_kernels().attend_float(torch.randn(2, 1, 80), torch.randn(2, 9, 80), torch.randn(2, 9, 80), None,
                                        0.125, 2)
    with pytest.raises(RuntimeError, match="k and v must be"):
        load_cpu_kernels().attend_float(torch.randn(2, 1, 64), torch.randn(2, 9, 64), torch.randn(2, 8, 64), None,
                                        0.125, 2)


def test_model_decode_through_attend_float_matches_uncached_forward(tiny_config_head64, kernel_calls):
    """A head_dim-64 model, batch 2 with left padding: cached greedy decoding (each token through attend_float)
    gives the tokens of the uncached forward (the plain attention over the whole sequence every step), and the
    kernel really ran."""
    from qwen_model.modeling_qwen import QWenLMHeadModel
    torch.manual_seed(0)
    model = QWenLMHeadModel(tiny_config_head64).eval()
    ids = torch.randint(5, 1000, (2, 11), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with kernel_calls(load_cpu_kernels) as calls:
        cached = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    uncached = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    assert calls.count("attend_float") == 7 * tiny_config_head64.num_hidden_layers
