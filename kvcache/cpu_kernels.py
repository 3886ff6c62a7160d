"""Builds and loads the CPU KV-cache kernels (``cpu_cache_kernels.cpp``) with torch's JIT loader, once per machine.

The kernels score and weight a per-token quantized layer (8-bit, or 4-bit two codes per byte) reading its uint8 codes
directly, converting them in registers: a decoded token reads 1 or 0.5 bytes per cached element where the float
cache reads 4, and no float copy of a block is written. With per-token scale ``s`` and zero ``z`` (subtracted from
each code before the product, so no large terms cancel):

* ``token_scores``: ``s q·(k_q − z)`` = ``q·k`` for every stored position;
* ``grouped_scores``: the ``"channel_groups"`` keys (4-bit, per-channel scales over groups of positions, pre-RoPE)
  dequantized and rotated at their positions in registers, then ``q·k``; the float residual after them;
* ``token_values``: ``Σ_t (p_t s_t) (v_q − z_t)`` = ``p @ V``;
* ``attend_token`` / ``attend_grouped``: a whole decode step (scores, float32 softmax with the mask, values) in one
  call on the cache's own ``[b, h, ...]`` tensors (reserved views in their stored dtype, int32 positions), what
  ``kvcache.blocked_attention`` runs: the reshapes, float32 conversions and channel reordering happen in C++, not as
  a dozen Python tensor ops per layer. ``attend_token`` reads the layer in one pass (below);
* ``attend_float``: the same decode step over a float32 layer (``q·k``, float32 softmax with the mask, ``p @ V``),
  what the model runs for a decoded token on CPU instead of ~8 small tensor ops (``attend_float_cpu``).

One pass (``attend_float``, ``attend_token``): each block of 256 positions of a row takes its softmax against its own
maximum, weights its values at once, and the blocks are merged after (flash decoding's split softmax); a block's
values are prefetched while its keys are scored, and no scores tensor or softmax op comes between.
* ``quantize_token``: the per-token quantizer of ``kvcache.quantize_cache`` for float32 states, bit-identical, one
  call instead of ~20 small tensor ops (``QuantizedKVLayer`` uses it on CPU);
* ``quantize_append``: the same rows written straight into a reserved layer's buffers after its filled positions
  (``QuantizedKVLayer``'s decode steps: no quantized temporaries and no appends);
* ``append_in_place``: ``kvcache.reserved.append``'s in-place case (checks and copy) in one call, for any CPU cache
  tensor.

The scoring and value loops prefetch the codes 2 KiB ahead of the position they read (``PREFETCH_BYTES``).

4-bit codes hold the even channel in the low nibble; the scoring and value kernels take the query (and give the
output) in split order (even channels, then odd ones); the decode-step calls reorder in and out themselves. The
build (``kvcache.cpp_kernels.build_cpu_extension``: gcc, ``-O3 -march=native -fopenmp``, about half a minute the
first time) is reused by later processes. Any failure logs one warning and yields ``None``, and attention falls
back to the plain-torch blocks of ``kvcache.chunked_attention`` (and appends to the tensor ops).
"""
from pathlib import Path

import torch

from kvcache.cpp_kernels import load_once

EXTENSION_NAME = "qwen_quant_cpu_cache_kernels"
_SOURCE = Path(__file__).resolve().parent / "cpu_cache_kernels.cpp"
_state = {}


def load_cpu_kernels(portable: bool = False):
    """Builds (first time on this machine) and imports the extension; the module, or None when unavailable.

    ``portable=True`` builds the plain C++ loops without ``-march=native`` (no AVX-512 intrinsics): what runs on a
    CPU without AVX-512, built here so that tests cover it too."""
    return load_once(_state, portable, EXTENSION_NAME, _SOURCE, "CPU KV-cache kernels", "the plain-torch blocks")


def quantize_token_cpu(kernels, states, bits: int, qmin: int, qmax: int):
    """``quantize_cache_v(states, bits, qmax, qmin)`` for float32 CPU states [b, h, seq, d] in one kernel call:
    bit-identical codes, scales and zeros (tests/test_cpu_kernels.py), without its ~20 small tensor ops per call
    (a decode step quantizes one position per layer)."""
    b, h, n, d = states.shape
    codes, scale, zero, finite = kernels.quantize_token(states.reshape(-1, d).contiguous(), bits, qmin, qmax)
    check_finite(finite)
    return codes.view(b, h, n, -1), scale.view(b, h, n, 1), zero.view(b, h, n, 1)


def quantize_append_cpu(kernels, states, codes, scale, zero, old: int, bits: int, qmin: int, qmax: int):
    """``quantize_token_cpu``'s rows of float32 CPU states [b, h, n, d] written into reserved buffers [b, h, capacity,
    .] at positions ``old`` .. ``old + n - 1`` (nothing else touched, so a raise leaves the filled part as it was);
    returns the buffers' views of positions 0 .. old + n - 1."""
    finite, *views = kernels.quantize_append(states.contiguous(), codes, scale, zero, old, bits, qmin, qmax)
    check_finite(finite)
    return views


def check_finite(finite: bool) -> None:
    """The error of ``quantize_cache_v`` for states that held NaN or inf (the kernels report it as a flag)."""
    if not finite:
        raise ValueError("quantize_cache_v: fdata contains NaN or inf values, which cannot be quantized")


def attend_float_cpu(query, key, value, mask, scale: float):
    """``softmax(q k^T * scale + mask) v`` for one decoded token: float32 CPU query [b, h, 1, d], keys/values
    [b, h, T, d] (views into a reserved cache are read in place), mask None or additive [b, 1, 1, T]; returns
    [b, h, 1, d], or None where the kernel does not apply (other dtypes or head sizes, no build), for the caller's
    plain attention."""
    b, h, s, d = query.shape
    if (s != 1 or d not in (64, 128) or query.device.type != "cpu" or key.shape[2] == 0
            or not query.dtype == key.dtype == value.dtype == torch.float32
            or (mask is not None and mask.dtype != torch.float32)):
        return None
    kernels = load_cpu_kernels()
    if kernels is None:
        return None
    out = kernels.attend_float(query.reshape(b * h, s, d), key.reshape(b * h, -1, d), value.reshape(b * h, -1, d),
                               mask, scale, h)
    return out.view(b, h, s, d)
