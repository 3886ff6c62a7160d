"""The quantized KV cache in transformers-native models (Llama, Qwen2, Qwen3, ...): an attention implementation.

transformers' attention layers call ``cache.update(key, value, layer_idx)`` and hand what it returns to the attention
function named by ``config._attn_implementation``. With a ``QuantizedKVCache`` that return value is the quantized
layer, ``((q_key, key_scale, key_zero), (q_value, value_scale, value_zero))``; the function registered here
(``ATTENTION``) runs ``quantized_attention`` on it (the uint8 cache is read as is, never copied to float whole), and
plain float tensors (a ``DynamicCache``, or no cache) go to PyTorch's SDPA as usual. As in ``QWenLMHeadModel``, a
prefill chunk attends to its own keys/values in full precision (``QuantizedStates.fresh``) and to earlier positions
through the quantized cache. Grouped-query attention folds
each KV head's group of query heads into the query length, so the cache is never repeated per query head.

    use_quantized_kv_attention(model)
    model.generate(ids, past_key_values=QuantizedKVCache(bits=8), ...)                   # or bits=4, key_layout="token"

The ``"channel_groups"`` 4-bit key layout (keys stored before the rotary) is refused: these models rotate keys
before they reach the cache, so for them the 4-bit layout is ``key_layout="token"``.
"""
from __future__ import annotations

import torch

from kvcache.quantize_cache import GroupedKeys
from kvcache.quantized_attention import quantized_attention

ATTENTION = "qwen_quantized_kv"


def _attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention-function contract: query [b, h, q, d]; returns ([b, q, h, d], None)."""
    if not isinstance(key, (tuple, list, GroupedKeys)):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if isinstance(key, GroupedKeys):
        raise ValueError("the channel_groups key layout stores keys before the rotary, but this model rotates keys "
                         "before the cache: use QuantizedKVCache(bits=4, key_layout='token') (or bits=8)")
    b, heads, q_len, d = query.shape
    kv_heads = key[0].shape[1]
    groups = heads // kv_heads
    folded = query.reshape(b, kv_heads, groups * q_len, d)  # query head i reads KV head i // groups
    mask = attention_mask
    if mask is not None and groups > 1:
        mask = mask.expand(b, 1, q_len, mask.shape[-1]).repeat(1, 1, groups, 1)
    backend = "torch" if query.device.type == "cpu" else "auto"
    # a prefill chunk attends to its own keys/values in full precision and to earlier ones through the cache
    fresh = getattr(key, "fresh", None) if q_len > 1 else None
    out = quantized_attention(folded, (key, value), mask, scaling, backend=backend, fresh=fresh)
    return out.reshape(b, heads, q_len, d).transpose(1, 2).contiguous(), None


def register() -> str:
    """Register ``ATTENTION`` (the attention function and its additive mask) with transformers; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(ATTENTION, _attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, eager_mask)
    return ATTENTION


def use_quantized_kv_attention(model) -> None:
    """Make a transformers-native model read a ``QuantizedKVCache`` (float caches keep working, through SDPA)."""
    model.set_attn_implementation(register())
