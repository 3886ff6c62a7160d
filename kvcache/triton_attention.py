"""Fused Triton attention over a quantized (uint8 or packed uint4) KV cache, token or channel-group key layout.

Flash-style: each program owns BLOCK_M query rows of one (batch, head), walks the cache in BLOCK_N-position tiles,
dequantizes each key/value tile in registers (``scale * (q - zero)``) and keeps an online softmax, so no float copy of
the cache is ever materialised. Meant for decode and short query lengths; the additive mask is read through its
(possibly zero) strides, so padding masks, causal masks or full masks all work.

The ``"channel_groups"`` key layout (pre-RoPE keys, one scale/zero per channel and group, a float residual) has its
own kernel: it walks the quantized groups, then the residual, with one online softmax over both, and rotates each key
tile in registers at the slots' stored positions (cos/sin from ``inv_freq`` as in ``kvcache.rotary``).
"""
import math
import os

import torch
import triton
import triton.language as tl

from kvcache.quantize_cache import GroupedKeys
from kvcache.quantized_attention import cache_bits, check_mask

BLOCK_M = 16
BLOCK_N = 32


@triton.jit
def _token_tile(QX, XS, XZ, rows, byte_col, shift, tile_mask, n_valid, width, PACKED: tl.constexpr):
    """fp32 tile ``scale[row] * (q - zero[row])`` of a per-token quantized tensor (4-bit codes unpacked)."""
    x = tl.load(QX + rows[:, None] * width + byte_col[None, :], mask=tile_mask, other=0)
    if PACKED:
        x = (x >> shift[None, :]) & 0xF
    scale = tl.load(XS + rows, mask=n_valid, other=0.0).to(tl.float32)
    zero = tl.load(XZ + rows, mask=n_valid, other=0.0).to(tl.float32)
    return (x.to(tl.float32) - zero[:, None]) * scale[:, None]


@triton.jit
def _softmax_step(q, k, v, m_i, l_i, acc, mask_base, offs_m, offs_n, m_valid, n_valid, stride_mm, stride_mn,
                  sm_scale, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr):
    """One flash-attention step over a key/value tile: scores, additive mask, online softmax, P @ V."""
    s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION) * sm_scale
    if HAS_MASK:
        m_ptrs = mask_base + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn
        s += tl.load(m_ptrs, mask=m_valid[:, None] & n_valid[None, :], other=0.0).to(tl.float32)
    s = tl.where(n_valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    p = tl.exp(s - m_new[:, None])
    alpha = tl.exp(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _quantized_attention_kernel(
    Q, QK, KS, KZ, QV, VS, VZ, MASK, OUT,
    sm_scale, q_len, kv_len, n_heads,
    stride_mb, stride_mh, stride_mm, stride_mn,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PACKED: tl.constexpr, HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // n_heads
    head = pid_bh % n_heads

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < q_len
    d_valid = offs_d < HEAD_DIM
    q_ptrs = Q + (pid_bh * q_len + offs_m[:, None]) * HEAD_DIM + offs_d[None, :]
    q = tl.load(q_ptrs, mask=m_valid[:, None] & d_valid[None, :], other=0.0)

    shift = (offs_d % 2) * 4
    if PACKED:
        width = HEAD_DIM // 2
        byte_col = offs_d // 2
    else:
        width = HEAD_DIM
        byte_col = offs_d
    mask_base = MASK + batch * stride_mb + head * stride_mh

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)

    for start in range(0, kv_len, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_valid = offs_n < kv_len
        rows = pid_bh * kv_len + offs_n
        tile_mask = n_valid[:, None] & d_valid[None, :]
        k = _token_tile(QK, KS, KZ, rows, byte_col, shift, tile_mask, n_valid, width, PACKED)
        v = _token_tile(QV, VS, VZ, rows, byte_col, shift, tile_mask, n_valid, width, PACKED)
        m_i, l_i, acc = _softmax_step(q, k, v, m_i, l_i, acc, mask_base, offs_m, offs_n, m_valid, n_valid,
                                      stride_mm, stride_mn, sm_scale, HAS_MASK, PRECISION)

    out = acc / l_i[:, None]
    o_ptrs = OUT + (pid_bh * q_len + offs_m[:, None]) * HEAD_DIM + offs_d[None, :]
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])


@triton.jit
def _group_key_tile(QK, KS, KZ, rows, groups, chans, tile_mask, HEAD_DIM: tl.constexpr):
    """Channels ``chans`` of channel-group keys, ``scale[group, c] * (q - zero[group, c])`` computed in fp32 (the
    exact stored value, as the torch reference computes it)."""
    codes = tl.load(QK + rows[:, None] * (HEAD_DIM // 2) + chans[None, :] // 2, mask=tile_mask, other=0)
    codes = (codes >> ((chans[None, :] % 2) * 4)) & 0xF
    at = groups[:, None] * HEAD_DIM + chans[None, :]
    scale = tl.load(KS + at, mask=tile_mask, other=0.0).to(tl.float32)
    zero = tl.load(KZ + at, mask=tile_mask, other=0.0).to(tl.float32)
    return (codes.to(tl.float32) - zero) * scale


@triton.jit
def _rotate(k, k_partner, positions, freq, sign, rotated, like):
    """NeoX rotary of a pre-RoPE key tile in fp32, in ``like``'s dtype before and after (as ``apply_rotary_pos_emb``
    on keys of the query's dtype): ``k * cos + sign * partner * sin`` on the rotated channels, ``k`` elsewhere.

    The angle is ``position * inv_freq`` in fp32, as ``cos_sin_at`` computes it, then brought to [-pi, pi] with a
    two-part 2 pi (the first part exact in few bits), so that approximate GPU sin/cos stay accurate at long context."""
    k = k.to(like.dtype).to(tl.float32)
    k_partner = k_partner.to(like.dtype).to(tl.float32)
    angle = positions.to(tl.float32)[:, None] * freq[None, :]
    turns = tl.floor(angle * 0.15915494309189535 + 0.5)
    angle = (angle - turns * 6.28125) - turns * 0.0019353071795864769
    turned = k * tl.cos(angle) + (sign[None, :] * k_partner) * tl.sin(angle)
    return tl.where(rotated[None, :], turned, k).to(like.dtype)


@triton.jit
def _grouped_key_attention_kernel(
    Q, QK, KS, KZ, KR, POS, FREQ, QV, VS, VZ, MASK, OUT,
    sm_scale, q_len, kv_len, n_quantized, group_size, n_heads, stride_fb,
    stride_mb, stride_mh, stride_mm, stride_mn,
    HEAD_DIM: tl.constexpr, ROT_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // n_heads
    head = pid_bh % n_heads

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < q_len
    d_valid = offs_d < HEAD_DIM
    q_ptrs = Q + (pid_bh * q_len + offs_m[:, None]) * HEAD_DIM + offs_d[None, :]
    q = tl.load(q_ptrs, mask=m_valid[:, None] & d_valid[None, :], other=0.0)

    # NeoX halves: channel c < ROT_DIM / 2 pairs with c + ROT_DIM / 2, rotated = c * cos - partner * sin, and the
    # partner c + ROT_DIM / 2 gets partner * cos + c * sin; channels from ROT_DIM on are not rotated.
    rotated = offs_d < ROT_DIM
    first_half = offs_d < ROT_DIM // 2
    partner = tl.where(first_half, offs_d + ROT_DIM // 2, tl.where(rotated, offs_d - ROT_DIM // 2, offs_d))
    sign = tl.where(first_half, -1.0, 1.0)
    freq = tl.load(FREQ + batch * stride_fb + offs_d % (ROT_DIM // 2), mask=rotated, other=0.0)

    shift = (offs_d % 2) * 4
    byte_col = offs_d // 2
    n_groups = n_quantized // group_size
    n_residual = kv_len - n_quantized
    mask_base = MASK + batch * stride_mb + head * stride_mh

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)

    for start in range(0, n_quantized, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_valid = offs_n < n_quantized
        tile_mask = n_valid[:, None] & d_valid[None, :]
        rows = pid_bh * n_quantized + offs_n
        groups = pid_bh * n_groups + offs_n // group_size
        k = _group_key_tile(QK, KS, KZ, rows, groups, offs_d, tile_mask, HEAD_DIM)
        k_partner = _group_key_tile(QK, KS, KZ, rows, groups, partner, tile_mask, HEAD_DIM)
        positions = tl.maximum(tl.load(POS + batch * kv_len + offs_n, mask=n_valid, other=0), 0)
        k = _rotate(k, k_partner, positions, freq, sign, rotated, q)
        v = _token_tile(QV, VS, VZ, pid_bh * kv_len + offs_n, byte_col, shift, tile_mask, n_valid, HEAD_DIM // 2,
                        True)
        m_i, l_i, acc = _softmax_step(q, k, v, m_i, l_i, acc, mask_base, offs_m, offs_n, m_valid, n_valid,
                                      stride_mm, stride_mn, sm_scale, HAS_MASK, PRECISION)

    for start in range(n_quantized, kv_len, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_valid = offs_n < kv_len
        tile_mask = n_valid[:, None] & d_valid[None, :]
        rows = pid_bh * n_residual + offs_n - n_quantized
        k = tl.load(KR + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=tile_mask, other=0.0)
        k_partner = tl.load(KR + rows[:, None] * HEAD_DIM + partner[None, :], mask=tile_mask, other=0.0)
        positions = tl.maximum(tl.load(POS + batch * kv_len + offs_n, mask=n_valid, other=0), 0)
        k = _rotate(k, k_partner, positions, freq, sign, rotated, q)
        v = _token_tile(QV, VS, VZ, pid_bh * kv_len + offs_n, byte_col, shift, tile_mask, n_valid, HEAD_DIM // 2,
                        True)
        m_i, l_i, acc = _softmax_step(q, k, v, m_i, l_i, acc, mask_base, offs_m, offs_n, m_valid, n_valid,
                                      stride_mm, stride_mn, sm_scale, HAS_MASK, PRECISION)

    out = acc / l_i[:, None]
    o_ptrs = OUT + (pid_bh * q_len + offs_m[:, None]) * HEAD_DIM + offs_d[None, :]
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])


def _check_inv_freq(inv_freq, query: torch.Tensor) -> torch.Tensor:
    """``inv_freq`` [1 or batch, rot_dim / 2] with 2 <= rot_dim <= head_dim, as contiguous fp32 on query's device."""
    batch, head_dim = query.shape[0], query.shape[-1]
    if inv_freq is None:
        raise ValueError("the channel_groups key layout stores pre-RoPE keys: pass the rotary inv_freq")
    if inv_freq.dim() != 2 or inv_freq.shape[0] not in (1, batch) or not 1 <= inv_freq.shape[1] <= head_dim // 2:
        raise ValueError(f"inv_freq must be [1 or {batch}, rot_dim / 2] with rot_dim <= head_dim {head_dim}, "
                         f"got {tuple(inv_freq.shape)}")
    return inv_freq.to(device=query.device, dtype=torch.float32).contiguous()


def attention_triton(query, layer_past, attn_mask=None, scale=None, inv_freq=None):
    """Fused attention of ``query`` [b, heads, q_len, head_dim] over a quantized layer; returns query's dtype.

    Same contract as ``kvcache.quantized_attention.attention_torch`` (additive float mask, scale default
    1/sqrt(head_dim), ``inv_freq`` [1 or b, rot_dim / 2] needed by the ``"channel_groups"`` key layout). Needs CUDA
    tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
    """
    bits = cache_bits(query, layer_past)
    if not query.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"query must be float16/bfloat16/float32, got {query.dtype}")
    keys, (q_value, value_scale, value_zero) = layer_past
    grouped = isinstance(keys, GroupedKeys)
    batch, heads, q_len, head_dim = query.shape
    kv_len = q_value.shape[-2]
    mask = check_mask(attn_mask, query, kv_len)
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    if grouped:
        inv_freq = _check_inv_freq(inv_freq, query)

    out = torch.empty_like(query, memory_format=torch.contiguous_format)
    if q_len == 0 or batch * heads == 0:
        return out
    if kv_len == 0:
        raise ValueError("attention over an empty cache is undefined (kv_len == 0)")
    mask_arg = mask if mask is not None else out
    mask_strides = mask.stride() if mask is not None else (0, 0, 0, 0)
    grid = (triton.cdiv(q_len, BLOCK_M), batch * heads)
    common = dict(HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), HAS_MASK=mask is not None,
                  PRECISION="ieee" if query.dtype == torch.float32 else "tf32", BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    values = (q_value.contiguous(), value_scale.contiguous(), value_zero.contiguous())
    if not grouped:
        q_key, key_scale, key_zero = keys
        _quantized_attention_kernel[grid](
            query.contiguous(), q_key.contiguous(), key_scale.contiguous(), key_zero.contiguous(), *values,
            mask_arg, out, float(scale), q_len, kv_len, heads, *mask_strides, PACKED=bits == 4, **common,
        )
        return out
    n_quantized, n_groups = keys.q_key.shape[-2], keys.scale.shape[-2]
    if (n_groups == 0) != (n_quantized == 0) or (n_groups and n_quantized % n_groups):
        raise ValueError(f"grouped keys: {n_quantized} quantized positions do not split into {n_groups} groups")
    _grouped_key_attention_kernel[grid](
        query.contiguous(), keys.q_key.contiguous(), keys.scale.contiguous(), keys.zero.contiguous(),
        keys.residual.contiguous(), keys.positions.to(torch.int32).contiguous(), inv_freq, *values, mask_arg, out,
        float(scale), q_len, kv_len, n_quantized, n_quantized // n_groups if n_groups else 1, heads,
        inv_freq.stride(0) if inv_freq.shape[0] > 1 else 0, *mask_strides,
        ROT_DIM=2 * inv_freq.shape[1], **common,
    )
    return out
