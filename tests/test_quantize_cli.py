"""The int4/int8 CLIs end to end on the tiny model (real subprocesses), the checkpoint they write, and bad input."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from qwen_model.modeling_qwen import QWenLMHeadModel
from quantize.quant_linear import QuantLinear

FAST = ["--nsamples", "8", "--seqlen", "96"]
ORIGINAL_INT4_KEYS = {"bits", "group_size", "damp_percent", "desc_act", "static_groups", "sym", "true_sequential",
                      "model_name_or_path", "model_file_base_name"}


def run_cli(bits, *args):
    return subprocess.run([sys.executable, "-m", f"quantize.gptq_int{bits}", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module", params=[4, 8])
def quantized(request, tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"int{request.param}") / "ckpt"
    r = run_cli(request.param, "--model", tiny_dir, "--out", out, "--group-size", 32, *FAST)
    assert r.returncode == 0, r.stderr
    return request.param, out


def test_checkpoint_layout(quantized):
    bits, out = quantized
    qcfg = json.loads((out / "quantize_config.json").read_text())
    assert ORIGINAL_INT4_KEYS <= set(qcfg)
    assert (qcfg["bits"], qcfg["group_size"], qcfg["quant_method"], qcfg["checkpoint_format"]) == \
        (bits, 32, "gptq", "gptq")
    assert qcfg["solver"] == "gptq" and "method" not in qcfg  # GPTQModel reads "method" and refuses "rtn"
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["bits"] == bits
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_qwen.QWenLMHeadModel"
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(out / index["transformer.h.0.attn.c_attn.qweight"]), "pt") as f:
        qweight = f.get_tensor("transformer.h.0.attn.c_attn.qweight")
        assert qweight.dtype == torch.int32 and qweight.shape == (64 * bits // 32, 192)
        assert f.get_tensor("transformer.h.0.attn.c_attn.scales").dtype == torch.float16
        assert f.get_tensor("transformer.h.0.attn.c_attn.g_idx").dtype == torch.int32
        assert f.get_tensor("transformer.h.0.attn.c_attn.bias").shape == (192,)
    for name in ("qwen.tiktoken", "modeling_qwen.py", "tokenization_qwen.py", "generation_config.json"):
        assert (out / name).exists(), name
    assert not list(out.parent.glob(".*tmp*"))


def test_loads_and_is_close_to_float(quantized, tiny_model, qwen_tokenizer):
    bits, out = quantized
    model = QWenLMHeadModel.from_pretrained(out)
    assert isinstance(model.transformer.h[1].mlp.c_proj, QuantLinear)
    ids = torch.tensor([qwen_tokenizer.encode("Quantized models should stay close to the original one.")])
    ref, got = tiny_model(ids).logits, model(ids).logits
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < (0.05 if bits == 8 else 0.5), rel
    response, history = model.chat(qwen_tokenizer, "你好", history=None, max_new_tokens=4)
    assert history == [("你好", response)]


def test_int8_loads_through_auto_class(quantized):
    from transformers import AutoModelForCausalLM

    bits, out = quantized
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "QuantLinear"
    assert model.transformer.h[0].attn.c_attn.bits == bits


def test_refuses_existing_checkpoint_unless_overwrite(quantized, tiny_dir):
    bits, out = quantized
    before = sorted(p.name for p in out.iterdir())
    r = run_cli(bits, "--model", tiny_dir, "--out", out, *FAST)
    assert r.returncode != 0 and "already holds a checkpoint" in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and r.stderr.strip().splitlines()[-1] == errors[0] and "Traceback" not in r.stderr
    assert sorted(p.name for p in out.iterdir()) == before


@pytest.mark.parametrize("case, args, message", [
    ("missing model", ["--model", "/nonexistent/model"], "model directory not found"),
    ("bad bits flag", ["--group-size", "0"], "group_size"),
    ("empty calib", ["--calib", "EMPTY"], "calibration"),
    ("malformed calib", ["--calib", "BROKEN"], "JSON"),
    ("short text", ["--calib", "SHORT", "--seqlen", "4096"], "needs more than seqlen"),
])
def test_bad_input_one_line_no_checkpoint(case, args, message, tiny_dir, tmp_path):
    empty, broken, short = tmp_path / "empty.json", tmp_path / "broken.json", tmp_path / "short.txt"
    empty.write_text("[]")
    broken.write_text('[{"id": 1, "conversations": [')
    short.write_text("only a few words of calibration text")
    args = [{"EMPTY": empty, "BROKEN": broken, "SHORT": short}.get(a, a) for a in args]
    if "--model" not in args:
        args = ["--model", tiny_dir, *args]
    out = tmp_path / "out"
    r = run_cli(4, *args, "--out", out, "--nsamples", "4")
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and message.lower() in last.lower(), r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_nan_weights_rejected(tiny_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "nan_model"
    shutil.copytree(tiny_dir, bad)
    state = load_file(bad / "model.safetensors")
    state["transformer.h.1.mlp.w1.weight"][0, 0] = float("nan")
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    r = run_cli(4, "--model", bad, "--out", tmp_path / "out", *FAST)
    assert r.returncode != 0 and "nan" in r.stderr.lower() and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_help_explains_flags():
    r = run_cli(8, "--help")
    assert r.returncode == 0
    for flag in ("--model", "--out", "--calib", "--nsamples", "--seqlen", "--group-size", "--desc-act",
                 "--static-groups", "--no-sym", "--damp", "--device", "--seed", "--eval", "--overwrite"):
        assert flag in r.stdout


def test_overwrite_replaces_checkpoint(quantized, tiny_dir):
    bits, out = quantized
    stamp = out / "config.json"
    before = stamp.stat().st_mtime_ns
    r = run_cli(bits, "--model", tiny_dir, "--out", out, "--group-size", 32, "--overwrite", *FAST)
    assert r.returncode == 0, r.stderr
    assert stamp.stat().st_mtime_ns != before and f"wrote {bits}-bit GPTQ checkpoint" in r.stdout


def test_disk_full_leaves_no_partial_checkpoint(tiny_dir, tmp_path):
    """A file-size limit makes the big final shard fail mid-write, as a full disk would."""
    import resource
    import signal

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))

    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "quantize.gptq_int4", "--model", str(tiny_dir), "--out", str(out),
                        *FAST], capture_output=True, text=True, timeout=600, preexec_fn=limit_file_size)
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith("error:"), r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_nested_block_inputs_move_to_the_compute_device():
    """Rotary (cos, sin) arrive as a tuple/list: every tensor inside must move with the hidden states."""
    from quantize.quantize_model import _to

    args = (torch.ones(2, dtype=torch.float64), [torch.zeros(1), (torch.ones(1), None)], {"m": torch.ones(3)}, 5)
    moved = _to(args, "meta", torch.float16)
    assert moved[0].device.type == "meta" and moved[0].dtype == torch.float16
    assert moved[1][0].device.type == "meta" and moved[1][1][0].device.type == "meta" and moved[1][1][1] is None
    assert isinstance(moved[1], list) and moved[2]["m"].device.type == "meta" and moved[3] == 5
