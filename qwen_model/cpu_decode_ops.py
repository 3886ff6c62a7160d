"""The model's small per-layer ops for a decoded token on CPU, one C++ call each (``cpu_decode_ops.cpp``).

A decode step of SmolLM2-135M runs 61 RMSNorms and 30 attention inputs (split c_attn's output into heads, rotate
queries and keys); as tensor ops each costs microseconds of dispatch (the norm ~10 us, the heads and rotary ~20 us),
more than the arithmetic. These wrappers take float32 CPU inputs of at most DECODE_ROWS rows (decode, not prefill,
whose tensor ops are threaded and amortized) and return None otherwise, or where autograd is recording, or where the
extension did not build (one warning), for the caller's tensor ops. The rotary is bit-identical to
``kvcache.rotary.apply_rotary_pos_emb``; the norm differs from ``F.rms_norm`` only in the order of its float32 sum.
"""
from __future__ import annotations

from pathlib import Path

import torch

from kvcache.cpp_kernels import load_once

EXTENSION_NAME = "qwen_quant_cpu_decode_ops"
DECODE_ROWS = 16
_SOURCE = Path(__file__).resolve().parent / "cpu_decode_ops.cpp"
_state = {}


def load_ops(portable: bool = False):
    """Builds (first time on this machine) and imports the extension; the module, or None when unavailable."""
    return load_once(_state, portable, EXTENSION_NAME, _SOURCE, "CPU decode ops", "the model's tensor ops")


def _applies(x: torch.Tensor, rows: int) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and rows <= DECODE_ROWS
            and not (x.requires_grad and torch.is_grad_enabled()))


def qkv_heads_cpu(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int):
    """c_attn's output [b, s, 3P] -> (query, key) rotated [b, h, s, d], (value, pre-rotary key) as views of ``qkv``;
    None where it does not apply (see the module docstring, and a rotary that covers only part of each head)."""
    b, s, width = qkv.shape
    if (not _applies(qkv, b * s) or cos.dtype != torch.float32 or cos.shape[-1] * heads * 3 != width
            or qkv.stride(-1) != 1):
        return None
    ops = load_ops()
    return None if ops is None else ops.qkv_heads(qkv, cos.contiguous(), sin.contiguous(), heads)


def rms_norm_cpu(x: torch.Tensor, weight: torch.Tensor, eps: float):
    """``x * rsqrt(mean(x^2, -1) + eps) * weight`` for a few float32 rows; None where it does not apply."""
    if (not _applies(x, x.numel() // max(x.shape[-1], 1)) or weight.dtype != torch.float32
            or (weight.requires_grad and torch.is_grad_enabled()) or not x.is_contiguous()):
        return None
    ops = load_ops()
    return None if ops is None else ops.rms_norm(x, weight, eps)
