"""GPTQ layers on CPU through this package's kernels (``cpu_gptq_kernels.cpp``), in float32.

Fewer than GEMV_ROWS input rows (decode): ``gemv`` reads the packed codes where they are stored and converts them in
registers, so a token reads 0.5 (Int4) or 1 (Int8) byte per weight and no float weight is written. More rows
(prefill): ``dequantize`` writes the float32 weight in one pass (bfloat16 for bfloat16 activations), in chunks of
whole groups, each followed by its GEMM. The dequantized weight is the reference's bit for bit ((code - zero) *
scale is exact in float32), and the GEMV sums x . code per group in float32, applying scale and zero once per group:
results differ from the dequantize reference only by float32 rounding of sums (~5e-7 relative), where torch's int4pack
kernel rounds activations, scales and output to bfloat16 (~1e-2).

Layout: the checkpoint's ``qweight`` is used as it is (no copy) when each group is a run of whole int32 words
(``g_idx == column // group_size``, group_size a multiple of 32 / bits); otherwise (act-order, other group sizes) the
codes are repacked once into group order, each group padded to whole words, and the input columns are gathered into
that order: a copy the size of ``qweight``. Bits 2, 4 and 8 (3-bit codes straddle words). The build (gcc, ``-O3
-march=native``, ~30 s the first time) is the KV-cache kernels' (``kvcache.cpp_kernels.build_cpu_extension``) and is
reused; a failed build logs one warning and yields None, and QuantLinear uses its other CPU paths. The same
extension holds ``half_linear``, the float16 layer a GPTQ checkpoint keeps (its lm_head, quantize.float16_linear).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from kvcache.cpp_kernels import load_once

from .pack import group_gather, pack_rows, unpack_rows, unpack_zeros

EXTENSION_NAME = "qwen_quant_cpu_gptq_kernels"
BITS = (2, 4, 8)
# From this many input rows on, dequantize + GEMM beats the row-by-row kernel. Measured on the 2-core Intel box, ms
# GEMV / dequantize+GEMM at 16, 20, 24, 28 rows: 576 -> 1536 Int4 0.26/0.33, 0.31/0.30, 0.46/0.32, 0.43/0.34;
# 4096 -> 12288 Int4 11.0/57.4, 15.1/30.0, 19.6/36.0, 29.4/37.1, Int8 13.4/33.4, 17.6/36.0, 29.9/36.7, 55.6/40.7.
GEMV_ROWS = 24
# Prefill dequantizes at most this many bytes of weight at a time (whole groups), one GEMM per chunk: a 7B layer's
# float32 weight (200 MB for 4096 x 12288) written in one piece costs more in fresh pages than the GEMM itself
# (512 rows: 216 ms in one piece, 165-171 ms in chunks of 16-24 MiB, float32 F.linear 150-160 ms). Chunks stay under
# glibc's largest mmap threshold (32 MiB), so their memory is reused rather than mapped afresh.
CHUNK_BYTES = 24 << 20
_SOURCE = Path(__file__).resolve().parent / "cpu_gptq_kernels.cpp"
_state = {}


def load_kernels(portable: bool = False):
    """Builds (first time on this machine) and imports the extension; the module, or None when unavailable.

    ``portable=True`` builds without ``-march=native``: what a CPU without AVX-512 runs, built here for the tests."""
    return load_once(_state, portable, EXTENSION_NAME, _SOURCE, "CPU GPTQ kernels", "the int4pack/dequantize paths")


def fast_kernels():
    """The extension where it was built with its AVX-512 code (what was measured to beat torch's kernels), else None:
    "auto" paths use this; an explicit kernel="cpu" runs the portable loops anywhere."""
    kernels = load_kernels()
    return kernels if kernels is not None and kernels.vectorized else None


def supports(bits: int) -> bool:
    return bits in BITS


class CpuGptqWeight:
    """A GPTQ layer prepared for the kernels: the packed words (the checkpoint's own where it can), float16 scales and
    true zero points [groups, out], word offsets of the groups, the input gather for a repacked layout, and the bias in
    float32 (added to the float32 product, by the GEMV itself at decode)."""

    def __init__(self, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                 bits: int, group_size: int, checkpoint_format: str, kernels=None, bias: torch.Tensor | None = None):
        if bits not in BITS:
            raise ValueError(f"the CPU GPTQ kernels take bits {BITS}, got {bits}")
        self.kernels = kernels or load_kernels()
        if self.kernels is None:
            raise RuntimeError("the CPU GPTQ kernels are not available (the build failed; see the warning above)")
        self.bits, self.in_features, self.out_features = bits, g_idx.numel(), scales.shape[1]
        values = 32 // bits
        n_groups = scales.shape[0]
        gs = self.in_features if group_size == -1 else group_size
        if gs % values == 0 and torch.equal(g_idx.long(), torch.arange(self.in_features) // gs):
            self.words = qweight.contiguous()
            starts = torch.arange(n_groups) * (gs // values)
            self.group_words = torch.cat([starts, torch.tensor([self.words.shape[0]])])
            self.gather = None
        else:
            counts = torch.bincount(g_idx.long(), minlength=n_groups)
            self.group_words = F.pad(torch.cumsum(-(-counts // values), 0), (1, 0))
            order, position, self.gather = group_gather(g_idx, self.group_words[:-1] * values,
                                                        int(self.group_words[-1]) * values)
            laid = torch.zeros(self.gather.numel(), self.out_features, dtype=torch.int32)
            laid[position] = unpack_rows(qweight, bits, self.in_features)[order]
            self.words = pack_rows(laid, bits)[:int(self.group_words[-1])].contiguous()
        self.padded_in = self.words.shape[0] * values
        self.bias = None if bias is None else bias.float().contiguous()
        self.scales = scales.to(torch.float16).contiguous()
        self.zeros = unpack_zeros(qzeros, bits, self.out_features, checkpoint_format).to(torch.float16).contiguous()
        # prefill's chunks: group ranges [g0, g1) of at most CHUNK_BYTES of float32 weight (or one group), and for
        # each its word range with the groups' word offsets from there (computed once, not per call)
        self.chunks, self._chunk_words, bounds, first = [], [], [int(w) for w in self.group_words], 0
        for g in range(n_groups + 1):
            if g == n_groups or ((bounds[g + 1] - bounds[first]) * values * self.out_features * 4 > CHUNK_BYTES
                                 and g > first):
                self.chunks.append((first, g))
                self._chunk_words.append((bounds[first], bounds[g], self.group_words[first:g + 1] - bounds[first]))
                first = g

    def _inputs(self, x2: torch.Tensor) -> torch.Tensor:
        """x [rows, in] -> [rows, padded_in] in the words' row order, zero where the words hold padding."""
        if self.gather is not None:
            return F.pad(x2, (0, 1))[:, self.gather]
        return F.pad(x2, (0, self.padded_in - self.in_features)) if self.padded_in != self.in_features else x2

    def _dequantize(self, dtype: torch.dtype, g0: int, g1: int, w0: int, w1: int, offsets: torch.Tensor):
        return self.kernels.dequantize(self.words[w0:w1], self.scales[g0:g1], self.zeros[g0:g1], offsets, self.bits,
                                       dtype)

    def dequantize_transposed(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W^T [padded_in, out] in the words' row order (float32 or bfloat16)."""
        return self._dequantize(dtype, 0, self.scales.shape[0], 0, self.words.shape[0], self.group_words)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] (any float dtype, CPU) -> x @ W^T + bias [..., out] in x's dtype."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] < GEMV_ROWS:  # decode: a few microseconds of Python matter here, so no-op calls are skipped
            if x2.dtype != torch.float32:
                x2 = x2.float()
            if self.gather is not None or self.padded_in != self.in_features:
                x2 = self._inputs(x2)
            y = self.kernels.gemv(x2.contiguous(), self.words, self.scales, self.zeros, self.group_words, self.bits,
                                  self.bias)
        else:  # one GEMM per chunk of groups, summed in float32
            dtype = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
            x2, values, y = self._inputs(x2.to(dtype)), 32 // self.bits, None
            for (g0, g1), (w0, w1, offsets) in zip(self.chunks, self._chunk_words):
                xs, wt = x2[:, w0 * values:w1 * values], self._dequantize(dtype, g0, g1, w0, w1, offsets)
                if y is None:
                    y = torch.mm(xs, wt).float()
                elif dtype == torch.float32:
                    y.addmm_(xs, wt)
                else:
                    y.add_(torch.mm(xs, wt))
            if self.bias is not None:
                y.add_(self.bias)
        return (y if y.dtype == x.dtype else y.to(x.dtype)).view(*lead, self.out_features)

    def layer(self) -> tuple:
        """(words, scales, zeros, group_words, bias or None): the layer as the kernels take it."""
        return self.words, self.scales, self.zeros, self.group_words, self.bias

    def takes_input_as_is(self) -> bool:
        """Whether the words' rows are the layer's inputs in order (no act-order gather, no padding)."""
        return self.gather is None and self.padded_in == self.in_features

    def nbytes(self) -> int:
        """Bytes this object holds beyond the checkpoint's buffers (repacked words, float16 zeros, gather index, float32
        bias)."""
        extra = [self.zeros, self.group_words] + ([] if self.gather is None else [self.words, self.gather]) + \
            ([] if self.bias is None else [self.bias])
        return sum(t.numel() * t.element_size() for t in extra)


def gated_mlp(x2: torch.Tensor, w1: CpuGptqWeight, w2: CpuGptqWeight, c_proj: CpuGptqWeight) -> torch.Tensor:
    """``c_proj(w1(x) * silu(w2(x)))`` for float32 x [rows < GEMV_ROWS, in] in one kernel call (the SwiGLU MLP of a
    decoded token): w1 and w2 in one parallel region, no Python between the three layers. Equal to the three
    ``matmul`` calls and F.silu to the bit. The layers must share bits and take their inputs as they are."""
    return w1.kernels.gated_mlp(x2, w1.layer(), w2.layer(), c_proj.layer(), w1.bits)
