"""GPTQ layers through torch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`, the "tinygemm" layout).

The kernel computes x @ W^T with W[n, k] = (q[n, k] - 8) * scale[g, n] + zero[g, n] for 4-bit codes q and groups
of 32/64/128/256 consecutive columns, in bfloat16 (its float32 and float16 paths are scalar and 10x slower here, so
activations go in as bfloat16 and come back in their own dtype, as GPTQModel's TORCH_FUSED backend does).
A GPTQ weight is scale * (code - zero), so for bits <= 4 the codes are shifted by 8 - 2^(bits-1) (centred on the
kernel's 8) with zero' = scale * (2^(bits-1) - zero); for 8 bits each code is split into two nibbles, code = 16 * hi + lo, laid side by side
along k (the input is fed twice): W = 16s * (hi - 8) + s * (lo - 8) + s * (136 - zero). All of it is exact except for
the bfloat16 rounding of the scales, zero terms, activations and output.

act-order (a g_idx that is not sorted), a last group that does not fill group_size, and group sizes that are
multiples of 32 (or per-channel, group_size -1) are mapped onto the kernel's fixed groups by gathering the input
columns into group order with zero padding (just zero padding at the end when only the last group is partial);
out_features is padded to a multiple of 16.
"""
from __future__ import annotations

import torch

from .pack import group_gather

KERNEL_GROUP_SIZES = (256, 128, 64, 32)
BITS = (2, 3, 4, 8)


def kernel_group_size(group_size: int, in_features: int) -> int | None:
    """The kernel group size that tiles GPTQ groups of `group_size` (-1: one group of in_features), or None."""
    gs = in_features if group_size == -1 else group_size
    for kg in KERNEL_GROUP_SIZES:
        if gs % kg == 0:
            return kg
    if group_size == -1:  # a per-channel layer may be padded to any kernel group size
        return 32
    return None


def supports(bits: int, group_size: int, in_features: int) -> bool:
    return bits in BITS and kernel_group_size(group_size, in_features) is not None


class Int4PackWeight:
    """A GPTQ layer repacked once for `_weight_int4pack_mm_for_cpu`; holds no float copy of the weight."""

    def __init__(self, codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                 bits: int, group_size: int):
        """codes int [out, in], true zero points [n_groups, out], scales [n_groups, out], g_idx [in]."""
        out_features, in_features = codes.shape
        n_groups = scales.shape[0]
        kg = kernel_group_size(group_size, in_features)
        if bits not in BITS or kg is None:
            raise ValueError(f"the int4pack kernel takes bits {BITS} and group sizes that are multiples of 32, "
                             f"got bits={bits}, group_size={group_size}")
        counts = torch.bincount(g_idx.long(), minlength=n_groups)
        slot = -(-int(counts.max()) // kg) * kg  # columns reserved per GPTQ group, a multiple of kg
        k_pad = n_groups * slot
        order, position, gather = group_gather(g_idx, torch.arange(n_groups) * slot, k_pad)
        in_order = bool(torch.equal(gather[:in_features], torch.arange(in_features)))
        self.pad = k_pad - in_features if in_order and bool((gather[in_features:] == in_features).all()) else 0
        self.identity = k_pad == in_features and in_order
        self.gather = None if self.identity or self.pad else gather  # else zero padding at the end suffices
        self.in_features, self.out_features = in_features, out_features
        n_pad = -(-out_features // 16) * 16

        laid = torch.zeros(n_pad, k_pad, dtype=torch.int32)
        laid[:out_features, position] = codes[:, order].to(torch.int32)
        scales = scales.to(torch.float32).t()  # [out, n_groups]
        zeros = zeros.to(torch.float32).t()
        per_group = slot // kg  # kernel groups per GPTQ group
        if bits == 8:
            planes = [(laid >> 4, 16 * scales, torch.zeros_like(scales)), (laid & 15, scales, scales * (136 - zeros))]
        else:  # codes below 4 bits are centred on the kernel's 8, so the zero term stays small
            half = 2 ** (bits - 1)
            planes = [(laid + (8 - half), scales, scales * (half - zeros))]
        packed, szs = [], []
        for plane, s, z in planes:
            packed.append(plane)
            sz = torch.zeros(n_pad, n_groups, 2)
            sz[:out_features, :, 0], sz[:out_features, :, 1] = s, z
            szs.append(sz.repeat_interleave(per_group, dim=1))
        self.planes = len(planes)
        self.group = kg
        self.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.cat(packed, 1).contiguous(), 1)
        self.scales_zeros = torch.cat(szs, 1).transpose(0, 1).to(torch.bfloat16).contiguous()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] (any float dtype, CPU) -> x @ W^T [..., out] in x's dtype."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self.pad:
            x2 = torch.nn.functional.pad(x2, (0, self.pad))
        elif self.gather is not None:
            x2 = torch.nn.functional.pad(x2, (0, 1))[:, self.gather]
        if self.planes == 2:
            x2 = torch.cat([x2, x2], 1)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), self.weight, self.group, self.scales_zeros)
        if y.shape[1] != self.out_features:
            y = y[:, :self.out_features]
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def nbytes(self) -> int:
        """Bytes held by the repacked weight, its scales/zero terms and the input gather index."""
        tensors = [self.weight, self.scales_zeros] + ([] if self.gather is None else [self.gather])
        return sum(t.numel() * t.element_size() for t in tensors)
