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
-march=native``, ~30 s the first time) goes next to the KV-cache kernels (``kvcache.cpp_kernels.kernel_build_dir``) and
is reused; a failed build logs one warning and yields None, and QuantLinear uses its other CPU paths. The same
extension holds ``half_linear``, the float16 layer a GPTQ checkpoint keeps (its lm_head, quantize.float16_linear).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from kvcache.cpp_kernels import kernel_build_dir

from .pack import pack_rows, unpack_layer

log = logging.getLogger(__name__)

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
_state = {}


def load_kernels(portable: bool = False):
    """Builds (first time on this machine) and imports the extension; the module, or None when unavailable.

    ``portable=True`` builds without ``-march=native``: what a CPU without AVX-512 runs, built here for the tests."""
    if portable not in _state:
        name = EXTENSION_NAME + ("_portable" if portable else "")
        flags = ["-O3", "-fopenmp"] + ([] if portable else ["-march=native"])
        try:
            from torch.utils.cpp_extension import load

            build_dir = kernel_build_dir() / name
            build_dir.mkdir(parents=True, exist_ok=True)
            log.info("loading the CPU GPTQ kernels (built into %s on first use)", build_dir)
            _state[portable] = load(name=name, sources=[str(Path(__file__).resolve().parent / "cpu_gptq_kernels.cpp")],
                                    build_directory=str(build_dir), extra_cflags=flags,
                                    extra_ldflags=["-fopenmp"], verbose=False)
        except Exception as err:  # noqa: BLE001 -- any build/import failure means "use another path", said once
            log.warning("CPU GPTQ kernels could not be built or loaded (%s); using the int4pack/dequantize paths", err)
            _state[portable] = None
    return _state[portable]


def fast_kernels():
    """The extension where it was built with its AVX-512 code (what was measured to beat torch's kernels), else None:
    "auto" paths use this; an explicit kernel="cpu" runs the portable loops anywhere."""
    kernels = load_kernels()
    return kernels if kernels is not None and kernels.vectorized else None


def supports(bits: int) -> bool:
    return bits in BITS


class CpuGptqWeight:
    """A GPTQ layer prepared for the kernels: the packed words (the checkpoint's own where it can), float16 scales and
    true zero points [groups, out], word offsets of the groups, and the input gather for a repacked layout."""

    def __init__(self, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                 bits: int, group_size: int, checkpoint_format: str, kernels=None):
        if bits not in BITS:
            raise ValueError(f"the CPU GPTQ kernels take bits {BITS}, got {bits}")
        self.kernels = kernels or load_kernels()
        if self.kernels is None:
            raise RuntimeError("the CPU GPTQ kernels are not available (the build failed; see the warning above)")
        codes, zeros = unpack_layer(qweight, qzeros, scales, g_idx, bits, checkpoint_format)
        self.bits, self.in_features, self.out_features = bits, codes.shape[1], codes.shape[0]
        values = 32 // bits
        n_groups = scales.shape[0]
        gs = self.in_features if group_size == -1 else group_size
        columns = torch.arange(self.in_features)
        g = g_idx.long()
        if gs % values == 0 and torch.equal(g, columns // gs):
            self.words = qweight.contiguous()
            starts = torch.arange(n_groups) * (gs // values)
            self.group_words = torch.cat([starts, torch.tensor([self.words.shape[0]])])
            self.gather = None
        else:
            counts = torch.bincount(g, minlength=n_groups)
            self.group_words = F.pad(torch.cumsum(-(-counts // values), 0), (1, 0))
            order = torch.argsort(g, stable=True)
            rank = columns - torch.cumsum(counts, 0)[g[order]] + counts[g[order]]
            position = self.group_words[g[order]] * values + rank
            self.gather = torch.full((int(self.group_words[-1]) * values,), self.in_features, dtype=torch.long)
            self.gather[position] = order
            laid = torch.zeros(self.gather.numel(), self.out_features, dtype=torch.int32)
            laid[position] = codes.t()[order]
            self.words = pack_rows(laid, bits)[:int(self.group_words[-1])].contiguous()
        self.padded_in = self.words.shape[0] * values
        self.scales = scales.to(torch.float16).contiguous()
        self.zeros = zeros.to(torch.float16).contiguous()
        self.chunks, first = [], 0  # group ranges of at most CHUNK_BYTES of float32 weight (or one group)
        for g in range(n_groups):
            if (self.group_words[g + 1] - self.group_words[first]) * values * self.out_features * 4 > CHUNK_BYTES \
                    and g > first:
                self.chunks.append((first, g))
                first = g
        self.chunks.append((first, n_groups))

    def _inputs(self, x2: torch.Tensor) -> torch.Tensor:
        """x [rows, in] -> [rows, padded_in] in the words' row order, zero where the words hold padding."""
        if self.gather is not None:
            return F.pad(x2, (0, 1))[:, self.gather]
        return F.pad(x2, (0, self.padded_in - self.in_features)) if self.padded_in != self.in_features else x2

    def dequantize_transposed(self, dtype: torch.dtype = torch.float32, groups: tuple[int, int] | None = None
                              ) -> torch.Tensor:
        """W^T [rows, out] in the words' row order (float32 or bfloat16): all of it, or the rows of groups [g0, g1)."""
        g0, g1 = groups or (0, self.scales.shape[0])
        w0, w1 = int(self.group_words[g0]), int(self.group_words[g1])
        return self.kernels.dequantize(self.words[w0:w1], self.scales[g0:g1], self.zeros[g0:g1],
                                       self.group_words[g0:g1 + 1] - w0, self.bits, dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] (any float dtype, CPU) -> x @ W^T [..., out] in x's dtype."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] < GEMV_ROWS:  # decode: a few microseconds of Python matter here, so no-op calls are skipped
            if x2.dtype != torch.float32:
                x2 = x2.float()
            if self.gather is not None or self.padded_in != self.in_features:
                x2 = self._inputs(x2)
            y = self.kernels.gemv(x2.contiguous(), self.words, self.scales, self.zeros, self.group_words, self.bits)
        else:  # one GEMM per chunk of groups, summed in float32
            dtype = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
            x2, values, y = self._inputs(x2.to(dtype)), 32 // self.bits, None
            for g0, g1 in self.chunks:
                k0, k1 = int(self.group_words[g0]) * values, int(self.group_words[g1]) * values
                xs, wt = x2[:, k0:k1], self.dequantize_transposed(dtype, (g0, g1))
                if y is None:
                    y = torch.mm(xs, wt).float()
                elif dtype == torch.float32:
                    y.addmm_(xs, wt)
                else:
                    y.add_(torch.mm(xs, wt))
        return (y if y.dtype == x.dtype else y.to(x.dtype)).view(*lead, self.out_features)

    def nbytes(self) -> int:
        """Bytes this object holds beyond the checkpoint's buffers (repacked words, float16 zeros, gather index)."""
        extra = [self.zeros, self.group_words] + ([] if self.gather is None else [self.words, self.gather])
        return sum(t.numel() * t.element_size() for t in extra)
