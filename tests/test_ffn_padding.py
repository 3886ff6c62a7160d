"""FFN padding for vLLM tensor parallelism is exact: padded and unpadded checkpoints give the same logits, the added
rows/columns dequantize to zero, the padded checkpoint loads through our loader, and the CLI option writes it."""
import json
import subprocess
import sys

import pytest
import torch

from qwen_model.modeling_qwen import QWenLMHeadModel
from quantize.ffn_padding import pad_checkpoint, padded_width
from quantize.quantize_model import QuantizeSettings, quantize_checkpoint

IDS = torch.tensor([[108386, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645],
                    [151644, 872, 198, 108386, 151645, 198, 151644, 77091, 198, 64]])


def test_padded_width():
    assert padded_width(11008, 1024, 128) == 11264 and padded_width(13696, 1024, 128) == 14336
    assert padded_width(11264, 1024, 128) == 11264 and padded_width(100, 64, -1) == 128
    with pytest.raises(ValueError, match="whole groups of 40"):
        padded_width(128, 96, 40)
    with pytest.raises(ValueError, match="positive integer"):
        padded_width(128, 0, 32)


@pytest.mark.parametrize("bits, group_size, sym, multiple", [
    (4, 32, True, 192), (8, 64, False, 192), (4, -1, False, 200), (8, 32, True, 160)])
def test_padding_is_exact(bits, group_size, sym, multiple, tiny_dir, tmp_path):
    src = quantize_checkpoint(tiny_dir, tmp_path / "plain", QuantizeSettings(bits=bits, group_size=group_size,
                                                                              sym=sym, method="rtn"))
    out = pad_checkpoint(src, tmp_path / "padded", multiple)
    config = json.loads((out / "config.json").read_text())
    assert config["intermediate_size"] == 2 * multiple and config["quantization_config"]["ffn_padded_from"] == 128
    assert config["dtype"] == "float16"
    plain, padded = QWenLMHeadModel.from_pretrained(src), QWenLMHeadModel.from_pretrained(out)
    for a, b in zip(plain.transformer.h, padded.transformer.h):
        for name in ("w1", "w2"):
            wa, wb = getattr(a.mlp, name).dequantize_weight(), getattr(b.mlp, name).dequantize_weight()
            assert wb.shape == (multiple, 64) and torch.equal(wb[:128], wa) and not wb[128:].any()
        wa, wb = a.mlp.c_proj.dequantize_weight(), b.mlp.c_proj.dequantize_weight()
        assert wb.shape == (64, multiple) and torch.equal(wb[:, :128], wa) and not wb[:, 128:].any()
    with torch.no_grad():
        ref, got = plain(IDS).logits, padded(IDS).logits
    # the padding adds exact zeros, but a longer dot product may be summed in another order (the CPU kernel splits a
    # layer's words between threads by their count), so equal to float32 rounding
    assert (got - ref).norm() <= 1e-5 * ref.norm()
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_cli_pads_and_reports_vllm_support(tiny_dir, tmp_path):
    out = tmp_path / "ckpt"
    r = subprocess.run([sys.executable, "-m", "quantize.gptq_int4", "--model", str(tiny_dir), "--out", str(out),
                        "--group-size", "32", "--nsamples", "4", "--seqlen", "64", "--ffn-multiple", "96", "-q"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 2 * 192
    model = QWenLMHeadModel.from_pretrained(out)
    assert model.transformer.h[0].mlp.c_proj.in_features == 192
    lines = [line for line in r.stdout.splitlines() if line.startswith("vLLM tensor-parallel")]
    # the tiny model's 64-wide layers are below Marlin's 128-column tiles; gptq runs up to the 4 heads' limits
    assert lines[0] == "vLLM tensor-parallel 1: gptq" and len(lines) == 4
    assert lines[3].startswith("vLLM tensor-parallel 8: no GPTQ kernel (gptq_marlin: 4 attention heads")


def test_cli_refuses_padding_in_partial_groups(tiny_dir, tmp_path):
    out = tmp_path / "ckpt"
    r = subprocess.run([sys.executable, "-m", "quantize.gptq_int4", "--model", str(tiny_dir), "--out", str(out),
                        "--group-size", "40", "--method", "rtn", "--ffn-multiple", "96"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith("error: cannot pad the FFN width")
    assert not out.exists()


def test_pad_ffn_cli_pads_an_existing_checkpoint(tiny_dir, tmp_path):
    src = quantize_checkpoint(tiny_dir, tmp_path / "plain", QuantizeSettings(bits=4, group_size=32, method="rtn"))
    out = tmp_path / "padded"
    r = subprocess.run([sys.executable, "-m", "quantize.pad_ffn", str(src), "--out", str(out), "--ffn-multiple", "256",
                        "-q"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "vLLM tensor-parallel 1: gptq" in r.stdout
    assert QWenLMHeadModel.from_pretrained(out).transformer.h[1].mlp.w1.out_features == 256
    for bad, message in ((tiny_dir, "is not a GPTQ checkpoint"), (tmp_path / "nope", "directory not found")):
        r = subprocess.run([sys.executable, "-m", "quantize.pad_ffn", str(bad), "--out", str(tmp_path / "x")],
                           capture_output=True, text=True, timeout=600)
        last = r.stderr.strip().splitlines()[-1]
        assert r.returncode == 1 and last.startswith("error:") and message in last, r.stderr
    assert not (tmp_path / "x").exists()
