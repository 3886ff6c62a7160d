"""Qwen v1 <-> Llama checkpoint layout, so that GPTQModel (which knows Llama, not Qwen v1) can quantize our models
and its GPTQ checkpoints can be loaded by `qwen_model`.

The two architectures compute the same function when Qwen has as many KV heads as query heads, a zero `c_attn`
bias and no dynamic NTK / logn scaling in use (sequences up to `seq_length`):

    Qwen v1                    Llama
    ln_1 / ln_2                input_layernorm / post_attention_layernorm
    attn.c_attn (q|k|v, bias)  self_attn.q_proj, k_proj, v_proj (no bias)
    attn.c_proj                self_attn.o_proj
    mlp.w2 (gets silu)         mlp.gate_proj
    mlp.w1                     mlp.up_proj
    mlp.c_proj                 mlp.down_proj
    wte / ln_f / lm_head       model.embed_tokens / model.norm / lm_head

GPTQ tensors keep out_features in their last dimension (`qweight` [in/pack, out], `scales` [groups, out],
`qzeros` [groups, out*bits/32]), so fusing q/k/v is a concatenation along dim 1 as long as each part's packed zero
points end on an int32 boundary (out_features * bits % 32 == 0) and the three `g_idx` agree.

    python benchmarks/peer_llama_layout.py to-llama QWEN_DIR OUT_DIR
    python benchmarks/peer_llama_layout.py gptq-to-qwen LLAMA_GPTQ_DIR OUT_DIR
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qwen_model.checkpoint import LazyCheckpoint, write_remote_code  # noqa: E402

logger = logging.getLogger(__name__)

# (Qwen name inside a block, Llama name inside a layer) for the one-to-one linears
LINEARS = (("attn.c_proj", "self_attn.o_proj"), ("mlp.w2", "mlp.gate_proj"), ("mlp.w1", "mlp.up_proj"),
           ("mlp.c_proj", "mlp.down_proj"))
NORMS = (("ln_1", "input_layernorm"), ("ln_2", "post_attention_layernorm"))
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
PACKED_ALONG_OUT = ("qweight", "qzeros", "scales")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def llama_config_from_qwen(qwen: dict) -> dict:
    """LlamaConfig fields of the Llama model that computes the same function as a Qwen v1 config (dict)."""
    hidden, heads = qwen["hidden_size"], qwen["num_attention_heads"]
    head_dim = qwen.get("kv_channels", hidden // heads)
    if head_dim * heads != hidden:
        raise ValueError(f"kv_channels {head_dim} x {heads} heads != hidden_size {hidden}")
    if qwen.get("rotary_pct", 1.0) != 1.0:
        raise ValueError(f"rotary_pct {qwen['rotary_pct']} has no Llama equivalent (needs 1.0)")
    return dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=qwen["vocab_size"], hidden_size=hidden,
        intermediate_size=qwen["intermediate_size"] // 2, num_hidden_layers=qwen["num_hidden_layers"],
        num_attention_heads=heads, num_key_value_heads=heads, head_dim=head_dim, hidden_act="silu",
        max_position_embeddings=qwen.get("seq_length", qwen.get("max_position_embeddings", 8192)),
        rms_norm_eps=qwen["layer_norm_epsilon"], rope_theta=float(qwen.get("rotary_emb_base", 10000)),
        rope_parameters={"rope_type": "default", "rope_theta": float(qwen.get("rotary_emb_base", 10000))},
        attention_bias=False, mlp_bias=False, tie_word_embeddings=False, torch_dtype="float32")


def qwen_config_from_llama(llama: dict) -> dict:
    """Qwen v1 config fields of the model that computes the same function as a Llama config (dict)."""
    heads = llama["num_attention_heads"]
    if llama.get("num_key_value_heads", heads) != heads:
        raise ValueError(f"Qwen v1 has no grouped-query attention: {llama['num_key_value_heads']} KV heads for "
                         f"{heads} query heads")
    if llama.get("attention_bias") or llama.get("mlp_bias"):
        raise ValueError("Llama attention/MLP biases have no Qwen v1 equivalent")
    if llama.get("hidden_act", "silu") != "silu":
        raise ValueError(f"Qwen v1 uses silu, not {llama['hidden_act']}")
    rope = llama.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or llama.get("rope_scaling"):
        raise ValueError(f"only default RoPE maps to Qwen v1, got {rope or llama.get('rope_scaling')}")
    theta = rope.get("rope_theta", llama.get("rope_theta", 10000.0))
    hidden = llama["hidden_size"]
    head_dim = llama.get("head_dim") or hidden // heads
    if head_dim * heads != hidden:
        raise ValueError(f"head_dim {head_dim} x {heads} heads != hidden_size {hidden}")
    seq = llama.get("max_position_embeddings", 8192)
    return dict(
        architectures=["QWenLMHeadModel"], model_type="qwen", vocab_size=llama["vocab_size"], hidden_size=hidden,
        num_hidden_layers=llama["num_hidden_layers"], num_attention_heads=heads, kv_channels=head_dim,
        intermediate_size=2 * llama["intermediate_size"], rotary_pct=1.0, rotary_emb_base=theta,
        layer_norm_epsilon=llama["rms_norm_eps"], seq_length=seq, max_position_embeddings=seq,
        use_dynamic_ntk=False, use_logn_attn=False, use_flash_attn=False, no_bias=True, tie_word_embeddings=False,
        scale_attn_weights=True, emb_dropout_prob=0.0, attn_dropout_prob=0.0, bf16=False, fp16=False, fp32=True,
        use_cache=True, use_cache_quantization=False, use_cache_kernel=False, softmax_in_fp32=False)


def qwen_to_llama_state(state: dict, num_layers: int) -> dict:
    """Float Qwen v1 tensors -> Llama tensors. c_attn is split in three; its bias must be zero (Llama has none)."""
    out = {"model.embed_tokens.weight": state["transformer.wte.weight"],
           "model.norm.weight": state["transformer.ln_f.weight"], "lm_head.weight": state["lm_head.weight"]}
    for i in range(num_layers):
        q, l = f"transformer.h.{i}.", f"model.layers.{i}."
        bias = state.get(q + "attn.c_attn.bias")
        if bias is not None and bool(bias.any()):
            raise ValueError(f"{q}attn.c_attn.bias is not zero; Llama attention has no bias")
        for part, tensor in zip(QKV, state[q + "attn.c_attn.weight"].chunk(3, dim=0)):
            out[l + part + ".weight"] = tensor.contiguous()
        for qwen_name, llama_name in LINEARS + NORMS:
            out[l + llama_name + ".weight"] = state[q + qwen_name + ".weight"]
    return out


def fuse_qkv(parts: list[dict], bits: int | None, name: str) -> dict:
    """One c_attn tensor dict from the q, k, v tensor dicts of one layer (float `weight`, or packed GPTQ tensors)."""
    if "weight" in parts[0]:
        return {"weight": torch.cat([p["weight"] for p in parts], dim=0)}
    if bits is None:
        raise ValueError(f"{name}: packed GPTQ tensors need the bit width")
    for p in parts:
        out_features = p["scales"].shape[1]
        if out_features * bits % 32:
            raise ValueError(f"{name}: {out_features} outputs x {bits} bits do not end on an int32 boundary, so "
                             "packed zero points cannot be concatenated")
        if not torch.equal(p["g_idx"], parts[0]["g_idx"]):
            raise ValueError(f"{name}: q/k/v have different g_idx, so they cannot share one c_attn")
    fused = {k: torch.cat([p[k] for p in parts], dim=1).contiguous() for k in PACKED_ALONG_OUT}
    fused["g_idx"] = parts[0]["g_idx"]
    return fused


def llama_to_qwen_state(state: dict, num_layers: int, bits: int | None = None) -> dict:
    """Llama tensors (float, or GPTQ-packed linears when `bits` is given) -> Qwen v1 tensors, c_attn with zero bias."""
    out = {"transformer.wte.weight": state["model.embed_tokens.weight"],
           "transformer.ln_f.weight": state["model.norm.weight"],
           "lm_head.weight": state.get("lm_head.weight", state["model.embed_tokens.weight"])}
    for i in range(num_layers):
        q, l = f"transformer.h.{i}.", f"model.layers.{i}."
        parts = []
        for part in QKV:
            prefix = l + part + "."
            tensors = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if "bias" in tensors:
                raise ValueError(f"{prefix}bias: Qwen v1 c_attn takes a bias, but fusing Llama biases is not supported")
            parts.append(tensors)
        fused = fuse_qkv(parts, bits, f"layer {i} q/k/v")
        for key, tensor in fused.items():
            out[q + "attn.c_attn." + key] = tensor
        out[q + "attn.c_attn.bias"] = (fused["weight"].new_zeros(fused["weight"].shape[0]) if "weight" in fused
                                       else torch.zeros(fused["scales"].shape[1], dtype=torch.float16))
        for qwen_name, llama_name in LINEARS:
            prefix = l + llama_name + "."
            for k, v in state.items():
                if k.startswith(prefix):
                    out[q + qwen_name + "." + k[len(prefix):]] = v
        for qwen_name, llama_name in NORMS:
            out[q + qwen_name + ".weight"] = state[l + llama_name + ".weight"]
    return out


def _read_all(path) -> dict:
    reader = LazyCheckpoint(path)
    return {k: reader.get(k) for k in reader.keys()}


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copyfile(src / name, dst / name)


def convert_qwen_to_llama(qwen_dir, out_dir) -> Path:
    """Write a float LlamaForCausalLM checkpoint (model.safetensors, config.json, tokenizer) from a Qwen v1 one."""
    qwen_dir, out_dir = Path(qwen_dir), Path(out_dir)
    qwen = json.loads((qwen_dir / "config.json").read_text())
    if qwen.get("quantization_config"):
        raise ValueError(f"{qwen_dir} is a quantized checkpoint; convert the float model")
    config = llama_config_from_qwen(qwen)
    state = qwen_to_llama_state(_read_all(qwen_dir), qwen["num_hidden_layers"])
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _copy_tokenizer(qwen_dir, out_dir)
    logger.info("wrote Llama-layout checkpoint %s", out_dir)
    return out_dir


def convert_llama_gptq_to_qwen(llama_dir, out_dir) -> Path:
    """Write a Qwen v1 GPTQ checkpoint that `QWenLMHeadModel.from_pretrained` loads from a Llama GPTQ checkpoint
    (e.g. one written by GPTQModel): q/k/v fused into c_attn, `quantization_config` carried over."""
    llama_dir, out_dir = Path(llama_dir), Path(out_dir)
    llama = json.loads((llama_dir / "config.json").read_text())
    qc = llama.get("quantization_config")
    if not qc or qc.get("quant_method") != "gptq":
        raise ValueError(f"{llama_dir}: config.json has no GPTQ quantization_config")
    if qc.get("lm_head"):
        raise ValueError(f"{llama_dir}: a quantized lm_head is not supported by qwen_model")
    config = {**qwen_config_from_llama(llama), "quantization_config": qc}
    state = llama_to_qwen_state(_read_all(llama_dir), llama["num_hidden_layers"], bits=qc["bits"])
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    quantize_config = llama_dir / "quantize_config.json"
    if quantize_config.exists():
        shutil.copyfile(quantize_config, out_dir / "quantize_config.json")
    _copy_tokenizer(llama_dir, out_dir)
    write_remote_code(out_dir)
    logger.info("wrote Qwen-layout GPTQ checkpoint %s", out_dir)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("direction", choices=["to-llama", "gptq-to-qwen"])
    parser.add_argument("src")
    parser.add_argument("out")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    convert = convert_qwen_to_llama if args.direction == "to-llama" else convert_llama_gptq_to_qwen
    convert(args.src, args.out)


if __name__ == "__main__":
    main()
