"""Attention of float queries over a quantized KV cache: a plain-torch reference and a backend dispatcher.

``layer_past`` is ``((q_key, key_scale, key_zero), (q_value, value_scale, value_zero))`` as returned by
``QuantizedKVCache.update``. Whether it is 8-bit or packed 4-bit is read off the shapes: q_key's last dimension is
head_dim for 8 bits and head_dim / 2 for 4 bits. With the ``"channel_groups"`` key layout the keys are a
``GroupedKeys`` (pre-RoPE, per-channel groups plus a float residual); they are dequantized and rotated with the
stored positions and the caller's ``inv_freq`` (``kvcache.rotary``) before the scores, so the attention needs
``inv_freq`` then.

``attn_mask`` is additive (0 keeps, a large negative value masks), floating point, broadcastable to
``[batch, 1 or heads, q_len, kv_len]``; ``None`` means no mask (so callers add their causal mask themselves).
"""
import logging
import math

import torch

from kvcache.quantize_cache import GroupedKeys, dequantize_cache_torch, dequantize_key_groups
from kvcache.rotary import apply_rotary_pos_emb, cached_cos_sin_at

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "blocked", "triton", "cuda")
# Up to this many queries per row (decode, short chunks) "auto" on CPU takes the CPU kernels (kvcache.cpu_kernels),
# which loop over the queries for every cached position; longer chunks take the matmul blocks of attention_chunked.
KERNEL_QUERIES = 16
_cuda_grouped_logged = False


def _check_grouped(query: torch.Tensor, keys: GroupedKeys, values) -> None:
    """Rejects a malformed ``"channel_groups"`` layer_past."""
    q_value = values[0]
    b, h, _, head_dim = query.shape
    kv_len = keys.positions.shape[-1]
    if keys.q_key.dtype != torch.uint8 or q_value.dtype != torch.uint8:
        raise ValueError(f"quantized key/value must be uint8, got {keys.q_key.dtype}/{q_value.dtype}")
    if tuple(q_value.shape) != (b, h, kv_len, head_dim // 2) or tuple(keys.positions.shape) != (b, kv_len):
        raise ValueError(f"values {tuple(q_value.shape)} / positions {tuple(keys.positions.shape)} do not fit "
                         f"query {tuple(query.shape)} with {kv_len} cached positions")
    if keys.q_key.shape[-2] + keys.residual.shape[-2] != kv_len or keys.scale.shape != keys.zero.shape:
        raise ValueError("grouped keys: quantized + residual positions must equal the cached positions")


def cache_bits(query: torch.Tensor, layer_past) -> int:
    """Returns 8 or 4 from the stored width versus the query's head_dim; rejects malformed layer_past."""
    if isinstance(layer_past[0], GroupedKeys):
        _check_grouped(query, *layer_past)
        return 4
    (q_key, key_scale, key_zero), (q_value, value_scale, value_zero) = layer_past
    head_dim = query.shape[-1]
    if q_key.dtype != torch.uint8 or q_value.dtype != torch.uint8:
        raise ValueError(f"quantized key/value must be uint8, got {q_key.dtype}/{q_value.dtype}")
    if q_key.shape != q_value.shape:
        raise ValueError(f"q_key and q_value shapes differ: {tuple(q_key.shape)} vs {tuple(q_value.shape)}")
    if q_key.dim() != 4 or query.dim() != 4 or q_key.shape[:2] != query.shape[:2]:
        raise ValueError(
            f"query {tuple(query.shape)} and q_key {tuple(q_key.shape)} must be [batch, heads, seq, dim] alike"
        )
    expected_scale = (*q_key.shape[:3], 1)
    for name, t in (("key_scale", key_scale), ("key_zero", key_zero), ("value_scale", value_scale),
                    ("value_zero", value_zero)):
        if tuple(t.shape) != expected_scale:
            raise ValueError(f"{name} must have shape {expected_scale}, got {tuple(t.shape)}")
    if q_key.shape[-1] == head_dim:
        return 8
    if 2 * q_key.shape[-1] == head_dim:
        return 4
    raise ValueError(f"q_key last dim {q_key.shape[-1]} fits neither 8-bit nor 4-bit storage of head_dim {head_dim}")


def check_mask(attn_mask, query: torch.Tensor, kv_len: int):
    """Validates an additive mask and returns it expanded (as a view) to [b, heads, q_len, kv_len], or None."""
    if attn_mask is None:
        return None
    if not attn_mask.is_floating_point():
        raise ValueError(f"attn_mask must be an additive floating-point mask, got {attn_mask.dtype}")
    b, h, q_len, _ = query.shape
    try:
        return attn_mask.expand(b, h, q_len, kv_len)
    except RuntimeError as err:
        raise ValueError(
            f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to {(b, h, q_len, kv_len)}"
        ) from err


def _dequantized(q, scale, zero, bits, dtype):
    """``scale * (q - zero)`` computed in float32 (the exact stored value, whatever the scales' dtype), in dtype."""
    return dequantize_cache_torch(q, scale.float(), zero.float(), bits=bits).to(dtype)


def rotated_keys(keys: GroupedKeys, inv_freq: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float keys ``[b, h, kv_len, d]`` of a ``"channel_groups"`` layer: dequantized groups (in float32, then
    dtype) and the residual, rotated at their stored positions (padding slots, position -1, at position 0: they are
    masked anyway)."""
    if inv_freq is None:
        raise ValueError("the channel_groups key layout stores pre-RoPE keys: pass the rotary inv_freq")
    groups = dequantize_key_groups(keys.q_key, keys.scale.float(), keys.zero.float())
    key = torch.cat((groups.to(dtype), keys.residual.to(dtype)), dim=-2)
    cos, sin = cached_cos_sin_at(keys.positions.clamp(min=0), inv_freq.to(key.device))
    return apply_rotary_pos_emb(key, cos, sin)


def attention_torch(query, layer_past, attn_mask=None, scale=None, softmax_in_fp32=True, fresh=None, inv_freq=None):
    """softmax(query @ K^T * scale + mask) @ V with K, V dequantized from ``layer_past``; returns query's dtype.

    ``scale`` defaults to 1/sqrt(head_dim); the query is otherwise taken as is (logn scaling is the caller's).
    ``fresh``: the current chunk's own float ``(key, value)`` ``[b, h, n, d]`` (keys rotated); the last n cached
    positions are read from it instead of from their quantized copy (a chunk attends to itself in full precision).
    ``inv_freq``: the rotary inverse frequencies ``[b or 1, rot_dim / 2]``, needed by (only) the ``"channel_groups"``
    key layout.
    """
    bits = cache_bits(query, layer_past)
    keys, (q_value, value_scale, value_zero) = layer_past
    if isinstance(keys, GroupedKeys):
        key = rotated_keys(keys, inv_freq, query.dtype)
    else:
        key = _dequantized(*keys, bits, query.dtype)
    mask = check_mask(attn_mask, query, key.shape[-2])
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    value = _dequantized(q_value, value_scale, value_zero, bits, query.dtype)
    if fresh is not None:
        n = fresh[0].shape[-2]
        key[..., -n:, :] = fresh[0]
        value[..., -n:, :] = fresh[1]
    scores = torch.matmul(query, key.transpose(-1, -2))
    if softmax_in_fp32:
        scores = scores.float()
    scores = scores * scale
    if mask is not None:
        scores = scores + mask.to(scores.dtype)
    probs = torch.softmax(scores, dim=-1).to(query.dtype)
    return torch.matmul(probs, value)


def attention_cuda_kernels(kernels, query, layer_past, attn_mask=None, scale=None):
    """Scores and weighted sum through the compiled fp16 cache kernels; mask and softmax (fp32) in torch.

    Token key layout only (``quantized_attention`` sends the ``"channel_groups"`` layout elsewhere)."""
    if isinstance(layer_past[0], GroupedKeys):
        raise ValueError("the CUDA cache kernels read the token key layout only, not channel_groups")
    bits = cache_bits(query, layer_past)
    (q_key, key_scale, key_zero), (q_value, value_scale, value_zero) = layer_past
    mask = check_mask(attn_mask, query, q_key.shape[-2])
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    half = lambda t: t.to(torch.float16).contiguous()  # noqa: E731
    b, h, q_len, head_dim = query.shape
    kv_len = q_key.shape[-2]
    scores = torch.zeros((b, h, q_len, kv_len), dtype=torch.float16, device=query.device)
    score_fn = kernels.vecquant8matmul_batched_faster_old if bits == 8 else kernels.vecquant4matmul_batched_faster_old
    score_fn(half(query), q_key.transpose(-1, -2).contiguous(), scores, half(key_scale), half(key_zero))
    scores = scores.float() * scale
    if mask is not None:
        scores = scores + mask.float()
    probs = torch.softmax(scores, dim=-1).to(torch.float16).contiguous()
    out = torch.zeros((b, h, q_len, head_dim), dtype=torch.float16, device=query.device)
    sum_fn = (kernels.vecquant8matmul_batched_column_compression_faster_old if bits == 8
              else kernels.vecquant4matmul_batched_column_compression_faster_old)
    sum_fn(probs, q_value.contiguous(), out, half(value_scale), half(value_zero))
    return out.to(query.dtype)


def _triton_usable(query: torch.Tensor) -> bool:
    if not query.is_cuda:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _attention_grouped(query, layer_past, attn_mask, scale, backend, inv_freq):
    """The ``"channel_groups"`` key layout, which the CUDA kernels cannot read: the Triton kernel or torch."""
    global _cuda_grouped_logged
    if backend == "cuda" and not _cuda_grouped_logged:
        _cuda_grouped_logged = True
        logger.warning("the CUDA cache kernels read the token key layout only; channel_groups uses the Triton kernel "
                       "(torch where Triton cannot run)")
    if backend == "triton" or _triton_usable(query):
        from kvcache.triton_attention import attention_triton

        return attention_triton(query, layer_past, attn_mask, scale, inv_freq=inv_freq)
    return _blocked(query, layer_past, attn_mask, scale, inv_freq=inv_freq)


def _blocked(*args, **kwargs):
    from kvcache.blocked_attention import attention_blocked

    return attention_blocked(*args, **kwargs)


def quantized_attention(query, layer_past, attn_mask, scale, backend="auto", fresh=None, inv_freq=None):
    """Attention over a quantized layer with the chosen backend.

    "auto" off CUDA runs the CPU kernels of ``kvcache.cpu_kernels`` through ``attention_blocked`` for up to
    ``KERNEL_QUERIES`` queries, head_dim 64/128 and no ``fresh`` (the uint8 codes read once, converted in registers),
    else (or when the kernels cannot be built) ``kvcache.chunked_attention.attention_chunked`` (the codes read block
    by block with the scale/zero algebra, no float copy of the layer, ``fresh`` taken); both read both key layouts. "torch" is the
    reference that dequantizes the whole layer. Otherwise, with ``fresh`` (the current chunk's float key/value, see
    ``attention_torch``) the torch reference runs whatever the backend: the fused kernels read every position from
    the quantized cache.

    On CUDA, "auto" picks the compiled CUDA kernels when they are already loaded in this process (see
    ``kvcache.cpp_kernels.load_cache_kernels``) and the tensors are on CUDA, else the fused Triton kernel on CUDA,
    else the torch reference. "cuda" builds/loads the kernels on demand and falls back to torch if that fails. The
    CUDA kernels do not read the ``"channel_groups"`` key layout (which needs ``inv_freq``): it goes to the Triton
    kernel ("triton", or "auto"/"cuda" on CUDA with Triton installed; "cuda" logs that once), else to torch.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto" and not query.is_cuda:
        if fresh is None and query.shape[-2] <= KERNEL_QUERIES and query.shape[-1] in (64, 128):
            from kvcache.cpu_kernels import load_cpu_kernels

            kernels = load_cpu_kernels()
            if kernels is not None:
                return _blocked(query, layer_past, attn_mask, scale, fresh=fresh, inv_freq=inv_freq, kernels=kernels)
        from kvcache.chunked_attention import attention_chunked

        return attention_chunked(query, layer_past, attn_mask, scale, fresh=fresh, inv_freq=inv_freq)
    if backend == "torch" or fresh is not None:
        return attention_torch(query, layer_past, attn_mask, scale, fresh=fresh, inv_freq=inv_freq)
    if isinstance(layer_past[0], GroupedKeys):
        return _attention_grouped(query, layer_past, attn_mask, scale, backend, inv_freq)
    if backend == "triton":
        from kvcache.triton_attention import attention_triton

        return attention_triton(query, layer_past, attn_mask, scale)

    from kvcache import cpp_kernels

    if backend == "cuda":
        kernels = cpp_kernels.load_cache_kernels() if query.is_cuda else None
        if kernels is None:
            logger.debug("CUDA cache kernels unavailable; using the blocked torch path")
            return _blocked(query, layer_past, attn_mask, scale)
        return attention_cuda_kernels(kernels, query, layer_past, attn_mask, scale)

    kernels = cpp_kernels.loaded_cache_kernels()
    if query.is_cuda and kernels is not None:
        return attention_cuda_kernels(kernels, query, layer_past, attn_mask, scale)
    if _triton_usable(query):
        from kvcache.triton_attention import attention_triton

        return attention_triton(query, layer_past, attn_mask, scale)
    return _blocked(query, layer_past, attn_mask, scale)
