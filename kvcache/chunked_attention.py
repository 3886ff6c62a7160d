"""Attention over a quantized KV layer in blocks of positions, without a float copy of the layer (CPU, long chunks).

The reference (``attention_torch``) dequantizes the whole layer's keys and values to float at every step, so a
longer context costs more bytes than the float cache. Here the uint8 (or packed 4-bit) codes are read one block of
``chunk`` positions at a time and the per-token scale and zero point are applied by algebra instead of to every
element:

* scores: ``q·(s·(k_q − z)) = s·(q·k_q) − s·z·Σq`` — one matmul against the codes converted to float32 in the
  block, then a scale and a shift per position;
* values: ``Σ p·s·(v_q − z) = (p·s)·v_q − (p·s)·z`` — the per-token scale folds into the probabilities.

4-bit codes are unpacked as (low nibbles, high nibbles), i.e. channels in the order 0, 2, 4, ..., 1, 3, ...; the
query is permuted to match and the output permuted back. The ``"channel_groups"`` keys (pre-RoPE, per-channel
scales) are dequantized and rotated block by block (cos/sin read from ``kvcache.rotary.cached_cos_sin_at``).
Blocks are combined with an online softmax, so temporaries are a few blocks of ``chunk`` positions, far below one
layer's float K/V. Arithmetic is float32 whatever the query dtype (codes convert to float32 exactly); the result
has the query's dtype. Measured alternatives (torch's ``_weight_int8pack_mm`` per head, bfloat16 blocks) were
slower on this CPU (``benchmarks/kv_attention_kernels.py``).
"""
import math

import torch

from kvcache.quantize_cache import KEY_GROUP_SIZE, GroupedKeys
from kvcache.quantized_attention import cache_bits, check_mask, rotated_keys

DEFAULT_CHUNK = 1024
UNDERFLOW = -87.0


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Packed 4-bit codes [..., d / 2] -> float32 [..., d]: low nibbles (even channels), then high (odd channels)."""
    half = packed.shape[-1]
    out = torch.empty(*packed.shape[:-1], 2 * half, dtype=torch.float32, device=packed.device)
    out[..., :half] = packed & 0x0F
    out[..., half:] = packed >> 4
    return out


def _codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    return q.float() if bits == 8 else _nibbles(q)


def _channel_order(head_dim: int, bits: int, device) -> torch.Tensor:
    """Channel permutation of the unpacked codes (identity for 8 bits)."""
    if bits == 8:
        return torch.arange(head_dim, device=device)
    return torch.cat((torch.arange(0, head_dim, 2, device=device), torch.arange(1, head_dim, 2, device=device)))


class _OnlineSoftmax:
    """Running max, normaliser and weighted sum over blocks of scores (float32)."""

    def __init__(self, query: torch.Tensor):
        b, h, q_len, d = query.shape
        self.max = torch.full((b, h, q_len, 1), -math.inf, device=query.device)
        self.norm = torch.zeros((b, h, q_len, 1), device=query.device)
        self.acc = torch.zeros((b, h, q_len, d), device=query.device)

    def weights(self, scores: torch.Tensor) -> torch.Tensor:
        """Rescales the running sums to the new max and returns this block's unnormalised probabilities."""
        new_max = torch.maximum(self.max, scores.amax(dim=-1, keepdim=True))
        safe = new_max.clamp(min=torch.finfo(torch.float32).min)  # a block masked with -inf only stays at 0
        # torch's exp is ~4x slower where its result underflows (masked positions: 35 vs 9 ms for a 9 x 1024 x 1024
        # causal block here), and denormal probabilities slow the value matmul 6x: arguments below UNDERFLOW, whose
        # exp (< 1.7e-38) cannot change a sum whose largest term is 1, give exact zeros instead
        shifted = scores - safe
        underflow = shifted < UNDERFLOW
        probs = shifted.clamp_(min=UNDERFLOW).exp_().masked_fill_(underflow, 0.0)
        correction = torch.exp(self.max - safe)
        self.norm.mul_(correction).add_(probs.sum(dim=-1, keepdim=True))
        self.acc.mul_(correction)
        self.max = new_max
        return probs

    def result(self) -> torch.Tensor:
        return self.acc / self.norm


def _token_key_scores(q, q_sum, keys, bits, start, end):
    """Raw scores q·K^T [b, h, q_len, end - start] of per-token quantized keys, by the scale/zero algebra."""
    q_key, key_scale, key_zero = (t[..., start:end, :] for t in keys)
    raw = torch.matmul(q, _codes(q_key, bits).transpose(-1, -2))
    scale = key_scale.float().transpose(-1, -2)
    return (raw - q_sum * key_zero.float().transpose(-1, -2)).mul_(scale)


def _group_size(keys: GroupedKeys) -> int:
    groups = keys.scale.shape[-2]
    return keys.q_key.shape[-2] // groups if groups else KEY_GROUP_SIZE


def _grouped_key_scores(q, keys: GroupedKeys, inv_freq, start, end):
    """Raw scores of ``"channel_groups"`` keys over [start, end) (start a multiple of the group size): the block's
    whole groups dequantized, the residual part appended, rotated at their positions."""
    group, quantized = _group_size(keys), keys.q_key.shape[-2]
    g0, g1 = min(start, quantized) // group, -(-min(end, quantized) // group)
    residual = slice(max(start - quantized, 0), max(end - quantized, 0))
    positions = torch.cat((keys.positions[:, g0 * group:g1 * group], keys.positions[:, max(start, quantized):end]),
                          dim=-1)
    block = GroupedKeys(keys.q_key[..., g0 * group:g1 * group, :], keys.scale[..., g0:g1, :],
                        keys.zero[..., g0:g1, :], keys.residual[..., residual, :], positions)
    key = rotated_keys(block, inv_freq, torch.float32)
    return torch.matmul(q, key[..., :end - start, :].transpose(-1, -2))


def attention_chunked(query, layer_past, attn_mask=None, scale=None, fresh=None, inv_freq=None,
                      chunk=DEFAULT_CHUNK):
    """softmax(query @ K^T * scale + mask) @ V over the quantized ``layer_past``, ``chunk`` positions at a time.

    Same arguments and result as ``kvcache.quantized_attention.attention_torch`` (``fresh``: the last n positions
    read from the chunk's own float keys/values). ``chunk`` is rounded up to a multiple of the key group size for
    the ``"channel_groups"`` layout.
    """
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    bits = cache_bits(query, layer_past)
    keys, values = layer_past
    grouped = isinstance(keys, GroupedKeys)
    if grouped and inv_freq is None:
        raise ValueError("the channel_groups key layout stores pre-RoPE keys: pass the rotary inv_freq")
    head_dim = query.shape[-1]
    kv_len = values[0].shape[-2]
    mask = check_mask(attn_mask, query, kv_len)
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    if grouped:
        chunk = -(-chunk // _group_size(keys)) * _group_size(keys)
    q = query.float()
    order = _channel_order(head_dim, bits, query.device)
    q_keys = q if grouped else q[..., order]
    q_sum = q_keys.sum(dim=-1, keepdim=True)
    n_fresh = 0 if fresh is None else fresh[0].shape[-2]
    softmax = _OnlineSoftmax(query)

    def add_block(scores, start, end, weighted_sum):
        scores = scores.mul_(scale)
        if mask is not None:
            scores = scores.add_(mask[..., start:end].float())
        weighted_sum(softmax.weights(scores))

    for start in range(0, kv_len - n_fresh, chunk):
        end = min(start + chunk, kv_len - n_fresh)
        if grouped:
            scores = _grouped_key_scores(q, keys, inv_freq, start, end)
        else:
            scores = _token_key_scores(q_keys, q_sum, keys, bits, start, end)

        def value_sum(probs, start=start, end=end):
            q_value, value_scale, value_zero = (t[..., start:end, :] for t in values)
            weighted = probs.mul_(value_scale.float().transpose(-1, -2))
            softmax.acc.add_(torch.matmul(weighted, _codes(q_value, bits)))
            softmax.acc.sub_(torch.matmul(weighted, value_zero.float()))

        add_block(scores, start, end, value_sum)
    if n_fresh:
        fresh_key, fresh_value = (t.float() for t in fresh)
        add_block(torch.matmul(q, fresh_key.transpose(-1, -2)), kv_len - n_fresh, kv_len,
                  lambda probs: softmax.acc.add_(torch.matmul(probs, fresh_value[..., order])))
    out = softmax.result()
    return out[..., torch.argsort(order)].to(query.dtype)
