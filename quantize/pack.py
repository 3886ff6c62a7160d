"""The GPTQ on-disk layout of one linear layer (as AutoGPTQ, GPTQModel, transformers/optimum and vLLM read it).

Tensors of a layer: `qweight` int32 [in * bits / 32, out], the codes packed along in_features; `qzeros` int32
[n_groups, out * bits / 32], the zero points packed along out_features; `scales` float16 [n_groups, out]; `g_idx`
int32 [in]. Packing treats every run of 32 values as one little-endian bit stream of `bits` int32 words: value k
sits at bit 32 * word + shift = bits * k. For 2/4/8 bits that is plain nibble/byte packing; for 3 bits it is the
AutoGPTQ layout where values 10 and 21 straddle two words. Weight = scales[g] * (code - zero[g]), g = g_idx[col].

checkpoint_format "gptq" (v1) stores zero - 1 in qzeros, the classic AutoGPTQ convention (so a true zero of 0,
possible with asymmetric grids, cannot be stored); "gptq_v2" stores the true zero points.
Shapes that are not multiples of 32 are zero-padded up to the next 32 values (readers other than this one expect
in_features and out_features to be multiples of 32).
"""
from __future__ import annotations

import math

import torch

from .quantizer import check_bits

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


def checkpoint_format_for(sym: bool) -> str:
    """The format to write: v1 for symmetric grids (widest reader support), v2 for asymmetric ones."""
    return "gptq" if sym else "gptq_v2"


def packed_length(n: int, bits: int) -> int:
    """Number of int32 words that hold n values of `bits` bits (n rounded up to a multiple of 32)."""
    check_bits(bits)
    return math.ceil(n / 32) * bits


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret uint32 values held in int64 as int32 (two's complement)."""
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer values [n, m] (each in [0, 2^bits)) along dim 0 into int32 [packed_length(n), m]."""
    n, m = values.shape
    v = torch.nn.functional.pad(values.to(torch.int64), (0, 0, 0, math.ceil(n / 32) * 32 - n))
    v = v.view(-1, 32, m)
    words = torch.zeros(v.shape[0], bits, m, dtype=torch.int64, device=values.device)
    for k in range(32):
        word, shift = divmod(bits * k, 32)
        words[:, word] |= (v[:, k] << shift) & 0xFFFFFFFF
        if shift + bits > 32:
            words[:, word + 1] |= v[:, k] >> (32 - shift)
    return _to_int32(words.view(-1, m))


def unpack_rows(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_rows: int32 [packed_length(n), m] -> int32 values [n, m]."""
    maxq = check_bits(bits)
    m = words.shape[1]
    if words.shape[0] != packed_length(n, bits):
        raise ValueError(f"packed tensor has {words.shape[0]} rows, expected {packed_length(n, bits)} for {n} values")
    if 32 % bits == 0:  # whole values per word: one shift per slot, in int32 (masking undoes the sign extension)
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device).view(1, -1, 1)
        return ((words.reshape(-1, 1, m) >> shifts) & maxq).reshape(-1, m)[:n]
    w = (words.to(torch.int64) & 0xFFFFFFFF).view(-1, bits, m)
    values = torch.empty(w.shape[0], 32, m, dtype=torch.int64, device=words.device)
    for k in range(32):
        word, shift = divmod(bits * k, 32)
        v = w[:, word] >> shift
        if shift + bits > 32:
            v = v | (w[:, word + 1] << (32 - shift))
        values[:, k] = v & maxq
    return values.view(-1, m)[:n].to(torch.int32)


def check_checkpoint_format(checkpoint_format: str) -> None:
    """Raise ValueError unless checkpoint_format is "gptq" or "gptq_v2"."""
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}")


def pack_layer(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor, bits: int,
               checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """Pack integer codes [out, in], scales [n_groups, out], true zero points [n_groups, out] and g_idx [in] into
    the checkpoint tensors qweight, qzeros, scales (float16) and g_idx (int32)."""
    maxq = check_bits(bits)
    check_checkpoint_format(checkpoint_format)
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [out, in], got shape {tuple(codes.shape)}")
    out_features, in_features = codes.shape
    n_groups = scales.shape[0]
    if scales.shape != (n_groups, out_features) or zeros.shape != (n_groups, out_features):
        raise ValueError(f"scales {tuple(scales.shape)} and zeros {tuple(zeros.shape)} must both be "
                         f"[n_groups, {out_features}]")
    if g_idx.shape != (in_features,):
        raise ValueError(f"g_idx must have shape [{in_features}], got {tuple(g_idx.shape)}")
    if in_features and (int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups):
        raise ValueError(f"g_idx values must be in [0, {n_groups})")
    codes = codes.to(torch.int64)
    zeros = zeros.to(torch.int64)
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > maxq):
        raise ValueError(f"codes must be in [0, {maxq}] for {bits}-bit")
    if int(zeros.min()) < 0 or int(zeros.max()) > maxq:
        raise ValueError(f"zero points must be in [0, {maxq}] for {bits}-bit")
    if checkpoint_format == "gptq":
        if int(zeros.min()) < 1:
            raise ValueError("a zero point of 0 cannot be stored in checkpoint_format 'gptq' (v1); use 'gptq_v2'")
        zeros = zeros - 1
    scales16 = scales.to(torch.float16)
    if not torch.isfinite(scales16).all():
        raise ValueError("scales are NaN/inf or overflow float16")
    return {
        "qweight": pack_rows(codes.t(), bits),
        "qzeros": pack_rows(zeros.t(), bits).t().contiguous(),
        "scales": scales16.contiguous(),
        "g_idx": g_idx.to(torch.int32).contiguous(),
    }


def _check_layer(qweight, qzeros, scales, g_idx, bits, checkpoint_format) -> None:
    check_bits(bits)
    check_checkpoint_format(checkpoint_format)
    n_groups, out_features = scales.shape
    in_features = g_idx.numel()
    if qweight.shape != (packed_length(in_features, bits), out_features):
        raise ValueError(f"qweight shape {tuple(qweight.shape)} does not fit in={in_features}, "
                         f"out={out_features}, bits={bits}")
    if qzeros.shape != (n_groups, packed_length(out_features, bits)):
        raise ValueError(f"qzeros shape {tuple(qzeros.shape)} does not fit {n_groups} groups, out={out_features}, "
                         f"bits={bits}")


def unpack_zeros(qzeros: torch.Tensor, bits: int, out_features: int, checkpoint_format: str) -> torch.Tensor:
    """True zero points int32 [n_groups, out] of packed qzeros (the v1 format stores zero - 1)."""
    zeros = unpack_rows(qzeros.t(), bits, out_features).t()
    return zeros + 1 if checkpoint_format == "gptq" else zeros


def _unpack_transposed(qweight, qzeros, scales, g_idx, bits, checkpoint_format):
    """(codes int32 [in, out], true zero points int32 [n_groups, out]), the layouts the words are stored in."""
    _check_layer(qweight, qzeros, scales, g_idx, bits, checkpoint_format)
    codes = unpack_rows(qweight, bits, g_idx.numel())
    return codes, unpack_zeros(qzeros, bits, scales.shape[1], checkpoint_format)


def group_gather(g_idx: torch.Tensor, starts: torch.Tensor, length: int):
    """Lays input columns out group by group, for kernels that need each group contiguous (act-order g_idx, padded
    groups): the columns of group g, in their order, from column starts[g]. Returns (order, position, gather):
    input column order[i] goes to position[i]; gather [length] maps each laid-out column back to its input column
    (in_features for a slot left empty, i.e. a zero column once the input is padded by one)."""
    g = g_idx.long()
    counts = torch.bincount(g, minlength=starts.numel())
    order = torch.argsort(g, stable=True)
    rank = torch.arange(g.numel()) - torch.cumsum(counts, 0)[g[order]] + counts[g[order]]
    position = starts[g[order]] + rank
    gather = torch.full((length,), g.numel(), dtype=torch.long)
    gather[position] = order
    return order, position, gather


def unpack_layer(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int,
                 checkpoint_format: str = "gptq") -> tuple[torch.Tensor, torch.Tensor]:
    """Read checkpoint tensors back into (codes int32 [out, in], true zero points int32 [n_groups, out])."""
    codes, zeros = _unpack_transposed(qweight, qzeros, scales, g_idx, bits, checkpoint_format)
    return codes.t().contiguous(), zeros.contiguous()


def dequantize_weight(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                      bits: int, checkpoint_format: str = "gptq", dtype: torch.dtype | None = None) -> torch.Tensor:
    """Float weight [out, in] of a packed layer, in `dtype` (default: the scales' dtype), computed in float32.

    Computed in the stored [in, out] layout and returned as its transposed view (F.linear takes it as it is)."""
    codes, zeros = _unpack_transposed(qweight, qzeros, scales, g_idx, bits, checkpoint_format)
    g = g_idx.long()
    weight = (codes - zeros[g]).to(torch.float32).mul_(scales.to(torch.float32)[g])
    return weight.to(dtype or scales.dtype).t()


def quantize_config(bits: int, group_size: int, damp_percent: float, desc_act: bool, static_groups: bool, sym: bool,
                    true_sequential: bool = True, model_name_or_path: str | None = None,
                    model_file_base_name: str = "model", checkpoint_format: str | None = None) -> dict:
    """quantize_config.json contents: the keys of the Qwen-7B-Chat-Int4 release plus quant_method and
    checkpoint_format (default: checkpoint_format_for(sym))."""
    check_bits(bits)
    checkpoint_format = checkpoint_format or checkpoint_format_for(sym)
    check_checkpoint_format(checkpoint_format)
    return {
        "bits": bits,
        "group_size": group_size,
        "damp_percent": damp_percent,
        "desc_act": desc_act,
        "static_groups": static_groups,
        "sym": sym,
        "true_sequential": true_sequential,
        "model_name_or_path": model_name_or_path,
        "model_file_base_name": model_file_base_name,
        "quant_method": "gptq",
        "checkpoint_format": checkpoint_format,
    }
