"""Real weights: SmolLM2-135M in its native Llama layout (GQA, tied embedding) against the same model in the Qwen v1
layout. The two compute the same function; GPTQ on both gives the very same integer codes and scales (the Qwen
copy repeats each KV head 3 times and fuses q/k/v, GPTQ treats output rows independently and the Hessians agree),
so the quality figures measured on the Qwen copy carry over. Then the native checkpoint through this package and
through transformers' GPTQ path (both dequantizing in float32) generates the same greedy tokens. The quantization
runs on the first 2 blocks (a config.json cut to 2 layers over the same safetensors) to stay fast."""
import json
import os

import pytest
import torch
from peers import require

from qwen_model.checkpoint import LazyCheckpoint
from qwen_model.modeling_qwen import QWenLMHeadModel
from quantize.native_checkpoint import load_native_quantized
from quantize.pack import unpack_layer
from quantize.quantize_model import QuantizeSettings, quantize_checkpoint

LAYERS = 2


def _cut(src, dst, layers=LAYERS):
    dst.mkdir()
    for p in src.iterdir():
        if p.name != "config.json":
            os.symlink(p, dst / p.name)
    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "num_hidden_layers": layers}))
    return dst


def test_native_layout_computes_the_qwen_function(smollm2_dir, smollm2_llama_dir):
    from transformers import AutoModelForCausalLM

    native = AutoModelForCausalLM.from_pretrained(smollm2_llama_dir, dtype=torch.float32).eval()
    qwen = QWenLMHeadModel.from_pretrained(smollm2_dir).eval()
    assert type(native).__name__ == "LlamaForCausalLM" and native.config.num_key_value_heads == 3
    ids = torch.randint(0, native.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = native(ids).logits, qwen(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=2e-4)  # measured 5e-5 of logits up to 34


@pytest.fixture(scope="module")
def both_quantized(smollm2_dir, smollm2_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("smol_q")
    out = {}
    for name, src in (("qwen", smollm2_dir), ("llama", smollm2_llama_dir)):
        settings = QuantizeSettings(bits=4, group_size=64)
        out[name] = quantize_checkpoint(_cut(src, root / f"{name}-src"), root / f"{name}-int4", settings,
                                        nsamples=4, seqlen=64, device="cpu")
    return out


def _layer(reader, name):
    t = {k: reader.get(f"{name}.{k}") for k in ("qweight", "qzeros", "scales", "g_idx")}
    codes, zeros = unpack_layer(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4)
    return codes, zeros, t["scales"].t()


def test_gptq_codes_equal_the_qwen_layouts(both_quantized):
    qwen, llama = LazyCheckpoint(both_quantized["qwen"]), LazyCheckpoint(both_quantized["llama"])
    for i in range(LAYERS):
        fused = _layer(qwen, f"transformer.h.{i}.attn.c_attn")
        parts = [_layer(llama, f"model.layers.{i}.self_attn.{p}_proj") for p in "qkv"]
        for j, (mine, theirs) in enumerate(zip(zip(*parts), fused)):
            q, k, v = mine
            if j == 1:  # zero points [groups, out]
                k, v = (x.reshape(x.shape[0], 3, 64).repeat_interleave(3, 1).reshape(x.shape[0], -1) for x in (k, v))
                expanded = torch.cat([q, k, v], dim=1)
            else:  # codes / scales^T [out, ...]: each of the 3 KV heads repeated for its 3 query heads
                k, v = (x.reshape(3, 64, -1).repeat_interleave(3, 0).reshape(576, -1) for x in (k, v))
                expanded = torch.cat([q, k, v])
            assert torch.equal(expanded, theirs), f"layer {i} q/k/v part {j}"
        for ours, qname in (("self_attn.o_proj", "attn.c_proj"), ("mlp.gate_proj", "mlp.w2"),
                            ("mlp.up_proj", "mlp.w1"), ("mlp.down_proj", "mlp.c_proj")):
            for a, b in zip(_layer(llama, f"model.layers.{i}.{ours}"), _layer(qwen, f"transformer.h.{i}.{qname}")):
                assert torch.equal(a, b), f"layer {i} {ours}"


def test_native_checkpoint_same_tokens_through_transformers(both_quantized, smollm2_llama_dir):
    require("optimum")
    require("gptqmodel")
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTQConfig

    path = both_quantized["llama"]
    # The dequantize reference: the fast kernel's bfloat16 rounding flips near-tied greedy picks of this 2-layer cut.
    ours = load_native_quantized(path, kernel="torch")
    hf = AutoModelForCausalLM.from_pretrained(path, quantization_config=GPTQConfig(bits=4, backend="gptq_torch"),
                                              dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_llama_dir)
    ids = tokenizer(["The capital of France is", "Water boils at"], return_tensors="pt", padding=True)
    with torch.no_grad():
        want = ours.generate(**ids, max_new_tokens=8, do_sample=False)
        got = hf.generate(**ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, want)
