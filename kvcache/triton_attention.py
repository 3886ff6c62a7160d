"""Fused Triton attention over a quantized (uint8 or packed uint4, token-granularity) KV cache.

Flash-style: each program owns BLOCK_M query rows of one (batch, head), walks the cache in BLOCK_N-position tiles,
dequantizes each key/value tile in registers (``scale * (q - zero)``) and keeps an online softmax, so no float copy of
the cache is ever materialised. Meant for decode and short query lengths; the additive mask is read through its
(possibly zero) strides, so padding masks, causal masks or full masks all work.
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

    if PACKED:
        width = HEAD_DIM // 2
        byte_col = offs_d // 2
        shift = (offs_d % 2) * 4
    else:
        width = HEAD_DIM
        byte_col = offs_d

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)

    for start in range(0, kv_len, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_valid = offs_n < kv_len
        rows = pid_bh * kv_len + offs_n
        tile_mask = n_valid[:, None] & d_valid[None, :]
        tile_offs = rows[:, None] * width + byte_col[None, :]

        kq = tl.load(QK + tile_offs, mask=tile_mask, other=0)
        if PACKED:
            kq = (kq >> shift[None, :]) & 0xF
        k_scale = tl.load(KS + rows, mask=n_valid, other=0.0).to(tl.float32)
        k_zero = tl.load(KZ + rows, mask=n_valid, other=0.0).to(tl.float32)
        k = ((kq.to(tl.float32) - k_zero[:, None]) * k_scale[:, None]).to(q.dtype)

        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale
        if HAS_MASK:
            m_ptrs = (MASK + batch * stride_mb + head * stride_mh
                      + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn)
            s += tl.load(m_ptrs, mask=m_valid[:, None] & n_valid[None, :], other=0.0).to(tl.float32)
        s = tl.where(n_valid[None, :], s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)

        vq = tl.load(QV + tile_offs, mask=tile_mask, other=0)
        if PACKED:
            vq = (vq >> shift[None, :]) & 0xF
        v_scale = tl.load(VS + rows, mask=n_valid, other=0.0).to(tl.float32)
        v_zero = tl.load(VZ + rows, mask=n_valid, other=0.0).to(tl.float32)
        v = ((vq.to(tl.float32) - v_zero[:, None]) * v_scale[:, None]).to(q.dtype)

        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    o_ptrs = OUT + (pid_bh * q_len + offs_m[:, None]) * HEAD_DIM + offs_d[None, :]
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])


def attention_triton(query, layer_past, attn_mask=None, scale=None):
    """Fused attention of ``query`` [b, heads, q_len, head_dim] over a quantized layer; returns query's dtype.

    Same contract as ``kvcache.quantized_attention.attention_torch`` (additive float mask, scale default
    1/sqrt(head_dim)). Needs CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``. Token key layout only
    (``quantized_attention`` runs the ``"channel_groups"`` layout on the torch path).
    """
    if isinstance(layer_past[0], GroupedKeys):
        raise ValueError("the triton kernel reads the token key layout only, not channel_groups")
    bits = cache_bits(query, layer_past)
    if not query.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"query must be float16/bfloat16/float32, got {query.dtype}")
    (q_key, key_scale, key_zero), (q_value, value_scale, value_zero) = layer_past
    batch, heads, q_len, head_dim = query.shape
    kv_len = q_key.shape[-2]
    mask = check_mask(attn_mask, query, kv_len)
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)

    out = torch.empty_like(query, memory_format=torch.contiguous_format)
    if q_len == 0 or batch * heads == 0:
        return out
    if kv_len == 0:
        raise ValueError("attention over an empty cache is undefined (kv_len == 0)")
    mask_arg = mask if mask is not None else out
    mask_strides = mask.stride() if mask is not None else (0, 0, 0, 0)
    grid = (triton.cdiv(q_len, BLOCK_M), batch * heads)
    _quantized_attention_kernel[grid](
        query.contiguous(), q_key.contiguous(), key_scale.contiguous(), key_zero.contiguous(),
        q_value.contiguous(), value_scale.contiguous(), value_zero.contiguous(), mask_arg, out,
        float(scale), q_len, kv_len, heads,
        *mask_strides,
        HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), PACKED=bits == 4,
        HAS_MASK=mask is not None, PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
    )
    return out
