"""QuantLinear: a linear layer holding GPTQ-packed weights, loadable from a GPTQ safetensors checkpoint.

Buffers are named as in AutoGPTQ/GPTQModel checkpoints (qweight, qzeros, scales, g_idx, bias), so
`load_state_dict` of a checkpoint fills them. forward dequantizes into a temporary float weight and calls
F.linear (any device, any bit width); on CUDA with Triton available and 2/4/8 bits it uses the fused Triton
dequantize-matmul kernel instead.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from .pack import (check_checkpoint_format, checkpoint_format_for, dequantize_weight, pack_layer,
                   packed_length)
from .quantizer import check_bits, check_group_size, num_groups

log = logging.getLogger(__name__)

KERNELS = ("auto", "torch", "triton")

try:
    from .triton_dequant_matmul import KERNEL_BITS, dequant_matmul
except ImportError:  # Triton is an optional extra
    KERNEL_BITS, dequant_matmul = (), None


class QuantLinear(nn.Module):
    """y = x @ W^T + bias with W stored in the GPTQ format (see quantize.pack).

    kernel: "auto" (Triton on CUDA when it supports the bit width, else torch), "torch" or "triton".
    """

    def __init__(self, bits: int, group_size: int, in_features: int, out_features: int, bias: bool,
                 checkpoint_format: str = "gptq", kernel: str = "auto"):
        super().__init__()
        check_bits(bits)
        check_group_size(group_size, in_features)
        check_checkpoint_format(checkpoint_format)
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        if kernel == "triton" and bits not in KERNEL_BITS:
            raise ValueError(f"the Triton kernel supports bits {KERNEL_BITS} (Triton installed: "
                             f"{dequant_matmul is not None}), got {bits}")
        self.bits = bits
        self.group_size = group_size
        self.in_features = in_features
        self.out_features = out_features
        self.checkpoint_format = checkpoint_format
        self.kernel = kernel
        n_groups = num_groups(in_features, group_size)
        gs = check_group_size(group_size, in_features)
        self.register_buffer("qweight", torch.zeros(packed_length(in_features, bits), out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(n_groups, packed_length(out_features, bits), dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(n_groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.arange(in_features, dtype=torch.int32) // gs)
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16))
        else:
            self.bias = None

    @classmethod
    def from_quantized(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
                       bias: torch.Tensor | None, bits: int, group_size: int, checkpoint_format: str | None = None,
                       kernel: str = "auto") -> "QuantLinear":
        """Build from a solver result (codes [out, in], scales/zeros [n_groups, out], g_idx [in]).

        checkpoint_format defaults to "gptq" when every zero point is (maxq + 1) / 2 (symmetric), else "gptq_v2".
        """
        out_features, in_features = codes.shape
        if checkpoint_format is None:
            sym = bool(torch.all(zeros == 2 ** (bits - 1)))
            checkpoint_format = checkpoint_format_for(sym)
        gs = check_group_size(group_size, in_features)
        if in_features % gs:
            log.warning("group_size %d does not divide in_features %d: the last group is partial; this package's "
                        "kernels handle it, but other GPTQ kernels (ExLlama, Marlin) may refuse the layer",
                        gs, in_features)
        if in_features % 32 or out_features % 32:
            log.warning("in_features %d / out_features %d not multiples of 32: packed tensors are zero-padded and "
                        "other GPTQ readers may refuse them", in_features, out_features)
        layer = cls(bits, group_size, in_features, out_features, bias is not None, checkpoint_format, kernel)
        packed = pack_layer(codes, scales, zeros, g_idx, bits, checkpoint_format)
        for name, tensor in packed.items():
            getattr(layer, name).copy_(tensor)
        if bias is not None:
            layer.bias.copy_(bias)
        return layer.to(codes.device)

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight [out, in] (default dtype: float16, the scales' dtype)."""
        return dequantize_weight(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits,
                                 self.checkpoint_format, dtype)

    def _use_triton(self, x: torch.Tensor) -> bool:
        if self.kernel == "triton":
            return True
        return (self.kernel == "auto" and dequant_matmul is not None and x.is_cuda and self.bits in KERNEL_BITS
                and x.dtype in (torch.float16, torch.bfloat16, torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_triton(x):
            y = dequant_matmul(x, self.qweight, self.qzeros, self.scales, self.g_idx, self.bits,
                               self.checkpoint_format)
        else:
            y = F.linear(x, self.dequantize_weight(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, format={self.checkpoint_format}")
