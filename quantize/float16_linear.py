"""Float16Linear: a GPTQ checkpoint's float layer (its lm_head) kept in the float16 the checkpoint stores it in.

The lm_head is the largest float weight a quantized model reads per decoded token (SmolLM2-135M: 49152 x 576, more
bytes than all its Int4 layers together). Upcast to float32 for float32 activations, it doubles in memory and in
bytes read. Kept in float16, a few rows (decode) run on CPU through `half_linear` of this package's CPU kernels
(quantize.cpu_gptq: float16 weights converted in AVX-512 registers, float32 products and sums, so the result is the
float32 product of the stored weights to ~1e-7) or, where those are not built, torch's float16 GEMV (measured on the
2-core AMD box ~3x faster than float32 F.linear on the upcast weight, at a relative error of ~3e-4: the float16
rounding of the activations and of the output). From FLOAT16_ROWS rows on (prefill, perplexity windows), where
torch's CPU float16 GEMM is slower than float32, the weight is upcast into a temporary in the input's dtype and the
result is the exact float32 product of the stored weights. The output is in the input's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_gptq

# Measured with the 49152 x 576 head (2 threads): float16 rows cost 2-4 ms each, the upcast ~50 ms once; the two
# cross near 32 rows.
FLOAT16_ROWS = 32


class Float16Linear(nn.Module):
    """y = x @ W^T (+ bias) with W kept in float16 (see the module docstring); state_dict keys as nn.Linear's."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = nn.Parameter(weight.detach().to(torch.float16), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(torch.float16), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Float16Linear":
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if x.dtype != weight.dtype:
            if weight.dtype == torch.float16 and x.device.type == "cpu" and x.numel() < FLOAT16_ROWS * self.in_features:
                kernels = cpu_gptq.fast_kernels()
                if kernels is None:
                    return F.linear(x.to(torch.float16), weight, bias).to(x.dtype)
                y = kernels.half_linear(x.reshape(-1, self.in_features).float().contiguous(), weight.contiguous())
                if bias is not None:
                    y = y + bias.float()
                return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
            weight, bias = weight.to(x.dtype), None if bias is None else bias.to(x.dtype)
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"dtype={str(self.weight.dtype).removeprefix('torch.')}")
