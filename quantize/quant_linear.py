"""QuantLinear: a linear layer holding GPTQ-packed weights, loadable from a GPTQ safetensors checkpoint.

Buffers are named as in AutoGPTQ/GPTQModel checkpoints (qweight, qzeros, scales, g_idx, bias), so
`load_state_dict` of a checkpoint fills them. Kernels (`kernel=`, the one in use is logged once per
kind of layer): "torch" dequantizes into a temporary float weight and calls F.linear (any device, any bit width; the
reference the others are tested against); "triton" is the fused Triton dequantize-matmul (CUDA, 2/4/8 bits);
"cpu" is this package's CPU kernels (quantize.cpu_gptq, 2/4/8 bits, any group size: float32 results that differ
from the reference only by the order of sums); "int4pack" is torch's CPU int4 kernel (quantize.int4pack_cpu,
2/3/4/8 bits, group sizes that are multiples of 32, bfloat16 arithmetic). The CPU kernels prepare their weight once at
the first forward and keep it next to the standard buffers, which state_dict still returns.
"auto" picks Triton on CUDA and "cpu" on CPU; for 3 bits, or where the CPU kernels cannot be built or lack their
AVX-512 code (`cpu_gptq.fast_kernels`), int4pack for inputs of fewer than PREFILL_ROWS rows and the torch path (in the
input's dtype) for more.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_gptq, int4pack_cpu
from .pack import (check_checkpoint_format, checkpoint_format_for, dequantize_weight, pack_layer,
                   packed_length, unpack_layer)
from .quantizer import check_bits, check_group_size, num_groups

log = logging.getLogger(__name__)

KERNELS = ("auto", "torch", "triton", "cpu", "int4pack")

try:
    from .triton_dequant_matmul import KERNEL_BITS, dequant_matmul
except ImportError:  # Triton is an optional extra
    KERNEL_BITS, dequant_matmul = (), None

# Where "auto" falls back to int4pack: from this many input rows on, it dequantizes into a temporary weight (not
# kept) and runs a GEMM instead; measured on the 2-core box at 1024 rows, that beats the int4pack kernel (2x for 8
# bits, whose two nibble planes double the kernel's work), while one-token decode is where int4pack wins.
PREFILL_ROWS = 64
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)

_logged = set()


def _log_once(message: str, *args) -> None:
    if (message, args) not in _logged:
        _logged.add((message, args))
        log.info(message, *args)


class QuantLinear(nn.Module):
    """y = x @ W^T + bias with W stored in the GPTQ format (see quantize.pack).

    kernel: "auto" (Triton on CUDA, "cpu" on CPU, where they take the layer; see the module docstring), "torch",
    "triton", "cpu" or "int4pack" (falls back to torch, logged once, for group sizes it cannot take).
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
        if kernel == "cpu" and not cpu_gptq.supports(bits):
            raise ValueError(f"the CPU GPTQ kernels support bits {cpu_gptq.BITS}, got {bits}")
        self.bits = bits
        self.group_size = group_size
        self.in_features = in_features
        self.out_features = out_features
        self.checkpoint_format = checkpoint_format
        self.kernel = kernel
        # kernel name -> its weight, built at the first CPU forward (not in state_dict); ("forward", kernel setting)
        # -> the CPU weight forward chose for CPU float inputs
        self._prepared = {}
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

    def _load_from_state_dict(self, *args, **kwargs):
        self._prepared = {}  # new buffers: prepare again at the next forward
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        self._prepared = {}  # .to() / .half() / to_empty(): prepare from the moved buffers when needed
        return super()._apply(fn, recurse)

    def __getstate__(self):
        """Copies and pickles leave the prepared CPU weights behind (they hold the compiled extension module); a copy
        prepares its own at its first forward."""
        state = self.__dict__.copy()
        state["_prepared"] = {}
        return state

    def kernel_for(self, x: torch.Tensor) -> str:
        """The kernel forward uses for input x: "triton", "cpu", "int4pack" or "torch"."""
        floating = x.dtype in _FLOATS
        if self.kernel == "triton" or (self.kernel == "auto" and dequant_matmul is not None and x.is_cuda
                                       and self.bits in KERNEL_BITS and floating):
            return "triton"
        if x.device.type != "cpu" or not floating or self.kernel == "torch":
            return "torch"
        if self.kernel == "cpu":
            if cpu_gptq.load_kernels() is None:
                raise RuntimeError("kernel='cpu': the CPU GPTQ kernels could not be built (see the warning above)")
            return "cpu"
        if self.kernel == "auto" and cpu_gptq.supports(self.bits) and cpu_gptq.fast_kernels() is not None:
            return "cpu"
        if self.kernel == "auto" and x.numel() >= PREFILL_ROWS * self.in_features:
            return "torch"
        if int4pack_cpu.supports(self.bits, self.group_size, self.in_features):
            return "int4pack"
        _log_once("QuantLinear: the CPU int4pack kernel takes group sizes that are multiples of 32; "
                  "%d-bit group_size %d layers use the torch (dequantize) path", self.bits, self.group_size)
        return "torch"

    def int4pack_weight(self) -> int4pack_cpu.Int4PackWeight:
        """The weight repacked for torch's CPU int4 kernel (built once from the buffers, then cached)."""
        if "int4pack" not in self._prepared:
            codes, zeros = unpack_layer(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits,
                                        self.checkpoint_format)
            self._prepared["int4pack"] = int4pack_cpu.Int4PackWeight(codes, zeros, self.scales, self.g_idx,
                                                                     self.bits, self.group_size)
        return self._prepared["int4pack"]

    def cpu_weight(self) -> cpu_gptq.CpuGptqWeight:
        """The weight prepared for this package's CPU kernels (built once from the buffers, then cached)."""
        if "cpu" not in self._prepared:
            self._prepared["cpu"] = cpu_gptq.CpuGptqWeight(self.qweight, self.qzeros, self.scales, self.g_idx,
                                                           self.bits, self.group_size, self.checkpoint_format,
                                                           bias=self.bias)
        return self._prepared["cpu"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chosen = self._prepared.get(("forward", self.kernel))
        if chosen is not None and x.device.type == "cpu" and x.dtype in _FLOATS:
            # kernel_for chose "cpu" for a CPU float input under this `kernel` setting before, and would again: skip
            # it (a decode step's ~150 calls each pay its microseconds)
            return chosen.matmul(x)
        kernel = self.kernel_for(x)
        _log_once("QuantLinear: %d-bit layers run on the %s kernel (kernel=%r)", self.bits, kernel, self.kernel)
        if kernel == "triton":
            y = dequant_matmul(x, self.qweight, self.qzeros, self.scales, self.g_idx, self.bits,
                               self.checkpoint_format)
        elif kernel == "cpu":
            chosen = self._prepared[("forward", self.kernel)] = self.cpu_weight()
            return chosen.matmul(x)  # the bias included
        elif kernel == "int4pack":
            y = self.int4pack_weight().matmul(x)
        else:
            y = F.linear(x, self.dequantize_weight(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, format={self.checkpoint_format}, "
                f"kernel={self.kernel}")


def prepared_cpu_weights(layers):
    """The prepared CPU weights of ``layers`` when every one is a QuantLinear whose forward already runs CPU float
    inputs on this package's kernels and takes its inputs as they are (no act-order gather or padding): what a fused
    call (``gated_mlp_cpu``, the fused decode step) may read in the layers' place; None otherwise."""
    if any(type(layer) is not QuantLinear for layer in layers):
        return None
    weights = [layer._prepared.get(("forward", layer.kernel)) for layer in layers]
    if any(w is None or not w.takes_input_as_is() for w in weights):
        return None
    return weights


def gated_mlp_cpu(x: torch.Tensor, w1: nn.Module, w2: nn.Module, c_proj: nn.Module):
    """``c_proj(w1(x) * silu(w2(x)))`` in one call of the CPU kernels where all three layers qualify
    (``prepared_cpu_weights``; ``cpu_gptq.gated_mlp``): a decoded token's float32 rows (fewer than GEMV_ROWS), the same
    bits. None otherwise, for the layers one by one. A decode step of SmolLM2 saves 60 layer calls and 60 tensor ops
    this way."""
    weights = prepared_cpu_weights((w1, w2, c_proj))
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (weights is None or x.dtype != torch.float32 or x.device.type != "cpu" or not 0 < rows < cpu_gptq.GEMV_ROWS
            or len({w1.bits, w2.bits, c_proj.bits}) != 1 or (x.requires_grad and torch.is_grad_enabled())):
        return None
    _log_once("QuantLinear: %d-bit SwiGLU MLPs of decoded tokens run as one gated_mlp call of the CPU kernels",
              w1.bits)
    y = cpu_gptq.gated_mlp(x.reshape(rows, x.shape[-1]).contiguous(), *weights)
    return y.view(*x.shape[:-1], c_proj.out_features)
