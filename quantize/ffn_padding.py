"""Widen the FFN of a GPTQ checkpoint with exact zeros, so vLLM can shard it at every tensor-parallel size.

Qwen-7B's FFN width 11008 (14B: 13696) split over 4 or 8 ranks (14B: 2+) leaves `mlp.c_proj` an input width per
rank that is not a multiple of 128 and of the group size, which vLLM's kernels need (see `vllm_support`). Padding the
width to a multiple of 1024 (11008 -> 11264, 13696 -> 14336) lifts that, and changes no output: the new `w1`/`w2`
rows are zero, so their activations silu(0) * 0 = 0, and the new `c_proj` columns are zero as well.

The padding is done on the packed tensors after quantization, not on the float weights before: the quantized
weights of the existing rows and columns stay bit for bit what they were (padding first would change GPTQ's
dampening, which is a fraction of the Hessian's mean diagonal, and the act-order column order), and an existing
checkpoint can be padded too. New `w1`/`w2` rows get codes equal to their zero point (weight 0, scale 1); the new
`c_proj` columns form whole new groups (or join the single group of group size -1) with codes equal to the zero
point, so their weights are 0 whatever the scale.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from qwen_model.checkpoint import LazyCheckpoint
from qwen_model.configuration_qwen import QWenConfig

from .gptq_checkpoint import CheckpointWriter, gptq_settings, with_serving_dtype
from .pack import pack_layer, unpack_layer

logger = logging.getLogger(__name__)

PACKED = ("qweight", "qzeros", "scales", "g_idx")


def padded_width(ffn: int, multiple: int, group_size: int) -> int:
    """The FFN width rounded up to `multiple`; ValueError when the padding could not be whole groups."""
    if not isinstance(multiple, int) or multiple <= 0:
        raise ValueError(f"the FFN multiple must be a positive integer, got {multiple!r}")
    new = math.ceil(ffn / multiple) * multiple
    if group_size != -1 and new != ffn and (ffn % group_size or new % group_size):
        raise ValueError(f"cannot pad the FFN width {ffn} to {new} in whole groups of {group_size} (both must be "
                         "multiples of the group size)")
    return new


def _unpacked(tensors: dict, name: str, bits: int, fmt: str):
    q = {k: tensors[f"{name}.{k}"] for k in PACKED}
    codes, zeros = unpack_layer(q["qweight"], q["qzeros"], q["scales"], q["g_idx"], bits, fmt)
    return codes, zeros, q["scales"].float(), q["g_idx"].long()


def _neutral_zero(bits: int) -> int:
    """A zero point every format stores (v1 cannot store 0): the symmetric midpoint."""
    return 2 ** (bits - 1)


def _pad_outputs(tensors: dict, name: str, extra: int, bits: int, fmt: str) -> dict:
    """`extra` new output rows of weight 0 (and bias 0)."""
    codes, zeros, scales, g_idx = _unpacked(tensors, name, bits, fmt)
    zeros = torch.cat([zeros, zeros.new_full((zeros.shape[0], extra), _neutral_zero(bits))], dim=1)
    scales = torch.cat([scales, scales.new_ones(scales.shape[0], extra)], dim=1)
    codes = torch.cat([codes, zeros[g_idx, -extra:].t()], dim=0)
    out = {f"{name}.{k}": v for k, v in pack_layer(codes, scales, zeros, g_idx, bits, fmt).items()}
    if f"{name}.bias" in tensors:
        bias = tensors[f"{name}.bias"]
        out[f"{name}.bias"] = torch.cat([bias, bias.new_zeros(extra)])
    return out


def _pad_inputs(tensors: dict, name: str, extra: int, bits: int, group_size: int, fmt: str) -> dict:
    """`extra` new input columns of weight 0: whole new groups, or the single group of group size -1."""
    codes, zeros, scales, g_idx = _unpacked(tensors, name, bits, fmt)
    if group_size == -1:
        new_g = g_idx.new_zeros(extra)
    else:
        n_new = extra // group_size
        new_g = zeros.shape[0] + torch.arange(extra) // group_size
        zeros = torch.cat([zeros, zeros.new_full((n_new, zeros.shape[1]), _neutral_zero(bits))])
        scales = torch.cat([scales, scales.new_ones(n_new, scales.shape[1])])
    codes = torch.cat([codes, zeros[new_g].t()], dim=1)
    g_idx = torch.cat([g_idx, new_g])
    return {f"{name}.{k}": v for k, v in pack_layer(codes, scales, zeros, g_idx, bits, fmt).items()}


def pad_block(tensors: dict, prefix: str, ffn: int, new_ffn: int, qc: dict) -> dict:
    """The tensors of one block (names with `prefix`) with the FFN widened from `ffn` to `new_ffn`."""
    if new_ffn == ffn:
        return tensors
    bits, fmt, extra = qc["bits"], qc.get("checkpoint_format", "gptq"), new_ffn - ffn
    out = dict(tensors)
    for name in ("mlp.w1", "mlp.w2"):
        out.update(_pad_outputs(tensors, prefix + name, extra, bits, fmt))
    out.update(_pad_inputs(tensors, prefix + "mlp.c_proj", extra, bits, qc["group_size"], fmt))
    return out


def padded_config(config_dict: dict, ffn: int, new_ffn: int) -> dict:
    """config.json with the widened FFN (Qwen v1's `intermediate_size` is twice the FFN width) and the original
    width recorded in `quantization_config.ffn_padded_from`."""
    if new_ffn == ffn:
        return config_dict
    qc = {**config_dict["quantization_config"], "ffn_padded_from": ffn}
    return {**config_dict, "intermediate_size": 2 * new_ffn, "quantization_config": qc}


def pad_checkpoint(src, out_dir, multiple: int, overwrite: bool = False) -> Path:
    """Write a copy of the GPTQ checkpoint `src` with its FFN padded to a multiple of `multiple` (atomically)."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {src}")
    config = QWenConfig.from_pretrained(src)
    qc = gptq_settings(config, src)
    if qc is None:
        raise ValueError(f"{src} is not a GPTQ checkpoint (no quantization settings)")
    ffn = config.intermediate_size // 2
    new_ffn = padded_width(ffn, multiple, qc["group_size"])
    reader = LazyCheckpoint(src)
    writer = CheckpointWriter(out_dir, num_shards=config.num_hidden_layers + 1, overwrite=overwrite)
    try:
        for i in range(config.num_hidden_layers):
            prefix = f"transformer.h.{i}."
            block = reader.read_all(k for k in reader.keys() if k.startswith(prefix))
            writer.write_shard(pad_block(block, prefix, ffn, new_ffn, qc))
        writer.write_shard(reader.read_all(k for k in reader.keys() if not k.startswith("transformer.h.")))
        config_dict = json.loads((src / "config.json").read_text())
        config_dict["quantization_config"] = qc
        config_dict = with_serving_dtype(padded_config(config_dict, ffn, new_ffn))
        logger.info("padded the FFN of %s from %d to %d", src, ffn, new_ffn)
        return writer.finish(src, config_dict, config_dict["quantization_config"])
    except BaseException:
        writer.abort()
        raise
