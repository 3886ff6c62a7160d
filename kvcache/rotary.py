"""Rotary position embedding (NeoX halves, dynamic-NTK base), shared by the model and the pre-RoPE key cache.

The ``"channel_groups"`` cache stores keys before the rotary and rotates them when they are read, so both sides
must compute the very same cos/sin: they do, through these functions.
"""
import torch


def rotary_inv_freq(alphas, dim, base, device=None) -> torch.Tensor:
    """Inverse frequencies ``[len(alphas), dim / 2]`` (fp32), one row per NTK factor (one per sample, or one shared)."""
    exponent = torch.arange(0, dim, 2, device=device).float() / dim
    scaled_base = torch.tensor([base * a ** (dim / (dim - 2)) for a in alphas], device=device)
    return 1.0 / (scaled_base[:, None] ** exponent[None, :])


def cos_sin_at(position_ids, inv_freq):
    """cos/sin ``[b, 1, s, dim]`` (fp32) of integer positions ``[b, s]`` with ``inv_freq`` ``[b or 1, dim / 2]``."""
    freqs = position_ids.float()[:, :, None] * inv_freq[:, None, :]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos(), emb.sin()


def cached_cos_sin_at(position_ids, inv_freq):
    """``cos_sin_at`` read from ``cos_sin_table``: the same values, without recomputing the cos/sin of every cached
    position at every decode step (the pre-RoPE key cache rotates them all)."""
    if position_ids.numel() == 0:
        return cos_sin_at(position_ids, inv_freq)
    cos, sin = cos_sin_table(inv_freq, int(position_ids.max()) + 1)
    rows = torch.arange(position_ids.shape[0], device=position_ids.device)[:, None] if cos.shape[0] > 1 else 0
    cos, sin = cos[rows, position_ids.long()], sin[rows, position_ids.long()]
    return torch.cat((cos, cos), dim=-1)[:, None], torch.cat((sin, sin), dim=-1)[:, None]


def apply_rotary_pos_emb(t, cos, sin):
    """Rotate the first ``cos.shape[-1]`` channels of ``t`` ``[b, h, s, d]`` (NeoX halves), in fp32."""
    rot_dim = cos.shape[-1]
    whole = rot_dim == t.shape[-1]  # the usual case: no pass-through channels to split off and join again
    t_ = (t if whole else t[..., :rot_dim]).float()
    x1, x2 = t_.chunk(2, dim=-1)
    t_ = (t_ * cos + torch.cat((-x2, x1), dim=-1) * sin).type_as(t)
    return t_ if whole else torch.cat((t_, t[..., rot_dim:]), dim=-1)


_TABLES: dict = {}
_MAX_TABLES = 4


def cos_sin_table(inv_freq, length):
    """cos/sin ``[len(inv_freq), >= length, dim / 2]`` (fp32) of positions 0, 1, ... per frequency, the values
    ``cos_sin_at`` gives (its two halves repeat these), computed once per ``inv_freq`` and reused across layers and
    decode steps (grown by doubling; the last few ``inv_freq`` are kept)."""
    key = (tuple(inv_freq.flatten().tolist()), tuple(inv_freq.shape), inv_freq.device)
    table = _TABLES.pop(key, None)
    if table is None or table[0].shape[1] < length:
        size = max(length, 2 * table[0].shape[1] if table is not None else 1024)
        positions = torch.arange(size, device=inv_freq.device)[None].expand(inv_freq.shape[0], size)
        cos, sin = cos_sin_at(positions, inv_freq)
        half = inv_freq.shape[-1]
        table = (cos[:, 0, :, :half].contiguous(), sin[:, 0, :, :half].contiguous())
    _TABLES[key] = table
    while len(_TABLES) > _MAX_TABLES:
        del _TABLES[next(iter(_TABLES))]
    return table
