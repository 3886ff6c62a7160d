"""Load a GPTQ checkpoint of a transformers-native model (Qwen2 / Qwen3 / Llama) with this package's QuantLinear.

The checkpoint is the standard one (the family's own parameter names, `quantization_config` in config.json), as
`quantize_model` writes it and as GPTQModel / transformers + optimum write it. The model is transformers' own class
(`Qwen2ForCausalLM`, ...), built on the meta device; each decoder block's linears become empty QuantLinear layers,
then the checkpoint fills them strictly, so memory holds the packed weights only.
"""
import logging
from pathlib import Path

import torch

from .gptq_checkpoint import gptq_settings, keep_float16_head, load_gptq_state, replace_linears
from .model_families import NATIVE_MODEL_TYPES, family_for
from .quant_linear import QuantLinear

logger = logging.getLogger(__name__)


def load_native_quantized(path, device=None, dtype=torch.float32, kernel: str = "auto"):
    """transformers' causal LM for the GPTQ checkpoint at `path`, its block linears QuantLinear layers, in eval mode.

    `dtype` is the dtype of the float parts (embedding, norms, lm_head); QuantLinear computes in its input's dtype.
    """
    from transformers import AutoConfig

    path = Path(path)
    family = family_for(path)
    if family.name not in NATIVE_MODEL_TYPES:
        raise ValueError(f"{path} is a {family.name!r} checkpoint; this loader reads {', '.join(NATIVE_MODEL_TYPES)}")
    config = AutoConfig.from_pretrained(path)
    qc = gptq_settings(config, path)
    if qc is None:
        raise ValueError(f"{path} has no GPTQ quantization settings; load a float checkpoint with transformers")
    if qc.get("lm_head"):
        raise ValueError(f"{path}: a quantized lm_head is not supported")
    if hasattr(config, "quantization_config"):  # the model is built here, not by transformers' GPTQ integration
        del config.quantization_config
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = family.model_class(config)
    replace_linears(model, qc, family.base_model(model)[1], family.linears, kernel)
    model.to_empty(device=device)
    for module in model.modules():  # to_empty left the float parts in the default dtype
        if not isinstance(module, QuantLinear):
            for param in module.parameters(recurse=False):
                param.data = param.data.to(dtype)
    base, _ = family.base_model(model)
    family.materialise(base, config, device)
    tied = ("lm_head.weight",) if config.tie_word_embeddings else ()
    stored = load_gptq_state(model, path, f"{path}: checkpoint does not match a {qc['bits']}-bit GPTQ "
                                          f"{family.name} model with this config.json", tied)
    if tied:
        model.tie_weights()
    else:
        keep_float16_head(model, stored, config, kernel)
    config.quantization_config = qc
    logger.info("loaded %d-bit GPTQ %s checkpoint %s", qc["bits"], family.name, path)
    return model.eval()


def load_model(path, device=None, kernel: str = "torch"):
    """Any checkpoint this package quantizes or writes, float or GPTQ: Qwen v1 as `QWenLMHeadModel`, the native
    families as transformers' own class (GPTQ ones through `load_native_quantized`), in eval mode on `device`.

    What evaluation loads: GPTQ layers use QuantLinear `kernel` ("torch" by default, the dequantize reference, and the
    float lm_head as stored), so a perplexity measures the checkpoint's exact weights in float32 on any machine,
    whichever kernel "auto" would pick there (see `benchmarks/quant_linear_quality.py` for what "auto" changes)."""
    family = family_for(path)
    if family.name == "qwen":
        from qwen_model.modeling_qwen import QWenLMHeadModel

        return QWenLMHeadModel.from_pretrained(path, gptq_kernel=kernel).to(device or "cpu").eval()
    if gptq_settings(family.load_config(path), path) is not None:
        return load_native_quantized(path, device, kernel=kernel)
    return family.model_class.from_pretrained(path, dtype=torch.float32).to(device or "cpu").eval()
