"""The quantized KV cache in transformers-native models (Llama, Qwen2, Qwen3, ...): an attention implementation.

transformers' attention layers call ``cache.update(key, value, layer_idx)`` and hand what it returns to the attention
function named by ``config._attn_implementation``. With a ``QuantizedKVCache`` that return value is the quantized
layer, ``((q_key, key_scale, key_zero), (q_value, value_scale, value_zero))``; the function registered here
(``ATTENTION``) runs ``quantized_attention`` on it (the uint8 cache is read as is, never copied to float whole), and
plain float tensors (a ``DynamicCache``, or no cache) go to PyTorch's SDPA as usual. As in ``QWenLMHeadModel``, a
prefill chunk attends to its own keys/values in full precision (``QuantizedStates.fresh``) and to earlier positions
through the quantized cache. Grouped-query attention folds each KV head's group of query heads into the query
length, so the cache is never repeated per query head.

    use_quantized_kv_attention(model)
    model.generate(ids, cache=QuantizedKVCache(bits=4), ...)           # or bits=8, or bits=4, key_layout="token"

The 4-bit ``"channel_groups"`` key layout stores keys before the rotary, but these models rotate keys before they
reach the cache. A forward pre-hook on each attention layer (``_PreRotaryCache``) hands the cache the keys rotated
back with the layer's own cos/sin (the rotation is orthogonal, so this is exact up to float rounding) and their
positions (-1 for left padding, read off the mask); the reader rotates them again with the model's rotary
``inv_freq``, as for Qwen v1. Rotary embeddings whose frequencies change with the length (``dynamic`` NTK) are
re-applied with the current frequencies to every cached key, as the Qwen v1 model does, where transformers' float
cache keeps each key's rotation of the step it was computed at.
"""
from __future__ import annotations

import torch

from kvcache.quantize_cache import GroupedKeys
from kvcache.quantized_attention import quantized_attention
from kvcache.quantized_cache import QuantizedKVCache
from kvcache.rotary import apply_rotary_pos_emb

ATTENTION = "qwen_quantized_kv"
_CACHE_KWARGS = ("cache", "past_key_values")


class _PreRotaryCache:
    """What one attention call sees as its cache when the layout is ``channel_groups``: ``update`` un-rotates the
    incoming keys with the call's cos/sin and passes them on with their positions. The float keys of the call
    (``fresh``, rotated, divided by the rotary's attention scaling as the cached ones are) serve a prefill chunk."""

    def __init__(self, cache, cos, sin, positions, inv_freq, scaling):
        self.cache, self.cos, self.sin, self.positions = cache, cos, sin, positions
        self.inv_freq, self.scaling = inv_freq, scaling
        self.fresh = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        cos, sin = self.cos.float()[:, None], self.sin.float()[:, None]
        raw = apply_rotary_pos_emb(key_states.float(), cos, -sin)
        if self.scaling != 1.0:  # yarn-style rotaries scale cos/sin; most leave them at 1 (no extra copies then)
            raw, key_states = raw / self.scaling ** 2, key_states / self.scaling
        self.fresh = (key_states, value_states)
        return self.cache.update(raw.to(key_states.dtype), value_states, layer_idx, {"positions": self.positions})


def _positions(position_ids, attention_mask, b: int, n: int) -> torch.Tensor:
    """Rotary position of each new slot, -1 where the slot is padding (masked for the chunk's last query)."""
    positions = position_ids.expand(b, n).to(torch.int32)
    if attention_mask is None:
        return positions
    last = attention_mask[:, 0, -1, -n:].expand(b, n)
    valid = last if last.dtype == torch.bool else last == 0
    return positions.masked_fill(~valid, -1)


def _pre_rotary_hook(rotary):
    def hook(module, args, kwargs):
        name = next((k for k in _CACHE_KWARGS if k in kwargs), None)
        cache = kwargs.get(name) if name else None
        if not isinstance(cache, QuantizedKVCache) or cache.key_layout != "channel_groups":
            return None
        cos, sin = kwargs["position_embeddings"]
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        b, n = hidden.shape[:2]
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            raise ValueError("the channel_groups key layout needs the layer's position_ids")
        scaling = float(getattr(rotary, "attention_scaling", 1.0))
        inv_freq = rotary.inv_freq.float()[None].to(hidden.device)
        if cos.shape[-1] != 2 * inv_freq.shape[-1]:
            raise ValueError(f"rotary cos/sin of width {cos.shape[-1]} do not match inv_freq of "
                             f"{inv_freq.shape[-1]} frequencies")
        adapter = _PreRotaryCache(cache, cos, sin, _positions(position_ids, kwargs.get("attention_mask"), b, n),
                                  inv_freq, scaling)
        return args, {**kwargs, name: adapter, "pre_rotary": adapter}

    return hook


def _attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, pre_rotary=None,
               **kwargs):
    """transformers' attention-function contract: query [b, h, q, d]; returns ([b, q, h, d], None)."""
    if not isinstance(key, (tuple, list, GroupedKeys)):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    b, heads, q_len, d = query.shape
    inv_freq = None
    if isinstance(key, GroupedKeys):
        if pre_rotary is None:
            raise ValueError("the channel_groups key layout needs use_quantized_kv_attention(model) on a model with "
                             "a rotary embedding module; else use QuantizedKVCache(bits=4, key_layout='token')")
        inv_freq = pre_rotary.inv_freq
        scaling = (scaling if scaling is not None else d ** -0.5) * pre_rotary.scaling
        fresh = pre_rotary.fresh if q_len > 1 else None
    else:
        fresh = getattr(key, "fresh", None) if q_len > 1 else None
    kv_heads = value[0].shape[1]
    groups = heads // kv_heads
    folded = query.reshape(b, kv_heads, groups * q_len, d)  # query head i reads KV head i // groups
    mask = attention_mask
    if mask is not None and groups > 1:
        mask = mask.expand(b, 1, q_len, mask.shape[-1]).repeat(1, 1, groups, 1)
    # a prefill chunk attends to its own keys/values in full precision and to earlier ones through the cache
    out = quantized_attention(folded, (key, value), mask, scaling, fresh=fresh, inv_freq=inv_freq)
    return out.reshape(b, heads, q_len, d).transpose(1, 2).contiguous(), None


def register() -> str:
    """Register ``ATTENTION`` (the attention function and its additive mask) with transformers; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(ATTENTION, _attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, eager_mask)
    return ATTENTION


def use_quantized_kv_attention(model) -> None:
    """Make a transformers-native model read a ``QuantizedKVCache`` (float caches keep working, through SDPA), in
    both key layouts."""
    model.set_attn_implementation(register())
    decoder = model.get_decoder()
    rotary = getattr(decoder, "rotary_emb", None)
    if rotary is None or getattr(model, "_pre_rotary_hooks", None) is not None:
        return
    model._pre_rotary_hooks = [layer.self_attn.register_forward_pre_hook(_pre_rotary_hook(rotary), with_kwargs=True)
                               for layer in decoder.layers]
