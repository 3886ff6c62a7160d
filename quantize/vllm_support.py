"""Which of vLLM's GPTQ kernels can serve a Qwen (v1) GPTQ checkpoint, at which tensor-parallel sizes.

The rules, as vLLM's source states them (read in `model_executor/layers/quantization/gptq_marlin.py`, `gptq.py` and
`utils/marlin_utils.py`), for the layers its `models/qwen.py` builds: `attn.c_attn` (QKV, column-parallel: output
split across ranks), `attn.c_proj` (row-parallel: input split), `mlp.w2`+`mlp.w1` merged into one column-parallel
`gate_up_proj`, and `mlp.c_proj` (row-parallel, input = the FFN width, half of config.json `intermediate_size`).

- `gptq_marlin`: 4 or 8 bits, symmetric (the v1 zero point 2^(bits-1)), group size -1/32/64/128; per rank the
  output width N is a multiple of 64, the input width K a multiple of 128 and of the group size.
- `gptq` (ExLlama/Triton, the fallback): 2/3/4/8 bits, float16 activations only; per rank K is a multiple of the
  group size and N of the pack factor (32/bits; 32 for 3 bits). It reads `checkpoint_format: "gptq_v2"` (true
  zero points, what asymmetric grids are stored as) only in releases that have the v2 reader.
- Every kernel: the attention heads and every merged part of a column-parallel layer split evenly across ranks, and
  each part's packed zero points stay whole words.
"""
from __future__ import annotations

from dataclasses import dataclass

MARLIN = "gptq_marlin"
GPTQ = "gptq"
KERNELS = (MARLIN, GPTQ)
TP_SIZES = (1, 2, 4, 8)
MARLIN_BITS = (4, 8)
MARLIN_GROUP_SIZES = (-1, 32, 64, 128)
MARLIN_MIN_N = 64
MARLIN_MIN_K = 128
GPTQ_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class ParallelLinear:
    """One linear layer as vLLM shards it: `parts` are the output widths of the layers merged into it."""

    name: str
    in_features: int
    parts: tuple[int, ...]
    row_parallel: bool

    def per_rank(self, tp: int) -> tuple[int, tuple[int, ...]] | None:
        """(K, output parts) on one rank, or None when the split is not even."""
        split = (self.in_features,) if self.row_parallel else self.parts
        if any(width % tp for width in split):
            return None
        if self.row_parallel:
            return self.in_features // tp, self.parts
        return self.in_features, tuple(width // tp for width in self.parts)


def qwen_linears(config) -> list[ParallelLinear]:
    """The quantized layers of one Qwen (v1) block as vLLM builds them."""
    hidden = config.hidden_size
    proj = config.kv_channels * config.num_attention_heads
    ffn = config.intermediate_size // 2
    return [
        ParallelLinear("attn.c_attn", hidden, (proj, proj, proj), row_parallel=False),
        ParallelLinear("attn.c_proj", proj, (hidden,), row_parallel=True),
        ParallelLinear("mlp.w2+mlp.w1", hidden, (ffn, ffn), row_parallel=False),
        ParallelLinear("mlp.c_proj", ffn, (hidden,), row_parallel=True),
    ]


def _pack_factor(bits: int) -> int:
    return 32 if 32 % bits else 32 // bits


def setting_problems(qc: dict, dtype: str | None = "float16") -> dict[str, list[str]]:
    """Why each kernel cannot run these quantization settings at all (an empty list: it can)."""
    bits, group_size, sym = qc["bits"], qc["group_size"], qc.get("sym", True)
    marlin, gptq = [], []
    if bits not in MARLIN_BITS:
        marlin.append(f"runs 4/8-bit only, not {bits}-bit")
    if not sym:
        marlin.append("runs symmetric grids only")
    if group_size not in MARLIN_GROUP_SIZES:
        marlin.append(f"runs group sizes {MARLIN_GROUP_SIZES} only, not {group_size}")
    if bits not in GPTQ_BITS:
        gptq.append(f"runs 2/3/4/8-bit only, not {bits}-bit")
    if dtype is not None and dtype != "float16":
        gptq.append(f"runs in float16 only, config.json says {dtype}")
    return {MARLIN: marlin, GPTQ: gptq}


def shape_problems(config, qc: dict, tp: int) -> dict[str, list[str]]:
    """Why each kernel cannot run this model's layer shapes at tensor-parallel size `tp`."""
    bits, group_size = qc["bits"], qc["group_size"]
    common = []
    if config.num_attention_heads % tp:
        common.append(f"{config.num_attention_heads} attention heads do not split over {tp} ranks")
    marlin, gptq = [], []
    for layer in qwen_linears(config):
        split = layer.per_rank(tp)
        if split is None:
            common.append(f"{layer.name} does not split evenly over {tp} ranks")
            continue
        k, parts = split
        n = sum(parts)
        if any(part % _pack_factor(bits) for part in parts):
            common.append(f"{layer.name} output part {parts[0]} per rank is not a whole number of packed words")
        if group_size != -1 and k % group_size:
            message = f"{layer.name} K per rank {k} is not a multiple of group size {group_size}"
            gptq.append(message)
            if group_size < layer.in_features:  # Marlin treats a group wider than the layer as one group
                marlin.append(message)
        if n % MARLIN_MIN_N:
            marlin.append(f"{layer.name} N per rank {n} is not a multiple of {MARLIN_MIN_N}")
        if k % MARLIN_MIN_K:
            marlin.append(f"{layer.name} K per rank {k} is not a multiple of {MARLIN_MIN_K}")
        if n % _pack_factor(bits):
            gptq.append(f"{layer.name} N per rank {n} is not a multiple of {_pack_factor(bits)}")
    return {MARLIN: common + marlin, GPTQ: common + gptq}


def supported_kernels(config, qc: dict, tp: int, dtype: str | None = "float16") -> list[str]:
    """The kernels that can run the checkpoint at tensor-parallel size `tp` (gptq_marlin first, vLLM's choice)."""
    settings, shapes = setting_problems(qc, dtype), shape_problems(config, qc, tp)
    return [kernel for kernel in KERNELS if not settings[kernel] and not shapes[kernel]]


def setting_warnings(config, qc: dict) -> list[str]:
    """Settings with which vLLM cannot run the checkpoint, or not with its fast kernel, one sentence each."""
    bits, group_size = qc["bits"], qc["group_size"]
    out = []
    if group_size not in MARLIN_GROUP_SIZES:
        out.append(f"group size {group_size}: vLLM's gptq_marlin runs only group sizes -1/32/64/128")
    widths = sorted({layer.in_features for layer in qwen_linears(config)})
    odd = [k for k in widths if group_size != -1 and k % group_size]
    if odd:
        out.append(f"group size {group_size} does not divide the input widths {odd}: vLLM cannot load the "
                   "checkpoint (its kernels need whole groups)")
    if not qc.get("sym", True):
        out.append("asymmetric grids are stored as checkpoint_format gptq_v2: vLLM's gptq_marlin cannot run them, "
                   "and its gptq kernel reads them only in releases with the gptq_v2 reader (older ones misread the "
                   "zero points)")
    if bits == 3:
        out.append("3-bit: vLLM runs it only with its slower gptq kernel (float16), not gptq_marlin")
    elif bits not in GPTQ_BITS:
        out.append(f"{bits}-bit: vLLM has no GPTQ kernel for it")
    return out


def describe(config, qc: dict, tp_sizes=TP_SIZES, dtype: str | None = "float16") -> list[str]:
    """Lines for the CLI: per tensor-parallel size, the vLLM kernels that can serve the checkpoint, or why none."""
    lines = []
    for tp in tp_sizes:
        kernels = supported_kernels(config, qc, tp, dtype)
        if kernels:
            names = [k + (" (with the gptq_v2 reader)" if k == GPTQ and not qc.get("sym", True) else "")
                     for k in kernels]
            lines.append(f"vLLM tensor-parallel {tp}: {', '.join(names)}")
        else:
            settings, shapes = setting_problems(qc, dtype), shape_problems(config, qc, tp)
            why = "; ".join(f"{k}: {(settings[k] + shapes[k])[0]}" for k in KERNELS)
            lines.append(f"vLLM tensor-parallel {tp}: no GPTQ kernel ({why})")
    return lines


def checkpoint_report(path) -> tuple[list[str], list[str]]:
    """(`describe` lines, `setting_warnings`) for the GPTQ checkpoint directory `path`, as it was written."""
    from qwen_model.configuration_qwen import QWenConfig

    from .gptq_checkpoint import gptq_settings

    config = QWenConfig.from_pretrained(path)
    qc = gptq_settings(config, path)
    dtype = str(config.dtype).removeprefix("torch.") if config.dtype is not None else None
    return describe(config, qc, dtype=dtype), setting_warnings(config, qc)
