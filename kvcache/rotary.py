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


def apply_rotary_pos_emb(t, cos, sin):
    """Rotate the first ``cos.shape[-1]`` channels of ``t`` ``[b, h, s, d]`` (NeoX halves), in fp32."""
    rot_dim = cos.shape[-1]
    t_, t_pass = t[..., :rot_dim].float(), t[..., rot_dim:]
    x1, x2 = t_.chunk(2, dim=-1)
    t_ = t_ * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((t_.type_as(t), t_pass), dim=-1)
