"""The loader never guesses: GPTQ directories load quantized from config.json or quantize_config.json settings or
fail with one clear error; tensor names are checked strictly (known harmless extras skipped); the official
Qwen-7B-Chat-Int4/Int8 layout (sharded, index, qwen.tiktoken, their configs) loads. Real safetensors files."""
import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import save_file

from qwen_model.checkpoint import LazyCheckpoint
from qwen_model.configuration_qwen import QWenConfig
from qwen_model.modeling_qwen import QWenLMHeadModel
from qwen_model.tokenization_qwen import QWenTokenizer, load_tokenizer
from quantize.quant_linear import QuantLinear
from quantize.quantize_model import QuantizeSettings, quantize_checkpoint

IDS = torch.tensor([[108386, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645]])

# quantize_config.json of Qwen/Qwen-7B-Chat-Int4 and -Int8 as published (huggingface.co, both 214/211 bytes).
OFFICIAL_QUANTIZE_CONFIG = {
    4: {"bits": 4, "group_size": 128, "damp_percent": 0.01, "desc_act": False, "static_groups": False, "sym": True,
        "true_sequential": True, "model_name_or_path": None, "model_file_base_name": "model"},
    8: {"bits": 8, "group_size": 128, "damp_percent": 0.01, "desc_act": False, "static_groups": False, "sym": True,
        "true_sequential": True, "model_name_or_path": None, "model_file_base_name": None},
}
OFFICIAL_SHARDS = {4: 3, 8: 5}  # model-0000x-of-00003 (Int4), -of-00005 (Int8)
# config.json of the Qwen-7B(-Chat) release; the Int4/Int8 ones add quantization_config (quantize_config +
# quant_method). Dimensions shrunk below to a tiny model.
OFFICIAL_CONFIG = {
    "architectures": ["QWenLMHeadModel"],
    "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig", "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
    "attn_dropout_prob": 0.0, "bf16": False, "emb_dropout_prob": 0.0, "fp16": False, "fp32": False,
    "hidden_size": 4096, "intermediate_size": 22016, "initializer_range": 0.02, "kv_channels": 128,
    "layer_norm_epsilon": 1e-06, "max_position_embeddings": 8192, "model_type": "qwen", "no_bias": True,
    "num_attention_heads": 32, "num_hidden_layers": 32, "onnx_safe": None, "rotary_emb_base": 10000,
    "rotary_pct": 1.0, "scale_attn_weights": True, "seq_length": 8192, "tie_word_embeddings": False,
    "tokenizer_class": "QWenTokenizer", "transformers_version": "4.32.0", "use_cache": True,
    "use_dynamic_ntk": True, "use_flash_attn": "auto", "use_logn_attn": True, "vocab_size": 151936,
}
OFFICIAL_TOKENIZER_CONFIG = {"model_max_length": 8192, "tokenizer_class": "QWenTokenizer",
                             "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}}
OFFICIAL_GENERATION_CONFIG = {"chat_format": "chatml", "eos_token_id": 151643, "pad_token_id": 151643,
                              "max_window_size": 6144, "max_new_tokens": 512, "do_sample": True, "top_k": 0,
                              "top_p": 0.8, "repetition_penalty": 1.1, "transformers_version": "4.31.0"}


def write_sharded(directory, tensors: dict, num_shards: int) -> None:
    """Replace the directory's safetensors by `num_shards` files named like the official release, plus the index;
    names are spread over the files in order, so a block's tensors straddle two files."""
    for old in directory.glob("*.safetensors"):
        old.unlink()
    names = sorted(tensors)
    per = -(-len(names) // num_shards)
    weight_map = {}
    for i in range(num_shards):
        file = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[i * per:(i + 1) * per]}
        save_file(part, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def all_tensors(directory) -> dict:
    reader = LazyCheckpoint(directory)
    return reader.read_all(reader.keys())


def edit_config(directory, **changes) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


@pytest.fixture(scope="module")
def gptq_dir(tiny_dir, tmp_path_factory):
    """A 4-bit g32 checkpoint of the tiny model (round-to-nearest: no calibration needed here)."""
    out = tmp_path_factory.mktemp("rtn") / "ckpt"
    return quantize_checkpoint(tiny_dir, out, QuantizeSettings(bits=4, group_size=32, method="rtn"))


@pytest.fixture(scope="module")
def reference_logits(gptq_dir):
    with torch.no_grad():
        return QWenLMHeadModel.from_pretrained(gptq_dir)(IDS).logits


@pytest.fixture
def copy_of(gptq_dir, tmp_path):
    def make(name="copy"):
        out = tmp_path / name
        shutil.copytree(gptq_dir, out)
        return out
    return make


def test_autogptq_dir_with_quantize_config_only_loads_quantized(copy_of, reference_logits):
    from transformers import AutoModelForCausalLM

    d = copy_of()
    edit_config(d, quantization_config=None)
    assert "quantization_config" not in json.loads((d / "config.json").read_text())
    for model in (QWenLMHeadModel.from_pretrained(d), AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True)):
        assert type(model.transformer.h[1].mlp.w2).__name__ == "QuantLinear"
        assert model.config.quantization_config["bits"] == 4
        with torch.no_grad():
            assert torch.equal(model(IDS).logits, reference_logits)


def test_gptq_tensors_without_settings_is_one_clear_error(copy_of):
    from transformers import AutoModelForCausalLM

    d = copy_of()
    edit_config(d, quantization_config=None)
    (d / "quantize_config.json").unlink()
    with pytest.raises(ValueError, match="holds GPTQ tensors .* but no quantization settings"):
        QWenLMHeadModel.from_pretrained(d)
    with pytest.raises(ValueError, match="no quantization settings"):
        AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True)


def test_harmless_extras_are_skipped_and_logged(copy_of, reference_logits, caplog):
    d = copy_of()
    tensors = all_tensors(d)
    tensors["transformer.h.0.mlp.w1.bias"] = torch.zeros(128, dtype=torch.float16)
    tensors["transformer.rotary_emb.inv_freq"] = torch.rand(8)
    write_sharded(d, tensors, 3)
    with caplog.at_level(logging.INFO, logger="quantize.gptq_checkpoint"):
        model = QWenLMHeadModel.from_pretrained(d)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, reference_logits)
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping")]
    assert any("mlp.w1.bias" in m for m in skipped) and any("inv_freq" in m for m in skipped)


@pytest.mark.parametrize("case, message", [
    ("nonzero bias", "unexpected tensors transformer.h.0.mlp.w1.bias"),
    ("unknown tensor", "unexpected tensors transformer.h.1.mlp.gate.weight"),
    ("missing tensor", "missing tensors transformer.h.1.attn.c_proj.scales"),
    ("wrong shape", r"tensor shapes differ: transformer.h.0.mlp.c_proj.g_idx \(128,\) \(expected \(64,\)\)"),
])
def test_bad_tensors_are_named(case, message, copy_of):
    d = copy_of()
    tensors = all_tensors(d)
    if case == "nonzero bias":
        tensors["transformer.h.0.mlp.w1.bias"] = torch.ones(128, dtype=torch.float16)
    elif case == "unknown tensor":
        tensors["transformer.h.1.mlp.gate.weight"] = torch.zeros(4)
    elif case == "missing tensor":
        del tensors["transformer.h.1.attn.c_proj.scales"]
    write_sharded(d, tensors, 2)
    if case == "wrong shape":
        edit_config(d, intermediate_size=128)
    with pytest.raises(ValueError, match=message):
        QWenLMHeadModel.from_pretrained(d)


def test_float_checkpoint_missing_a_tensor_is_an_error(tiny_dir, tmp_path):
    d = tmp_path / "float"
    shutil.copytree(tiny_dir, d)
    tensors = all_tensors(d)
    del tensors["transformer.h.1.mlp.w1.weight"]
    write_sharded(d, tensors, 1)
    with pytest.raises(ValueError, match="lacks tensors transformer.h.1.mlp.w1.weight"):
        QWenLMHeadModel.from_pretrained(d)


@pytest.fixture(scope="module")
def official_shaped_source(tmp_path_factory):
    """A seeded float model whose widths take group size 128 (hidden 128, FFN 256), with the Qwen tokenizer."""
    torch.manual_seed(0)
    config = QWenConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, kv_channels=32,
                        intermediate_size=512, seq_length=64, initializer_range=0.2, fp32=True,
                        use_flash_attn=False)
    out = tmp_path_factory.mktemp("official_src") / "float"
    QWenLMHeadModel(config).save_pretrained(out)
    QWenTokenizer().save_pretrained(out)
    return out


@pytest.mark.parametrize("bits", [4, 8])
def test_official_int4_int8_layout_loads(bits, official_shaped_source, tmp_path):
    ours = quantize_checkpoint(official_shaped_source, tmp_path / "ours",
                               QuantizeSettings(bits=bits, group_size=128, method="rtn"))
    official = tmp_path / f"Qwen-Chat-Int{bits}"
    official.mkdir()
    qcfg = OFFICIAL_QUANTIZE_CONFIG[bits]
    config = {**OFFICIAL_CONFIG, "hidden_size": 128, "intermediate_size": 512, "kv_channels": 32,
              "num_attention_heads": 4, "num_hidden_layers": 2, "seq_length": 64,
              "quantization_config": {**qcfg, "quant_method": "gptq"}}
    (official / "config.json").write_text(json.dumps(config, indent=2))
    (official / "quantize_config.json").write_text(json.dumps(qcfg, indent=2))
    (official / "tokenizer_config.json").write_text(json.dumps(OFFICIAL_TOKENIZER_CONFIG))
    (official / "generation_config.json").write_text(json.dumps(OFFICIAL_GENERATION_CONFIG))
    shutil.copyfile(official_shaped_source / "qwen.tiktoken", official / "qwen.tiktoken")
    tensors = all_tensors(ours)
    tensors["lm_head.weight"] = tensors["lm_head.weight"].half()  # stored in float16, as in the official files
    write_sharded(official, tensors, OFFICIAL_SHARDS[bits])
    assert len(list(official.glob(f"model-0000?-of-0000{OFFICIAL_SHARDS[bits]}.safetensors"))) == OFFICIAL_SHARDS[bits]

    model = QWenLMHeadModel.from_pretrained(official)
    layer = model.transformer.h[1].mlp.c_proj
    assert isinstance(layer, QuantLinear) and (layer.bits, layer.group_size, layer.checkpoint_format) == \
        (bits, 128, "gptq")
    reference = QWenLMHeadModel.from_pretrained(ours)
    got, want = model.state_dict(), reference.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    with torch.no_grad():  # the official config's attention flags (flash "auto") differ from ours: same math
        torch.testing.assert_close(model(IDS).logits, reference(IDS).logits, rtol=0, atol=1e-4)
    tokenizer = load_tokenizer(official)
    response, history = model.chat(tokenizer, "你好", history=None, max_new_tokens=3, do_sample=False)
    assert history == [("你好", response)]
