"""A decoded token through all of a GPTQ model's blocks in one C++ call on CPU (``cpu_decode_step.cpp``).

Op by op, a decode step of SmolLM2-135M (Int4) makes ~300 kernel calls and ~400 tensor ops; the weights and the
cache of a step stream through every cache level, so each call starts cold and memory idles between them (about 9 ms
of an 18.7 ms step at 1024 positions on the 2-core box, benchmarks/RESULTS.md). ``decode_blocks_cpu`` runs every
block in one parallel region instead, with the same arithmetic (the logits equal the op-by-op path's bit for bit).

It applies to a decoded token (one position per sequence, fewer than ``cpu_gptq.GEMV_ROWS`` sequences) in float32
on CPU, without autograd recording, when every block's five linear layers are QuantLinear layers already running on
this package's CPU kernels with their inputs as they are (as ``quant_linear.gated_mlp_cpu`` requires), the same
bits, the rotary covers whole heads, and the cache is one that ``generate()`` makes, with room for the token in every
layer: the float ``ReservedCache``, or the int8 ``QuantizedKVCache`` in its token layout (float32 scales). Past
``seq_length`` the dynamic NTK rotary and the logn query scaling apply as in the blocks. Elsewhere it returns None
and the model runs its blocks one by one. The plan (the layers' tensors as the kernel takes them) is built once per
model and rebuilt when a layer's prepared weight or a norm's weight changes.
"""
from __future__ import annotations

import logging
import weakref
from pathlib import Path

import torch

from kvcache.cpp_kernels import load_once
from kvcache.cpu_kernels import check_finite
from kvcache.quantized_cache import QuantizedKVCache, QuantizedKVLayer
from kvcache.reserved import ReservedCache, ReservedLayer
from quantize import cpu_gptq
from quantize.quant_linear import prepared_cpu_weights

log = logging.getLogger(__name__)

EXTENSION_NAME = "qwen_quant_cpu_decode_step"
_SOURCE = Path(__file__).resolve().parent / "cpu_decode_step.cpp"
_state = {}
# Per model (held weakly, outside the module, so that copy.deepcopy and pickling of a model never meet the C++
# object): the parts its plan was built from and the plan; the models whose fused step was logged.
_plans = weakref.WeakKeyDictionary()
_logged = weakref.WeakSet()


def load_step(portable: bool = False):
    """Builds (first time on this machine) and imports the extension; the module, or None when unavailable."""
    return load_once(_state, portable, EXTENSION_NAME, _SOURCE, "fused CPU decode step", "the blocks one by one")


def _block_parts(block):
    """(ln_1 weight, c_attn, c_proj, ln_2 weight, w1, w2, mlp c_proj) with the layers' prepared CPU weights
    (``quant_linear.prepared_cpu_weights``); None where a layer does not qualify. Submodules are read from
    ``_modules`` directly: nn.Module's attribute lookup costs about a microsecond, ~300 times a decode step."""
    modules = block._modules
    attn, mlp = modules["attn"]._modules, modules["mlp"]._modules
    weights = prepared_cpu_weights((attn["c_attn"], attn["c_proj"], mlp["w1"], mlp["w2"], mlp["c_proj"]))
    if weights is None:
        return None
    c_attn, c_proj, w1, w2, mlp_proj = weights
    return (modules["ln_1"]._parameters["weight"], c_attn, c_proj, modules["ln_2"]._parameters["weight"], w1, w2,
            mlp_proj)


def _plan(model, parts, kernels):
    """The model's DecodePlan for these parts (see _block_parts), built or rebuilt when they are not the ones it was
    built from; None where they do not qualify."""
    cached = _plans.get(model)
    if cached is not None and len(cached[0]) == len(parts) and all(
            a is b for old, new in zip(cached[0], parts) for a, b in zip(old, new)):
        return cached[1]
    bits = {w.bits for p in parts for w in p[1:3] + p[4:]}
    if len(bits) != 1 or any(p[0].dtype != torch.float32 or p[3].dtype != torch.float32 for p in parts):
        plan = None
    else:
        config = model.config
        heads = config.num_attention_heads
        scale = 1.0 / (config.hidden_size // heads) ** 0.5 if config.scale_attn_weights else 1.0
        blocks = [(ln_1.detach(), c_attn.layer(), c_proj.layer(), ln_2.detach(), w1.layer(), w2.layer(),
                   mlp_proj.layer()) for ln_1, c_attn, c_proj, ln_2, w1, w2, mlp_proj in parts]
        try:
            plan = kernels.DecodePlan(blocks, bits.pop(), heads, config.layer_norm_epsilon, scale)
        except RuntimeError as err:  # shapes the kernel does not take (e.g. head_dim other than 64 or 128)
            log.info("fused CPU decode step not used: %s", str(err).splitlines()[0])
            plan = None
    _plans[model] = (parts, plan)
    return plan


def decode_blocks_cpu(model, hidden: torch.Tensor, cache, rotary, mask, logn_scale):
    """The hidden states [b, 1, E] after all of ``model.h`` (a QWenModel) for one decoded token per sequence, its keys
    and values appended to ``cache``; None where the fused step does not apply (see the module docstring)."""
    b, s, width = hidden.shape
    if (s != 1 or b >= cpu_gptq.GEMV_ROWS or hidden.dtype != torch.float32 or hidden.device.type != "cpu"
            or model.training or not isinstance(cache, (ReservedCache, QuantizedKVCache))
            or (mask is not None and mask.dtype != torch.float32)
            or (logn_scale is not None and (logn_scale.dtype != torch.float32 or logn_scale.numel() != b))):
        return None
    parts = []
    for block in model.h._modules.values():
        found = _block_parts(block)
        if found is None:
            return None
        parts.append(found)
    if torch.is_grad_enabled() and (hidden.requires_grad or any(p[0].requires_grad or p[3].requires_grad
                                                                for p in parts)):
        return None  # autograd would record the op-by-op path
    cos, sin = rotary[0], rotary[1]
    if cos.dtype != torch.float32 or cos.shape[-1] * model.config.num_attention_heads * 3 != parts[0][1].out_features:
        return None  # a rotary over part of each head
    layers = cache.layers
    if len(layers) != len(parts) or not (
            all(type(layer) is ReservedLayer for layer in layers) or all(type(layer) is QuantizedKVLayer
                                                                         for layer in layers)):
        return None
    past = layers[0].get_seq_length()
    rooms = [layer.room(past) for layer in layers]
    if any(room is None for room in rooms):
        return None
    kernels = load_step()
    plan = None if kernels is None else _plan(model, parts, kernels)
    if plan is None:
        return None
    if model not in _logged:
        _logged.add(model)
        log.info("decoded tokens run all %d blocks as one call of the fused CPU decode step", len(parts))
    hidden2, cos, sin = hidden.reshape(b, width).contiguous(), cos.contiguous(), sin.contiguous()
    logn = None if logn_scale is None else logn_scale.reshape(b).contiguous()
    if type(layers[0]) is ReservedLayer:
        out = plan.step(hidden2, [room[0] for room in rooms], [room[1] for room in rooms], past, cos, sin, mask, logn)
    else:
        out, finite = plan.step_int8(hidden2, rooms, past, cos, sin, mask, logn, layers[0].qmin, layers[0].qmax)
        check_finite(finite)  # as the op-by-op path raises, before any layer takes the position as filled
    for layer in layers:
        layer.commit(past + 1)
    return out.view(b, 1, width)
