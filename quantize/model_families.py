"""What differs between the model families that `quantize_model` quantizes: a small description per family.

Every family here has pre-norm decoder blocks of the same shape (x + attn(norm(x)), then h + mlp(norm(h))), so one
orchestration and one staged calibration pass serve them all; a family only says where its tensors live, which
linears form the four true-sequential groups (attention inputs, attention output, MLP inputs, MLP output), which
module classes build its model and one decoder block, and how its config is read.

* Qwen v1 (`model_type` "qwen"): this package's `QWenLMHeadModel`, fused `attn.c_attn`; output carries our model code
  (`trust_remote_code=True`).
* transformers-native Qwen2 / Qwen2.5, Qwen3 and Llama (`model_type` "qwen2", "qwen3", "llama"): blocks are
  transformers' own decoder layers (`Qwen2DecoderLayer`, ... with the model's rotary embedding module, so GQA,
  q/k/v biases, q/k norms and `rope_parameters` / `rope_scaling` are theirs, not re-implemented); the output keeps
  the family's parameter names and loads with no remote code.
"""
from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

NATIVE_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                 ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


@dataclass(frozen=True)
class Family:
    """One model family, as the block-by-block quantizer sees it.

    groups: the block's linears in true-sequential order, exactly four groups: attention inputs, attention output,
    MLP inputs, MLP output (the staged calibration pass relies on that shape). input_norm / attention / post_norm /
    mlp name the block's submodules that the staged pass calls.
    """

    name: str
    blocks: str                  # prefix of decoder-block tensors, e.g. "model.layers."
    embedding: str               # tensor name of the token embedding
    groups: tuple[tuple[str, ...], ...]
    input_norm: str
    attention: str
    post_norm: str
    mlp: str
    load_config: Callable        # checkpoint dir -> config
    model_class: Callable        # config -> the whole causal LM (built on the meta device by the caller)
    block_class: Callable        # (config, index) -> one decoder block
    base_model: Callable         # causal LM -> (the module that runs embedding + blocks, its block list)
    calibration_config: Callable  # config -> the config blocks are built from for calibration
    compute_dtype: Callable      # (config, device) -> dtype of the calibration passes
    remote_code: bool            # write our model code into the output (Qwen v1 only)

    @property
    def linears(self) -> tuple[str, ...]:
        return sum(self.groups, ())

    def new_block(self, config, index: int) -> nn.Module:
        """An empty block on the meta device."""
        with torch.device("meta"):
            return self.block_class(config, index)

    def materialise(self, base: nn.Module, config, device) -> None:
        """Give a meta-built base model what it computes rather than loads (the rotary tables), on `device`."""
        rotary = getattr(base, "rotary_emb", None)
        if rotary is not None:
            base.rotary_emb = type(rotary)(config=config).to(device)


def _qwen_dtype(config, device: torch.device) -> torch.dtype:
    """The model's precision flags decide; with none set, float32 on CPU and bfloat16 on an accelerator."""
    if config.bf16:
        return torch.bfloat16
    if config.fp16:
        return torch.float16
    return torch.float32 if config.fp32 or device.type == "cpu" else torch.bfloat16


def _native_dtype(config, device: torch.device) -> torch.dtype:
    """float32 on CPU; on an accelerator the checkpoint's 16-bit dtype (bfloat16 when it is stored in float32)."""
    if device.type == "cpu":
        return torch.float32
    dtype = getattr(config, "dtype", None)
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


def _qwen_calibration_config(config):
    # Calibration passes use PyTorch's fused attention kernels whatever use_flash_attn says (same values, ~4x faster
    # on CPU than plain math attention).
    block_config = copy.deepcopy(config)
    block_config.use_flash_attn = True
    return block_config


def _native_calibration_config(config):
    block_config = copy.deepcopy(config)
    block_config._attn_implementation = "sdpa"
    return block_config


def _qwen_family() -> Family:
    from qwen_model.configuration_qwen import QWenConfig
    from qwen_model.modeling_qwen import QWenBlock, QWenLMHeadModel

    return Family(
        name="qwen", blocks="transformer.h.", embedding="transformer.wte.weight",
        groups=(("attn.c_attn",), ("attn.c_proj",), ("mlp.w1", "mlp.w2"), ("mlp.c_proj",)),
        input_norm="ln_1", attention="attn", post_norm="ln_2", mlp="mlp",
        load_config=QWenConfig.from_pretrained, model_class=QWenLMHeadModel, block_class=QWenBlock,
        base_model=lambda model: (model.transformer, model.transformer.h),
        calibration_config=_qwen_calibration_config, compute_dtype=_qwen_dtype, remote_code=True)


def _native_family(model_type: str) -> Family:
    from transformers import AutoConfig
    from transformers.models.llama import modeling_llama
    from transformers.models.qwen2 import modeling_qwen2
    from transformers.models.qwen3 import modeling_qwen3

    module, prefix = {"qwen2": (modeling_qwen2, "Qwen2"), "qwen3": (modeling_qwen3, "Qwen3"),
                      "llama": (modeling_llama, "Llama")}[model_type]

    def load_config(path):
        config = AutoConfig.from_pretrained(path)
        sliding = [t for t in getattr(config, "layer_types", None) or [] if t != "full_attention"]
        if sliding:
            raise ValueError(f"{path}: {len(sliding)} sliding-window attention layers are not supported; "
                             "quantize a checkpoint with use_sliding_window false")
        return config

    return Family(
        name=model_type, blocks="model.layers.", embedding="model.embed_tokens.weight", groups=NATIVE_GROUPS,
        input_norm="input_layernorm", attention="self_attn", post_norm="post_attention_layernorm", mlp="mlp",
        load_config=load_config, model_class=getattr(module, f"{prefix}ForCausalLM"),
        block_class=getattr(module, f"{prefix}DecoderLayer"),
        base_model=lambda model: (model.model, model.model.layers),
        calibration_config=_native_calibration_config, compute_dtype=_native_dtype, remote_code=False)


NATIVE_MODEL_TYPES = ("qwen2", "qwen3", "llama")
MODEL_TYPES = ("qwen",) + NATIVE_MODEL_TYPES


@functools.cache
def get_family(model_type: str) -> Family:
    """The description of `model_type` (one of MODEL_TYPES)."""
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(MODEL_TYPES)}")
    return _qwen_family() if model_type == "qwen" else _native_family(model_type)


def model_type_of(model_dir) -> str:
    """`model_type` of a checkpoint directory's config.json (ValueError when it has none)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json")
    model_type = json.loads(path.read_text()).get("model_type")
    if not model_type:
        raise ValueError(f"{path} has no model_type; supported: {', '.join(MODEL_TYPES)}")
    return model_type


def family_for(model_dir) -> Family:
    """The family of a checkpoint directory, from its config.json `model_type`."""
    model_type = model_type_of(model_dir)
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unsupported model_type {model_type!r} in {model_dir}; supported: {', '.join(MODEL_TYPES)}")
    return get_family(model_type)
