"""Files a server reads as they are: 0644 files, float16 dtype in config.json, the ChatML template giving exactly the
ids of make_context, generation stops at <|im_end|> and <|endoftext|>, and the CLI's vLLM warnings."""
import json
import stat
import subprocess
import sys

import pytest

from qwen_model.qwen_generation_utils import DEFAULT_SYSTEM, make_context
from quantize.quantize_model import QuantizeSettings, quantize_checkpoint


@pytest.fixture(scope="module")
def gptq_dir(tiny_dir, tmp_path_factory):
    return quantize_checkpoint(tiny_dir, tmp_path_factory.mktemp("serve") / "ckpt",
                               QuantizeSettings(bits=8, group_size=32, method="rtn"))


def test_every_file_is_world_readable(gptq_dir, tiny_dir):
    for directory in (gptq_dir, tiny_dir):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o755
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in directory.iterdir()}
        assert any(name.endswith(".safetensors") for name in modes)
        assert set(modes.values()) == {0o644}, modes


def test_config_dtype_is_float16(gptq_dir, tiny_dir):
    assert json.loads((tiny_dir / "config.json").read_text())["dtype"] == "float32"
    config = json.loads((gptq_dir / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "float16"


def test_generation_config_stops_at_im_end_and_endoftext(gptq_dir, qwen_tokenizer):
    gen = json.loads((gptq_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [qwen_tokenizer.im_end_id, qwen_tokenizer.eod_id] == [151645, 151643]


@pytest.mark.parametrize("system", [None, "You are a pirate."])
def test_chat_template_gives_the_ids_of_make_context(gptq_dir, system):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gptq_dir, trust_remote_code=True)
    assert "<|im_start|>" in tokenizer.chat_template
    history = [("What is the capital of France?", "Paris."), ("你好", "你好！有什么可以帮你的吗？")]
    query = "Tell me a joke about GPUs, please."
    messages = [{"role": "system", "content": system}] if system else []
    for q, a in history:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": query})
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    raw, context = make_context(tokenizer, query, history=history, system=system or DEFAULT_SYSTEM)
    assert ids["input_ids"] == context
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == raw


def test_cli_warns_for_settings_vllm_cannot_run(tiny_dir, tmp_path):
    r = subprocess.run([sys.executable, "-m", "quantize.gptq_int4", "--model", str(tiny_dir), "--out",
                        str(tmp_path / "ckpt"), "--group-size", "40", "--no-sym", "--method", "rtn", "-q"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert any("group size 40: vLLM's gptq_marlin runs only group sizes -1/32/64/128" in w for w in warnings)
    assert any("does not divide the input widths [64, 128]" in w for w in warnings)
    assert any("gptq_v2" in w for w in warnings)
    assert "vLLM tensor-parallel 1: no GPTQ kernel" in r.stdout
