"""Attention over a quantized layer without a float copy of it: the codes are read block by block (the CPU path).

Scores and weighted sums use the scale/zero algebra on the stored codes, so each block converts only its uint8
codes to a bounded float32 buffer (``block`` positions, by default ``BLOCK_BYTES`` of float32) before a batched
matmul:

* token keys (scale ``s`` and zero ``z`` per position): ``q·(s (k_q − z)) = s (q·k_q) − s z Σq``; the matmul gives
  ``q·k_q`` per block, the affine is applied once to the whole (small) score row.
* values (per position): ``Σ p s (v_q − z) = (p s) @ v_q − Σ p s z``: the per-token scale is folded into the
  probabilities.
* 4-bit token data: low and high nibbles go to the two halves of the buffer, the query (or the output) is
  permuted to match (even channels, then odd).
* ``"channel_groups"`` keys (pre-RoPE, per channel over groups of 64 positions): the rotation at each key's own
  position does not fold into one query-side matmul, so each block is dequantized and rotated in the buffer (cos/sin
  from ``kvcache.rotary.cos_sin_table``, computed once per NTK factor, not per step), then scored; the float
  residual is rotated and scored after the groups.

Scores are computed in float32 whatever the query dtype (the codes are exact there), then softmax in float32 as
in the reference; the result has the query's dtype. Temporaries: the score row ``[b, h, q, kv]`` and one block.
Same contract as ``kvcache.quantized_attention.attention_torch``, which stays the reference.

With ``kernels`` (the CPU extension of ``kvcache.cpu_kernels``, what ``quantized_attention`` "auto" passes on CPU
for a decode step) and no ``fresh``, the whole step is one call of the extension: scores straight from the codes
(token keys, or grouped keys dequantized and rotated in registers), softmax in float32, values from the codes.
"""
import math

import torch

from kvcache.quantize_cache import KEY_GROUP_SIZE, GroupedKeys
from kvcache.quantized_attention import cache_bits, check_mask
from kvcache.rotary import cos_sin_table

BLOCK_BYTES = 4 << 20


def default_block(rows: int, head_dim: int) -> int:
    """Positions per block: ``BLOCK_BYTES`` of float32 over ``rows`` (batch x heads) rows, a multiple of 64."""
    per_position = rows * head_dim * 4
    return max(KEY_GROUP_SIZE, BLOCK_BYTES // per_position // KEY_GROUP_SIZE * KEY_GROUP_SIZE)


def _fill_codes(buf: torch.Tensor, codes: torch.Tensor, bits: int) -> None:
    """Writes uint8 codes ``[rows, n, w]`` into the float buffer ``[rows, n, d]``: 4-bit low nibbles first."""
    if bits == 8:
        buf.copy_(codes)
    else:
        half = codes.shape[-1]
        buf[..., :half].copy_(codes & 0x0F)
        buf[..., half:].copy_(codes >> 4)


def _split_nibbles(t: torch.Tensor) -> torch.Tensor:
    """Even channels then odd ones: the order ``_fill_codes`` writes 4-bit codes in."""
    return torch.cat((t[..., 0::2], t[..., 1::2]), dim=-1)


def _merge_nibbles(t: torch.Tensor) -> torch.Tensor:
    """Inverse of ``_split_nibbles``."""
    half = t.shape[-1] // 2
    return torch.stack((t[..., :half], t[..., half:]), dim=-1).flatten(-2)


def _token_scores(query, keys, bits, stored, block, buf, scores):
    """Scores ``s (q·k_q) − s z Σq`` of the first ``stored`` positions of a token-layout key."""
    q_key, key_scale, key_zero = keys
    rows = query.shape[0]
    codes = q_key.reshape(rows, q_key.shape[-2], q_key.shape[-1])
    q = _split_nibbles(query) if bits == 4 else query
    for start in range(0, stored, block):
        n = min(block, stored - start)
        kb = buf[:, :n]
        _fill_codes(kb, codes[:, start:start + n], bits)
        scores[:, :, start:start + n] = torch.bmm(q, kb.transpose(1, 2))
    s = key_scale.reshape(rows, 1, -1)[..., :stored].float()
    sz = s * key_zero.reshape(rows, 1, -1)[..., :stored].float()
    head = scores[..., :stored]
    head.mul_(s).sub_(sz * query.sum(-1, keepdim=True))


def _rotate_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """In place, the NeoX-halves rotary of ``apply_rotary_pos_emb`` on the first ``2 * cos.shape[-1]`` channels
    (``cos``/``sin``: one value per frequency)."""
    half = cos.shape[-1]
    x1, x2 = x[..., :half], x[..., half:2 * half]
    t = x2 * sin
    x2.mul_(cos).addcmul_(x1, sin)
    x1.mul_(cos).sub_(t)


def _grouped_scores(query, keys: GroupedKeys, inv_freq, heads, stored, block, buf, scores):
    """Scores of the first ``stored`` positions of a ``"channel_groups"`` key: per block, dequantize and rotate."""
    if inv_freq is None:
        raise ValueError("the channel_groups key layout stores pre-RoPE keys: pass the rotary inv_freq")
    rows, _, d = query.shape
    b = rows // heads
    quantized = keys.q_key.shape[-2]
    codes = keys.q_key.reshape(rows, quantized, d // 2)
    scale = keys.scale.reshape(rows, -1, d).float()
    neg_zs = -(keys.zero.reshape(rows, -1, d).float() * scale)
    positions = keys.positions.clamp(min=0).long()
    cos_t, sin_t = cos_sin_table(inv_freq.to(query.device), int(positions.max()) + 1 if positions.numel() else 1)
    row = torch.arange(b, device=query.device)[:, None] if cos_t.shape[0] > 1 else torch.zeros(
        b, 1, dtype=torch.long, device=query.device)

    def rotate_and_score(kb, start, n):
        pos = positions[:, start:start + n]
        _rotate_(kb.view(b, heads, n, d), cos_t[row, pos][:, None], sin_t[row, pos][:, None])
        scores[:, :, start:start + n] = torch.bmm(query, kb.transpose(1, 2))

    end = min(quantized, stored)
    for start in range(0, end, block):
        n = min(block, quantized - start)
        g0, g1 = start // KEY_GROUP_SIZE, (start + n) // KEY_GROUP_SIZE
        kb = buf[:, :n]
        raw = codes[:, start:start + n]
        kb.copy_(torch.stack((raw & 0x0F, raw >> 4), dim=-1).view(rows, n, d))
        grouped = kb.view(rows, g1 - g0, KEY_GROUP_SIZE, d)
        torch.addcmul(neg_zs[:, g0:g1, None], grouped, scale[:, g0:g1, None], out=grouped)
        n = min(n, end - start)
        rotate_and_score(kb[:, :n], start, n)
    for start in range(quantized, stored, block):
        n = min(block, stored - start)
        kb = buf[:, :n]
        kb.copy_(keys.residual.reshape(rows, -1, d)[:, start - quantized:start - quantized + n])
        rotate_and_score(kb, start, n)


def _token_values(probs, values, bits, stored, block, buf):
    """``Σ p s (v_q − z)`` over the first ``stored`` positions: ``(p s) @ v_q − Σ p s z``, in float32."""
    q_value, value_scale, value_zero = values
    rows, q_len, _ = probs.shape
    d = buf.shape[-1]
    codes = q_value.reshape(rows, q_value.shape[-2], q_value.shape[-1])
    s = value_scale.reshape(rows, 1, -1)[..., :stored].float()
    weights = probs[..., :stored] * s
    out = -(weights * value_zero.reshape(rows, 1, -1)[..., :stored].float()).sum(-1, keepdim=True).expand(
        rows, q_len, d).contiguous()
    for start in range(0, stored, block):
        n = min(block, stored - start)
        vb = buf[:, :n]
        _fill_codes(vb, codes[:, start:start + n], bits)
        out.baddbmm_(weights[:, :, start:start + n], vb)
    return _merge_nibbles(out) if bits == 4 else out


def attention_blocked(query, layer_past, attn_mask=None, scale=None, fresh=None, inv_freq=None, block=None,
                      kernels=None):
    """softmax(query @ K^T * scale + mask) @ V over a quantized layer, reading its codes ``block`` positions at a
    time (default ``default_block``); arguments as ``attention_torch`` (``fresh``: the current chunk's float
    key/value, read for the last n positions instead of their codes). ``kernels``: the CPU extension of
    ``kvcache.cpu_kernels``: the whole step in one call of it (``_attend_with_kernels``) when there is no ``fresh``."""
    bits = cache_bits(query, layer_past)
    keys, values = layer_past
    b, h, q_len, d = query.shape
    kv_len = values[0].shape[-2]
    mask = check_mask(attn_mask, query, kv_len)
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    if kernels is not None and fresh is None:
        return _attend_with_kernels(kernels, query, keys, values, bits, mask, scale, inv_freq)
    rows = b * h
    block = default_block(rows, d) if block is None else block
    if block < 1:
        raise ValueError(f"block must be a positive number of positions, got {block}")
    n_fresh = 0 if fresh is None else fresh[0].shape[-2]
    stored = kv_len - n_fresh
    q = query.float().reshape(rows, q_len, d)
    if isinstance(keys, GroupedKeys):  # whole key groups per block
        block = max(KEY_GROUP_SIZE, block // KEY_GROUP_SIZE * KEY_GROUP_SIZE)
    buf = torch.empty(rows, max(1, min(block, kv_len)), d, dtype=torch.float32, device=query.device)
    scores = torch.empty(rows, q_len, kv_len, dtype=torch.float32, device=query.device)
    if isinstance(keys, GroupedKeys):
        _grouped_scores(q, keys, inv_freq, h, stored, block, buf, scores)
    else:
        _token_scores(q, keys, bits, stored, block, buf, scores)
    if n_fresh:
        scores[..., stored:] = torch.bmm(q, fresh[0].float().reshape(rows, n_fresh, d).transpose(1, 2))
    scores.mul_(scale)
    if mask is not None:
        scores.view(b, h, q_len, kv_len).add_(mask)
    probs = torch.softmax(scores, dim=-1)
    out = _token_values(probs, values, bits, stored, block, buf)
    if n_fresh:
        out.baddbmm_(probs[..., stored:], fresh[1].float().reshape(rows, n_fresh, d))
    return out.reshape(b, h, q_len, d).to(query.dtype)


def _attend_with_kernels(kernels, query, keys, values, bits, mask, scale, inv_freq):
    """The step in one call of the CPU kernels, straight from the cache's tensors (the reshapes, float32
    conversions and 4-bit channel order are done in C++): scores from the codes, softmax (float32), values."""
    if isinstance(keys, GroupedKeys):
        if inv_freq is None:
            raise ValueError("the channel_groups key layout stores pre-RoPE keys: pass the rotary inv_freq")
        positions = keys.positions
        cos_t, sin_t = cos_sin_table(inv_freq.to(query.device), int(positions.max()) + 1 if positions.numel() else 1)
        return kernels.attend_grouped(query, keys.q_key, keys.scale, keys.zero, keys.residual, cos_t, sin_t,
                                      positions, KEY_GROUP_SIZE, *values, mask, scale)
    return kernels.attend_token(query, *keys, *values, mask, scale, bits)
