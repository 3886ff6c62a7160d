"""The fused Triton kernel over the 4-bit "channel_groups" key layout (pre-RoPE keys in per-channel groups of 64
positions plus a float residual, rotated in the kernel), run by the Triton interpreter on CPU, against the torch
reference ``attention_torch``.

Tolerances (absolute and relative, on outputs of size ~1): 2e-5 for float32, 4e-3 for float16, as for the token
layout; the kernel computes the same keys (dequantized in the scales' dtype, rotated in fp32, cast to the query's
dtype) and differs only in summation order and in cos/sin rounding.
"""
import os

import pytest
import torch

from kvcache.quantized_attention import attention_torch, quantized_attention
from kvcache.quantized_cache import QuantizedKVCache
from kvcache.rotary import rotary_inv_freq

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs CUDA or the Triton interpreter",
)
triton_attention = pytest.importorskip("kvcache.triton_attention")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 4e-3}
NEG = torch.finfo(torch.float32).min
PAD = 10  # left padding of batch row 1


def _layer(b, h, kv, d, dtype, seed, storage_dtype=None):
    """A 4-bit channel_groups layer filled like the model fills it: a prefill, then single-position appends. Row 1 is
    left-padded by PAD slots (position -1, huge garbage keys), row 2 starts at position 30000 (large rotary
    angles)."""
    g = torch.Generator().manual_seed(seed)
    cache = QuantizedKVCache(bits=4, storage_dtype=storage_dtype)
    k = torch.randn(b, h, kv, d, generator=g).to(dtype).to(DEVICE)
    v = torch.randn(b, h, kv, d, generator=g).to(dtype).to(DEVICE)
    positions = torch.arange(kv, device=DEVICE).expand(b, kv).clone()
    if b > 1:
        positions[1, :PAD] = -1
        positions[1, PAD:] -= PAD
        k[1, :, :PAD] = 300.0
    if b > 2:
        positions[2] += 30000
    split = max(kv - 3, 1)
    layer_past = cache.update(k[:, :, :split], v[:, :, :split], 0, {"positions": positions[:, :split]})
    for pos in range(split, kv):
        layer_past = cache.update(k[:, :, pos:pos + 1], v[:, :, pos:pos + 1], 0,
                                  {"positions": positions[:, pos:pos + 1]})
    keys = layer_past[0]
    assert keys.q_key.shape[-2] == kv // 64 * 64 and keys.residual.shape[-2] == kv % 64
    return layer_past


def _padding_mask(b, q_len, kv):
    mask = torch.zeros(b, 1, q_len, kv, device=DEVICE)
    if b > 1:
        mask[1, ..., :PAD] = NEG
    return mask


def _check(out, ref, dtype):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert torch.allclose(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype]), float(
        (out.float() - ref.float()).abs().max()
    )


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
@pytest.mark.parametrize("kv", (37, 64, 130, 199))  # residual only, groups only, groups + residual (2 and 7)
def test_decode_batch_with_left_padding_and_ntk(dtype, kv):
    b, h, d = 3, 2, 64
    layer_past = _layer(b, h, kv, d, dtype, seed=kv)
    inv_freq = rotary_inv_freq([1.0, 3.0, 7.0], d, 10000.0, device=DEVICE)  # one NTK factor per sample
    q = torch.randn(b, h, 1, d, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    mask = _padding_mask(b, 1, kv)
    ref = attention_torch(q, layer_past, mask, 0.125, inv_freq=inv_freq)
    _check(triton_attention.attention_triton(q, layer_past, mask, 0.125, inv_freq=inv_freq), ref, dtype)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
@pytest.mark.parametrize("d,rotary_pct", ((128, 1.0), (128, 0.5), (64, 0.5), (40, 0.25)))
def test_head_dims_and_partial_rotary(dtype, d, rotary_pct):
    """head_dim 64 and 128, rotary over all or part of the channels (rot_dim 10 for d=40: halves of odd width, so
    a channel's partner sits in the other nibble), one shared NTK factor."""
    b, h, kv = 2, 2, 150
    layer_past = _layer(b, h, kv, d, dtype, seed=d)
    inv_freq = rotary_inv_freq([2.5], int(d * rotary_pct), 10000.0, device=DEVICE)
    q = torch.randn(b, h, 1, d, generator=torch.Generator().manual_seed(2)).to(dtype).to(DEVICE)
    mask = _padding_mask(b, 1, kv)
    ref = attention_torch(q, layer_past, mask, None, inv_freq=inv_freq)
    _check(triton_attention.attention_triton(q, layer_past, mask, None, inv_freq=inv_freq), ref, dtype)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
def test_short_chunk_with_causal_mask_and_no_mask(dtype):
    """q_len 5 under a causal + padding mask, and q_len 17 (> BLOCK_M) without a mask."""
    b, h, d, kv = 2, 3, 64, 140
    layer_past = _layer(b, h, kv, d, dtype, seed=5)
    inv_freq = rotary_inv_freq([1.0], d, 10000.0, device=DEVICE)
    q = torch.randn(b, h, 5, d, generator=torch.Generator().manual_seed(3)).to(dtype).to(DEVICE)
    causal = torch.ones(5, kv, dtype=torch.bool, device=DEVICE).tril(diagonal=kv - 5)
    mask = _padding_mask(b, 5, kv).masked_fill(~causal, NEG)
    ref = attention_torch(q, layer_past, mask, None, inv_freq=inv_freq)
    _check(triton_attention.attention_triton(q, layer_past, mask, None, inv_freq=inv_freq), ref, dtype)
    q = torch.randn(b, h, 17, d, generator=torch.Generator().manual_seed(4)).to(dtype).to(DEVICE)
    ref = attention_torch(q, layer_past, None, None, inv_freq=inv_freq)
    _check(triton_attention.attention_triton(q, layer_past, None, None, inv_freq=inv_freq), ref, dtype)


def test_fp16_storage_under_a_float32_query():
    """Keys, scales and residual stored in float16 (``storage_dtype``) read by a float32 query. The kernel dequantizes
    keys in float16 as the reference does, but values in float32 (as for the token layout), so the reference here gets
    the value scales and zero points as float32 (their values unchanged): measured 1.3e-4 off otherwise."""
    b, h, d, kv = 2, 2, 64, 100
    layer_past = _layer(b, h, kv, d, torch.float32, seed=6, storage_dtype=torch.float16)
    keys, (q_value, value_scale, value_zero) = layer_past
    assert keys.scale.dtype == keys.residual.dtype == value_scale.dtype == torch.float16
    inv_freq = rotary_inv_freq([1.0, 4.0], d, 10000.0, device=DEVICE)
    q = torch.randn(b, h, 1, d, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    mask = _padding_mask(b, 1, kv)
    ref = attention_torch(q, (keys, (q_value, value_scale.float(), value_zero.float())), mask, None,
                          inv_freq=inv_freq)
    _check(triton_attention.attention_triton(q, layer_past, mask, None, inv_freq=inv_freq), ref, torch.float32)


def test_dispatcher_and_errors():
    b, h, d, kv = 2, 2, 64, 70
    layer_past = _layer(b, h, kv, d, torch.float32, seed=7)
    inv_freq = rotary_inv_freq([3.0], d, 10000.0, device=DEVICE)
    q = torch.randn(b, h, 1, d, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    mask = _padding_mask(b, 1, kv)
    ref = attention_torch(q, layer_past, mask, 0.2, inv_freq=inv_freq)
    out = quantized_attention(q, layer_past, mask, 0.2, backend="triton", inv_freq=inv_freq)
    assert torch.equal(out, triton_attention.attention_triton(q, layer_past, mask, 0.2, inv_freq=inv_freq))
    _check(out, ref, torch.float32)
    # the kernel does use inv_freq: another NTK factor is far off
    other = triton_attention.attention_triton(q, layer_past, mask, 0.2, inv_freq=rotary_inv_freq([1.0], d, 10000.0))
    assert (other - ref).abs().max() > 1e-2
    with pytest.raises(ValueError, match="inv_freq"):
        triton_attention.attention_triton(q, layer_past, mask, 0.2)
    with pytest.raises(ValueError, match="inv_freq"):
        triton_attention.attention_triton(q, layer_past, mask, 0.2, inv_freq=rotary_inv_freq([1.0], 2 * d, 10000.0))
    with pytest.raises(ValueError, match="inv_freq"):
        triton_attention.attention_triton(q, layer_past, mask, 0.2, inv_freq=inv_freq.expand(3, -1))
