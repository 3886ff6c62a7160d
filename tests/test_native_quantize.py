"""GPTQ of transformers-native checkpoints (Qwen2 with GQA, q/k/v biases and tied embeddings; Qwen3 with q/k norms
and linear rope scaling; Llama with GQA): the CLI end to end (real subprocess), the checkpoint's layout (the
family's own names, no remote code), loading in this package, the staged calibration pass against re-running the
transformers decoder layer, and bad input."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from native_tiny import create_native_tiny
from qwen_model.checkpoint import LazyCheckpoint
from quantize.gptq import accumulate_hessian
from quantize.model_families import get_family
from quantize.native_checkpoint import load_native_quantized
from quantize.quant_linear import QuantLinear
from quantize.quantize_model import _batches, _load_block, calibrate_block, capture_block_inputs
from quantize.quantizer import rtn_quantize

FAST = ["--nsamples", "8", "--seqlen", "96", "--group-size", "32"]
TYPES = ("qwen2", "qwen3", "llama")


def run_cli(bits, *args):
    return subprocess.run([sys.executable, "-m", f"quantize.gptq_int{bits}", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def native_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("native")
    return {t: create_native_tiny(t, root / t) for t in TYPES}


@pytest.fixture(scope="module")
def quantized(native_dirs, tmp_path_factory):
    """{(model_type, bits): checkpoint dir} written by the CLI subprocess."""
    root = tmp_path_factory.mktemp("native_q")
    out = {}
    for t in TYPES:
        for bits in (4, 8):
            out[t, bits] = root / f"{t}-int{bits}"
            r = run_cli(bits, "--model", native_dirs[t], "--out", out[t, bits], *FAST)
            assert r.returncode == 0, r.stderr
    return out


@pytest.mark.parametrize("model_type", TYPES)
def test_layout_is_the_familys_own(quantized, native_dirs, model_type):
    out = quantized[model_type, 4]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == model_type and "auto_map" not in config
    assert config["quantization_config"]["quant_method"] == "gptq" and config["quantization_config"]["bits"] == 4
    assert not list(out.glob("*.py"))
    keys = set(LazyCheckpoint(out).keys())
    src = set(LazyCheckpoint(native_dirs[model_type]).keys())
    family = get_family(model_type)
    for name in family.linears:
        for part in ("qweight", "qzeros", "scales", "g_idx"):
            assert f"model.layers.1.{name}.{part}" in keys
        assert f"model.layers.1.{name}.weight" not in keys
    float_keys = {k for k in src if not any(f".{n}." in k for n in family.linears)}
    assert float_keys <= keys  # norms (q/k norms of Qwen3), embedding, lm_head when untied
    assert ("lm_head.weight" in keys) == (not config["tie_word_embeddings"])
    biases = {k for k in keys if k.endswith("_proj.bias")}
    assert bool(biases) == (model_type == "qwen2")
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.0.self_attn.k_proj.qweight"
    kv_width = config["num_key_value_heads"] * config.get("head_dim", 16)  # GQA: 2 KV heads for 4 query heads
    with safe_open(str(out / index[name]), "pt") as f:
        assert f.get_tensor(name).shape == (64 * 4 // 32, kv_width)


@pytest.mark.parametrize("model_type", TYPES)
@pytest.mark.parametrize("bits", [4, 8])
def test_loads_in_ours_close_to_float(quantized, native_dirs, model_type, bits):
    # The dequantizing reference kernel: this checks the wiring exactly (the CPU int4pack kernel, which computes in
    # bfloat16, is compared with it in tests/test_int4pack_cpu.py).
    model = load_native_quantized(quantized[model_type, bits], kernel="torch")
    assert type(model).__name__ == get_family(model_type).model_class.__name__
    assert isinstance(model.model.layers[1].self_attn.k_proj, QuantLinear)
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    ref = AutoModelForCausalLM.from_pretrained(native_dirs[model_type], dtype=torch.float32).eval()
    ids = torch.randint(3, 259, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = ref(ids).logits, model(ids).logits
    rel = float((got - want).norm() / want.norm())
    # random weights (init std 0.2) at group size 32: measured int8 <= 0.011, int4 <= 0.48
    # random weights (init std 0.2) at group size 32: measured int8 0.025-0.037, int4 0.39-0.51
    assert rel < (0.06 if bits == 8 else 0.7), rel
    # exact wiring: transformers' float model holding the dequantized weights computes the same logits
    with torch.no_grad():
        for name, layer in model.named_modules():
            if isinstance(layer, QuantLinear):
                linear = ref.get_submodule(name)
                linear.weight.copy_(layer.dequantize_weight(torch.float32))
                if layer.bias is not None:
                    linear.bias.copy_(layer.bias.float())
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


def _rtn(linear):
    linear.weight.data = rtn_quantize(linear.weight.data.float(), 4, 16, True).weight


@pytest.mark.parametrize("model_type", TYPES)
def test_staged_pass_matches_the_transformers_layer(native_dirs, model_type):
    """calibrate_block with the family's description gives the Hessians and outputs of re-running transformers'
    decoder layer with hooks (true-sequential, each group RTN-quantized before the next one's inputs)."""
    family = get_family(model_type)
    config = family.calibration_config(family.load_config(native_dirs[model_type]))
    reader = LazyCheckpoint(native_dirs[model_type])
    g = torch.Generator().manual_seed(0)
    samples = [torch.randint(3, 259, (1, 20), generator=g) for _ in range(5)]
    inputs = capture_block_inputs(config, reader, _batches(samples, 2), "cpu", torch.float32)

    ref_block = _load_block(config, reader, 1, "cpu", torch.float32)
    ref = {}
    for names in family.groups:
        acc = {}
        handles = [ref_block.get_submodule(n).register_forward_pre_hook(
            lambda m, inp, n=n: acc.__setitem__(n, accumulate_hessian(*acc.get(n, (None, 0)), inp[0])))
            for n in names]
        with torch.no_grad():
            for args, kwargs in inputs:
                ref_block(*args, **kwargs)
        for h in handles:
            h.remove()
        ref.update({n: acc[n][0] for n in names})
        for n in names:
            _rtn(ref_block.get_submodule(n))
    with torch.no_grad():
        ref_out = [ref_block(*a, **k) for a, k in inputs]

    block = _load_block(config, reader, 1, "cpu", torch.float32)
    seen, order = {}, []

    def quantize(names, hessians):
        order.append(tuple(names))
        seen.update(hessians)
        for n in names:
            _rtn(block.get_submodule(n))

    calibrate_block(block, inputs, quantize, True, "cpu", torch.float32, family=family)
    assert order == list(family.groups)
    for n, H in ref.items():
        torch.testing.assert_close(seen[n], H, rtol=1e-5, atol=1e-6, msg=n)
    for (args, _), want in zip(inputs, ref_out):
        torch.testing.assert_close(args[0], want, rtol=1e-5, atol=1e-6)


def test_unsupported_model_type_is_one_clear_error(native_dirs, tmp_path):
    src = tmp_path / "gpt2"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    r = run_cli(4, "--model", src, "--out", tmp_path / "out", *FAST)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == ("error: unsupported model_type 'gpt2' in " + str(src) +
                                                 "; supported: qwen, qwen2, qwen3, llama")
    assert not (tmp_path / "out").exists()


def test_ffn_padding_is_refused_for_native(native_dirs, tmp_path):
    r = run_cli(4, "--model", native_dirs["llama"], "--out", tmp_path / "out", "--ffn-multiple", "256", *FAST)
    assert r.returncode == 1 and "Qwen v1 checkpoints only" in r.stderr
    assert not (tmp_path / "out").exists()


def test_evaluate_cli_reads_native_checkpoints(quantized, native_dirs):
    import calib_data
    from pathlib import Path

    text = Path(calib_data.__file__).with_name("heldout_eval.txt")
    scores = []
    for model in (native_dirs["qwen3"], quantized["qwen3", 8]):
        r = subprocess.run([sys.executable, "-m", "quantize.evaluate", "--model", str(model), "--data", str(text),
                            "--ctx", "64", "--windows", "2"], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        scores.append(float(r.stdout.split("perplexity: ")[1].split()[0]))
    assert abs(scores[1] / scores[0] - 1) < 0.05  # int8 of the float model
