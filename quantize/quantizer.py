"""Uniform integer quantizer with GPTQ conventions, and the round-to-nearest (RTN) baseline.

Scales and zero points are per output row and per group of input columns. The conventions follow the GPTQ
reference quantizer: asymmetric grids span [min(x, 0), max(x, 0)]; symmetric grids span [-absmax, absmax] with the
zero point fixed at (maxq + 1) / 2, so a symmetric scale is 2 * absmax / (2^bits - 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
FP16_SMALLEST_SUBNORMAL = 2.0 ** -24


@dataclass
class QuantizedWeight:
    """A quantized [out, in] weight.

    weight: dequantized weight (dtype of the input weight); codes: uint8 [out, in] integer codes;
    scales: float32 [n_groups, out] (exactly float16-representable when
    rounded for a checkpoint); zeros: int32 [n_groups, out] (true zero points, not the v1 "zero - 1");
    g_idx: int32 [in], the group of every input column. loss is the GPTQ objective (None for RTN) and
    damp_percent the damping the solver finally used (None for RTN).
    """

    weight: torch.Tensor
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    group_size: int
    sym: bool
    loss: float | None = None
    damp_percent: float | None = None


def check_bits(bits: int) -> int:
    """Return maxq = 2^bits - 1 for a supported bit width, else raise ValueError."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    return (1 << bits) - 1


def check_group_size(group_size: int, in_features: int) -> int:
    """Return the effective group size (in_features for -1), else raise ValueError."""
    if group_size == -1:
        return in_features
    if not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be -1 or a positive integer, got {group_size}")
    return group_size


def num_groups(in_features: int, group_size: int) -> int:
    """Number of groups along in_features; the last one may be partial."""
    return math.ceil(in_features / check_group_size(group_size, in_features))


def _range(x: torch.Tensor, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row [xmin, xmax] of the grid: always containing 0, symmetric for sym, [-1, 1] for an all-zero row."""
    xmin = x.amin(dim=-1).clamp(max=0)
    xmax = x.amax(dim=-1).clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    return torch.where(empty, -1.0, xmin), torch.where(empty, 1.0, xmax)


def _grid(xmin: torch.Tensor, xmax: torch.Tensor, maxq: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (xmax - xmin) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale)
    return scale, zero


def find_params(x: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for every row of x (reduced over the last dim), as float32 tensors.

    A row that is all zeros gets the grid of [-1, 1] so that its scale is never 0.
    """
    maxq = check_bits(bits)
    return _grid(*_range(x.to(torch.float32), sym), maxq, sym)


SHRINK_COARSE = tuple(1 - 0.05 * i for i in range(16))  # 1.00, 0.95, ..., 0.25
SHRINK_FINE = (-0.04, -0.03, -0.02, -0.01, 0.01, 0.02, 0.03, 0.04)


def search_params(x: torch.Tensor, bits: int, sym: bool, weight: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Like find_params, but each row's range is shrunk by the factor that minimises sum_j weight_j (q(x_j) - x_j)^2.

    Clipping a few extreme values buys a finer grid for all the others; at 3-4 bits that usually pays. Factors
    1.00, 0.95, ..., 0.25 are tried, then steps of 0.01 around each row's best. Scales are rounded to float16 before
    they are scored, as the checkpoint stores them; the coarse scan stops after two factors in a row improve no row.
    GPTQ passes the per-column weights of its own objective.
    """
    maxq = check_bits(bits)
    x = x.to(torch.float32).contiguous()
    w = torch.ones(x.shape[-1], device=x.device) if weight is None else weight.to(x.device, torch.float32)
    xmin, xmax = _range(x, sym)
    t, r = torch.empty_like(x), torch.empty_like(x)  # reused: fresh temporaries would cost more than the math

    def score(shrink: torch.Tensor):
        # the zero point is an integer, so q - x = scale * (clamp(round(x / scale), -zero, maxq - zero) - x / scale)
        scale, zero = _grid(xmin * shrink, xmax * shrink, maxq, sym)
        scale = round_scale_fp16(scale)
        torch.div(x, scale.unsqueeze(-1), out=t)
        torch.round(t, out=r)
        if sym:  # one zero point for every row: scalar bounds are far faster than per-row tensor bounds
            half = (maxq + 1) // 2
            r.clamp_(-half, maxq - half)
        else:
            r.add_(zero.unsqueeze(-1)).clamp_(0, maxq).sub_(zero.unsqueeze(-1))
        r.sub_(t).square_()
        return (r @ w) * scale.square(), scale, zero

    best_err, best_scale, best_zero = score(torch.ones_like(xmax))
    best_shrink = torch.ones_like(xmax)
    candidates = [torch.full_like(xmax, f) for f in SHRINK_COARSE[1:]]
    for stage in range(2):
        misses = 0
        for shrink in candidates:
            err, scale, zero = score(shrink)
            better = err < best_err
            misses = 0 if bool(better.any()) else misses + 1
            if stage == 0 and misses == 2:
                break  # every row is past its best range: smaller ones only clip more
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
            best_shrink = torch.where(better, shrink, best_shrink)
        if stage == 0:
            candidates = [(best_shrink + d).clamp(0.05, 1.0) for d in SHRINK_FINE]
    return best_scale, best_zero


def round_scale_fp16(scale: torch.Tensor) -> torch.Tensor:
    """Round float32 scales to values float16 represents exactly (never 0), so a float16 checkpoint
    reproduces the quantized weight the solver computed."""
    return scale.clamp(min=FP16_SMALLEST_SUBNORMAL).to(torch.float16).to(torch.float32)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize x on the grid (scale, zero); scale and zero broadcast against x.

    Returns (dequantized float32 values, integer codes as float32 in [0, maxq]).
    """
    codes = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (codes - zero), codes


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int = 128, sym: bool = True,
                 fp16_scales: bool = False) -> QuantizedWeight:
    """Round-to-nearest quantization of a whole [out, in] weight, per row and per group of input columns.

    With sym=True this is the RTN baseline of the peer comparison (scale = 2 * absmax / (2^bits - 1),
    zero = 2^(bits - 1)); fp16_scales rounds scales to float16 first, as a packed checkpoint stores them.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        raise ValueError("weight contains NaN or inf")
    maxq = check_bits(bits)
    out_features, in_features = weight.shape
    gs = check_group_size(group_size, in_features)
    n_groups = num_groups(in_features, gs)
    w = weight.to(torch.float32)
    pad = n_groups * gs - in_features
    padded = torch.nn.functional.pad(w, (0, pad)).view(out_features, n_groups, gs)
    if pad:
        # Padding must not widen the last group's range: repeat one of its real entries instead of zeros.
        padded[:, -1, gs - pad:] = padded[:, -1, :1]
    scale, zero = find_params(padded, bits, sym)
    if fp16_scales:
        scale = round_scale_fp16(scale)
    deq, codes = quantize(padded, scale.unsqueeze(-1), zero.unsqueeze(-1), maxq)
    deq = deq.reshape(out_features, -1)[:, :in_features]
    codes = codes.reshape(out_features, -1)[:, :in_features]
    g_idx = torch.arange(in_features, device=weight.device, dtype=torch.int32) // gs
    return QuantizedWeight(
        weight=deq.to(weight.dtype),
        codes=codes.to(torch.uint8),
        scales=scale.t().contiguous(),
        zeros=zero.t().contiguous().to(torch.int32),
        g_idx=g_idx,
        bits=bits,
        group_size=group_size,
        sym=sym,
    )
