"""quantize_key_groups / dequantize_key_groups (the 4-bit "channel_groups" key layout) against a written-out
reference, and the QuantizedKVCache layer that keeps pre-RoPE keys in groups plus a float residual."""
import pytest
import torch

from kvcache.quantize_cache import (KEY_GROUP_SIZE, GroupedKeys, dequantize_cache_torch, dequantize_key_groups,
                                    quantize_cache_v, quantize_key_groups, unpack_int4)
from kvcache.quantized_attention import attention_torch, quantized_attention
from kvcache.quantized_cache import QuantizedKVCache, cache_nbytes
from kvcache.rotary import apply_rotary_pos_emb, cos_sin_at, rotary_inv_freq


def reference_codes(keys, group):
    """Scalar loops: per (b, h, group, channel) min/max, scale = range / 15, zero = -min / scale, round, clamp."""
    b, h, seq, d = keys.shape
    codes = torch.zeros(b, h, seq, d, dtype=torch.uint8)
    scales = torch.zeros(b, h, seq // group, d)
    zeros = torch.zeros(b, h, seq // group, d)
    for i in range(b):
        for j in range(h):
            for g in range(seq // group):
                for c in range(d):
                    column = keys[i, j, g * group:(g + 1) * group, c].tolist()
                    lo, hi = min(column), max(column)
                    scale = (hi - lo) / 15
                    zero = -lo / scale
                    scales[i, j, g, c], zeros[i, j, g, c] = scale, zero
                    for p, x in enumerate(column):
                        codes[i, j, g * group + p, c] = min(max(round(x / scale + zero), 0), 15)
    return codes, scales, zeros


def test_matches_written_out_reference():
    keys = torch.randn(2, 2, 8, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()
    q, scale, zero = quantize_key_groups(keys, group_size=4)
    codes, ref_scale, ref_zero = reference_codes(keys.double(), 4)
    assert q.shape == (2, 2, 8, 3) and scale.shape == zero.shape == (2, 2, 2, 6)
    torch.testing.assert_close(scale, ref_scale, rtol=1e-6, atol=0)
    torch.testing.assert_close(zero, ref_zero, rtol=1e-5, atol=1e-6)
    assert (unpack_int4(q).int() - codes.int()).abs().max() <= 1  # a tie may round either way in float32
    assert (unpack_int4(q) == codes).float().mean() > 0.99
    # both extremes of every channel are codes 0 and 15
    grouped = unpack_int4(q).reshape(2, 2, 2, 4, 6)
    assert grouped.amin(-2).eq(0).all() and grouped.amax(-2).eq(15).all()


def test_constant_channels_and_zeros_are_exact():
    keys = torch.zeros(1, 1, 4, 4)
    keys[..., 1] = 3.25
    keys[..., 2] = -7.5
    q, scale, zero = quantize_key_groups(keys, group_size=4)
    assert torch.equal(dequantize_key_groups(q, scale, zero), keys)
    assert torch.equal(scale[0, 0, 0], torch.tensor([1.0, 3.25, 7.5, 1.0]))


@pytest.mark.parametrize("dtype,slack", ((torch.float32, 1e-5), (torch.float16, 2**-10), (torch.bfloat16, 2**-7)))
def test_round_trip_within_half_a_step(dtype, slack):
    g = torch.Generator().manual_seed(1)
    keys = (torch.randn(2, 3, 128, 16, generator=g) * 4 + torch.randn(1, 1, 1, 16, generator=g) * 20).to(dtype)
    q, scale, zero = quantize_key_groups(keys)
    assert scale.dtype == zero.dtype == dtype and q.dtype == torch.uint8
    error = (dequantize_key_groups(q, scale.float(), zero.float()) - keys.float()).abs()
    step = scale.float().repeat_interleave(KEY_GROUP_SIZE, dim=-2)
    assert (error <= step / 2 + keys.float().abs() * slack).all()


def test_padding_does_not_widen_the_range():
    keys = torch.randn(2, 1, 8, 4, generator=torch.Generator().manual_seed(2))
    keys[0, :, :3] = 1000.0  # row 0 is left-padded by 3 positions with huge garbage
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[0, :3] = False
    q, scale, zero = quantize_key_groups(keys, group_size=8, valid=valid)
    _, ref_scale, _ = quantize_key_groups(keys[:, :, 3:].repeat(1, 1, 2, 1)[:, :, :8], group_size=8)
    assert torch.equal(scale[0], ref_scale[0])
    deq = dequantize_key_groups(q, scale, zero)
    assert (deq[0, :, 3:] - keys[0, :, 3:]).abs().max() <= scale[0].max() / 2 + 1e-5
    only_padding = quantize_key_groups(keys, group_size=8, valid=torch.zeros(2, 8, dtype=torch.bool))
    assert torch.equal(only_padding[1], torch.ones(2, 1, 1, 4))


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_key_groups(torch.tensor([float("nan"), 0.0]).repeat(1, 1, 64, 1))
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_key_groups(torch.tensor([float("inf"), 0.0]).repeat(1, 1, 64, 1))
    with pytest.raises(ValueError, match="multiple"):
        quantize_key_groups(torch.zeros(1, 1, 65, 4))
    with pytest.raises(ValueError, match="even head_dim"):
        quantize_key_groups(torch.zeros(1, 1, 64, 5))
    with pytest.raises(ValueError, match="valid"):
        quantize_key_groups(torch.zeros(1, 1, 64, 4), valid=torch.ones(1, 63, dtype=torch.bool))


def _states(b, n, seed, h=2, d=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, n, d, generator=g), torch.randn(b, h, n, d, generator=g)


def test_cache_quantizes_a_group_when_it_completes():
    cache = QuantizedKVCache(bits=4)
    assert cache.key_layout == "channel_groups"
    fed_k, fed_v = [], []
    for step, n in enumerate((50, 1, 12, 1, 7)):  # 50, 51, 63, 64 (group full), 71
        k, v = _states(2, n, step)
        keys, values = cache.update(k, v, 0)
        fed_k.append(k)
        fed_v.append(v)
        layer = cache.layers[0]
        total = sum(t.shape[-2] for t in fed_k)
        assert isinstance(keys, GroupedKeys) and cache.get_seq_length() == total
        assert keys.q_key.shape[-2] == total // 64 * 64 and keys.residual.shape[-2] == total % 64
        assert torch.equal(keys.positions, torch.arange(total, dtype=torch.int32).expand(2, total))
    all_k, all_v = torch.cat(fed_k, 2), torch.cat(fed_v, 2)
    for got, ref in zip(keys[:3], quantize_key_groups(all_k[:, :, :64])):
        assert torch.equal(got, ref)
    assert torch.equal(keys.residual, all_k[:, :, 64:])
    for got, ref in zip(values, quantize_cache_v(all_v, 4, 15, 0)):  # values: per token, as in the token layout
        assert torch.equal(got, ref)
    d, h, b = 8, 2, 2
    assert cache_nbytes(cache) == (b * h * 64 * d // 2 + 2 * b * h * d * 4 + b * h * 7 * d * 4 + b * 71 * 4
                                   + b * h * 71 * (d // 2 + 4 + 4))
    assert not layer.is_croppable
    cache.crop(-3)
    assert cache.get_seq_length() == 68 and layer.key_residual.shape[-2] == 4 and layer.key_positions.shape[-1] == 68
    with pytest.raises(ValueError, match="groups"):
        cache.crop(-10)
    cache.batch_select_indices(torch.tensor([1]))
    assert layer.key_positions.shape == (1, 68) and layer.q_key.shape[0] == layer.key_scale.shape[0] == 1


def test_padding_positions_are_left_out_of_the_group():
    cache = QuantizedKVCache(bits=4)
    k, v = _states(2, 64, 5)
    k[1, :, :10] = 500.0
    positions = torch.arange(64).expand(2, 64).clone()
    positions[1, :10] = -1
    keys, _ = cache.update(k, v, 0, {"positions": positions})
    _, scale, _ = quantize_key_groups(k, valid=positions >= 0)
    assert torch.equal(keys.scale, scale) and keys.scale[1].max() < 100


def test_invalid_layouts_are_rejected():
    with pytest.raises(ValueError, match="4-bit layout"):
        QuantizedKVCache(bits=8, key_layout="channel_groups")
    with pytest.raises(ValueError, match="key_layout"):
        QuantizedKVCache(bits=4, key_layout="channel")
    assert QuantizedKVCache(bits=8).key_layout == "token"


def test_attention_rotates_dequantized_keys_at_their_positions():
    """attention_torch over GroupedKeys equals plain attention over the keys written out by hand: dequantized
    groups + residual, each rotated at its stored position with the given inv_freq (here an NTK factor of 3)."""
    b, h, d = 2, 2, 8
    cache = QuantizedKVCache(bits=4)
    k, v = _states(b, 70, 9)
    positions = torch.arange(70).expand(b, 70).clone() + torch.tensor([[0], [5]])
    keys, values = cache.update(k, v, 0, {"positions": positions})
    inv_freq = rotary_inv_freq([3.0], d, 10000.0)
    query = torch.randn(b, h, 1, d, generator=torch.Generator().manual_seed(3))
    deq = torch.cat((dequantize_key_groups(*keys[:3]), k[:, :, 64:]), dim=-2)
    cos, sin = cos_sin_at(positions, inv_freq)
    rotated = apply_rotary_pos_emb(deq, cos, sin)
    value = dequantize_cache_torch(*values, bits=4)
    reference = torch.softmax(query @ rotated.transpose(-1, -2) * 0.3, dim=-1) @ value
    out = attention_torch(query, (keys, values), None, 0.3, inv_freq=inv_freq)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="inv_freq"):
        attention_torch(query, (keys, values), None, 0.3)
    wrong_alpha = attention_torch(query, (keys, values), None, 0.3, inv_freq=rotary_inv_freq([1.0], d, 10000.0))
    assert not torch.allclose(wrong_alpha, reference, atol=1e-3)


def test_cpu_tensors_take_the_blocked_path_unless_triton_is_asked_for():
    """"cuda" and "auto" on CPU tensors run the blocked path (the CUDA kernels never read this layout); "triton"
    runs the fused kernel (tests/test_kv_triton_key_groups.py), in the interpreter on CPU."""
    from kvcache.blocked_attention import attention_blocked

    cache = QuantizedKVCache(bits=4)
    k, v = _states(1, 66, 4)
    layer_past = cache.update(k, v, 0)
    inv_freq = rotary_inv_freq([1.0], 8, 10000.0)
    query = torch.randn(1, 2, 1, 8, generator=torch.Generator().manual_seed(0))  # not the global RNG: order-free
    reference = attention_torch(query, layer_past, None, 0.3, inv_freq=inv_freq)
    blocked = attention_blocked(query, layer_past, None, 0.3, inv_freq=inv_freq)
    torch.testing.assert_close(blocked, reference, atol=1e-5, rtol=1e-5)
    for backend in ("cuda", "auto"):
        torch.testing.assert_close(quantized_attention(query, layer_past, None, 0.3, backend=backend,
                                                       inv_freq=inv_freq), blocked, atol=1e-6, rtol=1e-6)
