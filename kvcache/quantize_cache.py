"""Asymmetric uint8 / packed-uint4 quantization of KV-cache tensors laid out as [batch, heads, seq, head_dim].

Two granularities:

* ``"token"`` (default): one scale and one integer zero point per (batch, head, position), taken over head_dim.
  The quantized range always contains 0, so the zero point is an integer in ``[qmin, qmax]``; that keeps
  ``scale * (q - zero)`` exact in bf16/fp16 apart from the final product, and makes every row round-trip within
  ``scale / 2`` (round to nearest). Rows whose values are all equal (zeros included) are stored exactly.
* ``"chunk"``: the arithmetic of the original Qwen release, bit for bit: one min/max per (batch, head) over the whole
  chunk being quantized, float zero point, truncation instead of rounding, ``bits`` ignored. A constant chunk
  divides by zero there, as it did in the original.

With ``bits=4`` (token granularity) two values share a byte along head_dim: element ``2j`` in the low nibble and
``2j + 1`` in the high nibble, so the last dimension is ``head_dim // 2``.

Keys may instead be kept before the rotary and quantized per channel over groups of positions
(``quantize_key_groups``, 4 bits, the ``"channel_groups"`` layout of ``QuantizedKVCache``).

NaN or infinite inputs raise ``ValueError``: a single such value would silently poison the scale of its whole row
(or chunk) and every later attention step reading it, so failing loudly is the safer contract.
"""
from typing import NamedTuple

import torch

GRANULARITIES = ("token", "chunk")


def _as_float(value, name: str) -> float:
    """Reads a python number out of an int/float or a one-element tensor."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must hold a single value, got shape {tuple(value.shape)}")
        return float(value.item())
    return float(value)


def _check_finite(fdata: torch.Tensor) -> None:
    if not bool(torch.isfinite(fdata).all()):
        raise ValueError("quantize_cache_v: fdata contains NaN or inf values, which cannot be quantized")


def pack_int4(qdata: torch.Tensor) -> torch.Tensor:
    """Packs uint8 values in [0, 15] pairwise along the last dim: even index -> low nibble, odd -> high nibble."""
    if qdata.shape[-1] % 2 != 0:
        raise ValueError(f"4-bit packing needs an even last dimension, got {qdata.shape[-1]}")
    return (qdata[..., 0::2] | (qdata[..., 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_int4``: [..., n/2] uint8 -> [..., n] uint8 values in [0, 15]."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


def _quantize_chunk(fdata, qmax, qmin):
    """The original Qwen `quantize_cache_v` arithmetic (per (batch, head) min/max, truncation)."""
    shape = fdata.shape
    fdata_cal = torch.flatten(fdata, 2)
    fmax = torch.amax(fdata_cal, dim=-1, keepdim=True)
    fmin = torch.amin(fdata_cal, dim=-1, keepdim=True)
    if not isinstance(qmax, torch.Tensor):
        qmax = torch.tensor(qmax)
    if not isinstance(qmin, torch.Tensor):
        qmin = torch.tensor(qmin)
    if qmax.device != fmax.device:
        qmax = qmax.to(fdata.device)
        qmin = qmin.to(fdata.device)
    scale = (fmax - fmin) / (qmax - qmin)
    zero = qmin - fmin / scale
    scale = scale.unsqueeze(-1).repeat(1, 1, shape[2], 1).contiguous()
    zero = zero.unsqueeze(-1).repeat(1, 1, shape[2], 1).contiguous()
    res_data = fdata / scale + zero
    qdata = torch.clamp(res_data, qmin, qmax).to(torch.uint8)
    return qdata.contiguous(), scale, zero


def _round_up_to_dtype(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Casts float32 ``value`` to ``dtype`` rounding upwards, so a stored scale never shrinks the covered range."""
    stored = value.to(dtype)
    if dtype == torch.float32:
        return stored
    bumped = (value * (1.0 + torch.finfo(dtype).eps)).to(dtype)
    return torch.where(stored.float() < value, bumped, stored)


def _quantize_token(fdata, bits, qmax, qmin):
    """Per-(batch, head, position) asymmetric quantization over head_dim with round to nearest.

    8-bit: the range is widened to contain 0 so the zero point is an integer on the grid (exact even in bf16).
    4-bit: the plain min/max grid with a fractional zero point; with only 16 levels, widening the range to 0 costs
    far more than rounding the stored zero (which the codes are computed against, so it adds no error).
    """
    x = fdata.float()
    fmin = torch.amin(x, dim=-1, keepdim=True)
    fmax = torch.amax(x, dim=-1, keepdim=True)
    widen = bits == 8
    lo = torch.clamp(fmin, max=0.0) if widen else fmin
    hi = torch.clamp(fmax, min=0.0) if widen else fmax
    constant = fmax == fmin

    scale = _round_up_to_dtype((hi - lo) / (qmax - qmin), fdata.dtype)
    scale32 = scale.float()
    zero32 = qmin - lo / torch.where(constant, 1.0, scale32)
    zero32 = torch.clamp(torch.round(zero32), qmin, qmax) if widen else zero32.to(fdata.dtype).float()

    # Constant rows (c, c, ..., c): scale = |c| and q - zero = sign(c), which reconstructs c exactly.
    abs_c = fmax.abs()
    const_scale = torch.where(abs_c > 0, abs_c, torch.ones_like(abs_c))
    const_zero = torch.where(fmax < 0, torch.full_like(abs_c, qmin + 1.0), torch.full_like(abs_c, qmin))
    scale32 = torch.where(constant, const_scale, scale32)
    zero32 = torch.where(constant, const_zero, zero32)

    q = torch.clamp(torch.round(x / scale32 + zero32), qmin, qmax).to(torch.uint8)
    if bits == 4:
        q = pack_int4(q)
    return q.contiguous(), scale32.to(fdata.dtype).contiguous(), zero32.to(fdata.dtype).contiguous()


def quantize_cache_v(fdata, bits, qmax, qmin, granularity="token"):
    """Quantizes ``fdata`` [batch, heads, seq, head_dim] to ``(qdata, scale, zero)`` with scale/zero [b, h, seq, 1].

    ``qmax``/``qmin`` are tensors or numbers (255/0 for 8 bits, 15/0 for 4 bits); see the module docstring for the
    two granularities.
    """
    if not isinstance(fdata, torch.Tensor) or fdata.dim() != 4:
        raise ValueError("quantize_cache_v expects a 4-D tensor [batch, heads, seq, head_dim]")
    if fdata.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"quantize_cache_v supports float16/bfloat16/float32 inputs, got {fdata.dtype}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    _check_finite(fdata)
    if granularity == "chunk":
        return _quantize_chunk(fdata, qmax, qmin)

    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    qmax_f, qmin_f = _as_float(qmax, "qmax"), _as_float(qmin, "qmin")
    if not (0 <= qmin_f < qmax_f <= 2**bits - 1) or qmin_f != int(qmin_f) or qmax_f != int(qmax_f):
        raise ValueError(f"qmin/qmax must be integers with 0 <= qmin < qmax <= {2**bits - 1}, got {qmin_f}/{qmax_f}")
    if bits == 4 and fdata.shape[-1] % 2 != 0:
        raise ValueError(f"4-bit cache quantization needs an even head_dim, got {fdata.shape[-1]}")
    return _quantize_token(fdata, bits, qmax_f, qmin_f)


def dequantize_cache_torch(qdata, scale, zero, bits=8):
    """Returns ``scale * (qdata - zero)`` in scale's dtype, unpacking 4-bit data first.

    The product is taken in place, so dequantizing a layer holds one float copy of it rather than two."""
    if bits == 4:
        qdata = unpack_int4(qdata)
    elif bits != 8:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    return (qdata - zero).mul_(scale)


KEY_GROUP_SIZE = 64


def _not_a_tensor(self):
    raise TypeError("a QuantizedKVCache layer is quantized states, not a tensor: in a transformers model, call "
                    "kvcache.native_attention.use_quantized_kv_attention(model) first")


# what an attention function that expects float key tensors trips over first, with the fix in the message
NOT_A_TENSOR = property(_not_a_tensor)


class GroupedKeys(NamedTuple):
    """A layer's keys in the ``"channel_groups"`` layout (see ``quantize_key_groups``), as the attention reads them.

    ``q_key`` [b, h, n * group, head_dim / 2] packed 4-bit, ``scale``/``zero`` [b, h, n, head_dim] (one per channel
    and group), ``residual`` [b, h, r, head_dim] float keys of the positions after the last full group, and
    ``positions`` [b, n * group + r] int32 rotary position of every slot (-1: padding). All keys are pre-RoPE.
    """

    shape = NOT_A_TENSOR
    q_key: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    residual: torch.Tensor
    positions: torch.Tensor


def quantize_key_groups(keys, group_size=KEY_GROUP_SIZE, valid=None):
    """4-bit quantization of pre-RoPE keys [b, h, seq, head_dim], per channel over groups of consecutive positions.

    Before the rotary, a key channel keeps its sign and rough size from token to token (a few channels are large
    throughout), so a per-channel min/max over ``group_size`` positions fits the data far better than one range per
    token: on SmolLM2 it cuts the 4-bit perplexity cost from +0.71% to +0.3%.

    ``seq`` must be a multiple of ``group_size``. Returns ``(q, scale, zero)``: ``q`` [b, h, seq, head_dim / 2]
    (codes packed as in ``pack_int4``), ``scale``/``zero`` [b, h, seq / group_size, head_dim] in the keys' dtype.
    Per channel and group, ``scale = (max - min) / 15`` (rounded up to the dtype), ``zero = -min / scale`` (stored in
    the dtype; codes are computed against the stored value), ``q = clamp(round(x / scale + zero), 0, 15)``, so
    ``scale * (q - zero)`` is within ``scale / 2`` of ``x``. A constant channel ``c`` is stored exactly
    (``scale = |c|``, ``q - zero = sign(c)``; zeros as ``scale = 1``, ``q = zero = 0``). ``valid``: optional bool
    [b, seq]; positions marked False (padding) do not count for the min/max (their codes are clamped).
    NaN or infinite keys raise ``ValueError``.
    """
    if not isinstance(keys, torch.Tensor) or keys.dim() != 4:
        raise ValueError("quantize_key_groups expects a 4-D tensor [batch, heads, seq, head_dim]")
    if keys.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"quantize_key_groups supports float16/bfloat16/float32 inputs, got {keys.dtype}")
    b, h, seq, d = keys.shape
    if group_size <= 0 or seq % group_size:
        raise ValueError(f"seq ({seq}) must be a positive multiple of group_size ({group_size})")
    if d % 2:
        raise ValueError(f"4-bit key groups need an even head_dim, got {d}")
    _check_finite(keys)
    qmax = 15.0
    x = keys.float().reshape(b, h, seq // group_size, group_size, d)
    if valid is None:
        lo, hi = x.amin(dim=-2), x.amax(dim=-2)
    else:
        if tuple(valid.shape) != (b, seq):
            raise ValueError(f"valid must be [batch, seq] = {(b, seq)}, got {tuple(valid.shape)}")
        keep = valid.bool().reshape(b, 1, seq // group_size, group_size, 1)
        lo = torch.where(keep, x, float("inf")).amin(dim=-2)
        hi = torch.where(keep, x, float("-inf")).amax(dim=-2)
        empty = torch.isinf(lo)  # a group of padding only: stored as zeros, never attended
        lo, hi = lo.masked_fill(empty, 0.0), hi.masked_fill(empty, 0.0)
    constant = hi == lo
    scale32 = _round_up_to_dtype((hi - lo) / qmax, keys.dtype).float()
    zero32 = (-lo / torch.where(constant, 1.0, scale32)).to(keys.dtype).float()
    abs_c = hi.abs()
    scale32 = torch.where(constant, torch.where(abs_c > 0, abs_c, torch.ones_like(abs_c)), scale32)
    zero32 = torch.where(constant, torch.where(hi < 0, 1.0, 0.0), zero32)
    q = torch.clamp(torch.round(x / scale32[..., None, :] + zero32[..., None, :]), 0, qmax).to(torch.uint8)
    q = pack_int4(q.reshape(b, h, seq, d))
    return q, scale32.to(keys.dtype).contiguous(), zero32.to(keys.dtype).contiguous()


def dequantize_key_groups(q, scale, zero):
    """Inverse of ``quantize_key_groups``: ``scale * (q - zero)`` [b, h, seq, head_dim] in scale's dtype."""
    b, h, seq, _ = q.shape
    groups, d = scale.shape[-2:]
    if groups == 0:
        return scale.new_zeros(b, h, 0, d)
    codes = unpack_int4(q).reshape(b, h, groups, seq // groups, d)
    return (codes - zero[..., None, :]).mul_(scale[..., None, :]).reshape(b, h, seq, d)
