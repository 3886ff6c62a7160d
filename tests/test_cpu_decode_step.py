"""The fused CPU decode step (qwen_model/cpu_decode_step.cpp): a decoded token through all blocks of a GPTQ model in
one call computes what the blocks one by one compute, to the bit (the same GEMV parts and sums, norm, rotary,
attention units and merge, ATen's silu). Models: seeded tiny Qwen models with head_dim 64 (the kernel takes 64 and
128) whose linears are GPTQ-quantized in-process, and SmolLM2-135M (real weights) cut to 3 blocks, Int4 RTN."""
import copy
import json
import logging
import os

import pytest
import torch
from transformers import DynamicCache

from kvcache.reserved import ReservedCache
from qwen_model import cpu_decode_step, modeling_qwen
from qwen_model.configuration_qwen import QWenConfig
from qwen_model.modeling_qwen import QWenLMHeadModel
from quantize.gptq import accumulate_hessian, gptq_quantize
from quantize.quant_linear import QuantLinear


def quantized_tiny(bits, group_size, sym=True, desc_act=False, heads=2, head_dim=64, layers=2, seed=0, ffn=256,
                   seq_length=2048):
    """A seeded tiny Qwen model (vocab 512, hidden 128, MLP width ffn) with its blocks' linears GPTQ-quantized, on the
    CPU kernels."""
    torch.manual_seed(seed)
    config = QWenConfig(vocab_size=512, hidden_size=128, num_hidden_layers=layers, num_attention_heads=heads,
                        kv_channels=head_dim, intermediate_size=2 * ffn, seq_length=seq_length, initializer_range=0.2,
                        fp32=True, use_flash_attn=False, use_dynamic_ntk=True, use_logn_attn=True)
    model = QWenLMHeadModel(config).eval()
    for block in model.transformer.h:
        for owner, name in ((block.attn, "c_attn"), (block.attn, "c_proj"), (block.mlp, "w1"), (block.mlp, "w2"),
                            (block.mlp, "c_proj")):
            linear = getattr(owner, name)
            H, _ = accumulate_hessian(None, 0, torch.randn(256, linear.in_features))
            res = gptq_quantize(linear.weight.detach(), H, bits, group_size, sym, desc_act=desc_act)
            bias = None if linear.bias is None else linear.bias.detach().half()
            setattr(owner, name, QuantLinear.from_quantized(res.codes, res.scales, res.zeros, res.g_idx, bias, bits,
                                                            group_size, kernel="cpu"))
    return model


def decode(model, ids, steps, fused, monkeypatch, attention_mask=None):
    """Greedy generate() with the fused step on or off: (sequences, logits per step, fused calls that ran)."""
    real, ran = cpu_decode_step.decode_blocks_cpu, []

    def counted(*args):
        out = real(*args)
        ran.append(out is not None)
        return out

    monkeypatch.setattr(modeling_qwen, "decode_blocks_cpu", counted if fused else (lambda *args: None))
    with torch.no_grad():
        out = model.generate(ids, attention_mask=attention_mask, max_new_tokens=steps, min_new_tokens=steps,
                             do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, out.logits, sum(ran)


@pytest.mark.parametrize("bits,group_size,sym", [(4, 64, True), (8, 32, False), (2, 128, True), (4, 48, False)])
@pytest.mark.parametrize("batch,prompt", [(1, 5), (1, 300), (3, 270)])
@pytest.mark.parametrize("kv", ["float", "int8"])
def test_fused_step_equals_the_blocks_one_by_one(bits, group_size, sym, batch, prompt, kv, monkeypatch):
    """Bits 2/4/8, symmetric and asymmetric zeros, a partial last group (48), prompts inside one attention block and
    across two (256 positions each), batch 3 with left padding (an additive mask), the float cache and the int8
    quantized cache: every logit equal."""
    model = quantized_tiny(bits, group_size, sym)
    model.config.use_cache_quantization = kv == "int8"
    ids = torch.randint(1, 512, (batch, prompt), generator=torch.Generator().manual_seed(1))
    mask = None
    if batch > 1:
        mask = torch.ones_like(ids)
        mask[1, :7] = 0  # left padding
        mask[2, :30] = 0
    steps = 6
    fused = decode(model, ids, steps, True, monkeypatch, mask)
    plain = decode(model, ids, steps, False, monkeypatch, mask)
    assert fused[2] == steps - 1  # every decoded token after the prefill took the fused step
    assert torch.equal(fused[0], plain[0])
    assert all(torch.equal(a, b) for a, b in zip(fused[1], plain[1]))


@pytest.mark.parametrize("bits", [4, 8])
def test_other_mlp_widths(bits, monkeypatch):
    """An MLP 224 wide (c_proj's last group partial: 224 = 3 x 64 + 32), batch 2: every logit equal. 200 wide, c_proj's
    packed inputs are padded to 224 rows: the blocks run one by one (the kernel takes inputs as they are)."""
    ids = torch.randint(1, 512, (2, 33), generator=torch.Generator().manual_seed(9))
    model = quantized_tiny(bits, 64, ffn=224)
    fused, plain = decode(model, ids, 4, True, monkeypatch), decode(model, ids, 4, False, monkeypatch)
    assert fused[2] == 3 and torch.equal(fused[0], plain[0])
    assert all(torch.equal(a, b) for a, b in zip(fused[1], plain[1]))
    assert decode(quantized_tiny(bits, 64, ffn=200), ids, 4, True, monkeypatch)[2] == 0


@pytest.mark.parametrize("kv", ["float", "int8"])
def test_beam_search(kv, monkeypatch):
    """Beam search reorders the float and the int8 cache in their reserved buffers, so every decoded step still takes
    the fused call; sequences and scores equal the blocks one by one."""
    model = quantized_tiny(4, 64)
    model.config.use_cache_quantization = kv == "int8"
    ids = torch.randint(1, 512, (2, 20), generator=torch.Generator().manual_seed(10))
    runs = []
    for fused in (True, False):
        real, ran = cpu_decode_step.decode_blocks_cpu, []
        monkeypatch.setattr(modeling_qwen, "decode_blocks_cpu",
                            lambda *a: ran.append(real(*a) if fused else None) or ran[-1])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=6, min_new_tokens=6, num_beams=3, do_sample=False,
                                 pad_token_id=0, output_scores=True, return_dict_in_generate=True)
        runs.append((out, sum(r is not None for r in ran)))
    (fused, fused_calls), (plain, plain_calls) = runs
    assert fused_calls == 5 and plain_calls == 0 and torch.equal(fused.sequences, plain.sequences)
    assert all(torch.equal(a, b) for a, b in zip(fused.scores, plain.scores))


@pytest.mark.parametrize("kv", ["float", "int8"])
def test_past_seq_length_logn_and_ntk(kv, monkeypatch):
    """Past seq_length (64 here) the queries are scaled by logn and the rotary takes the dynamic NTK base: the fused
    step applies both as the blocks do, batch 2 with left padding; every logit equal."""
    model = quantized_tiny(4, 64, seq_length=64)
    model.config.use_cache_quantization = kv == "int8"
    ids = torch.randint(1, 512, (2, 90), generator=torch.Generator().manual_seed(11))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    fused, plain = decode(model, ids, 5, True, monkeypatch, mask), decode(model, ids, 5, False, monkeypatch, mask)
    assert fused[2] == 4 and torch.equal(fused[0], plain[0])
    assert all(torch.equal(a, b) for a, b in zip(fused[1], plain[1]))


def test_threads_do_not_change_the_result(monkeypatch):
    model = quantized_tiny(4, 64)
    ids = torch.randint(1, 512, (2, 40), generator=torch.Generator().manual_seed(2))
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(decode(model, ids, 4, True, monkeypatch) + (decode(model, ids, 4, False, monkeypatch),))
    finally:
        torch.set_num_threads(threads)
    for sequences, logits, ran, plain in results:
        assert ran == 3 and torch.equal(sequences, plain[0])
        assert all(torch.equal(a, b) for a, b in zip(logits, plain[1]))


def _step_inputs(model, ids):
    """A prefilled ReservedCache and the next token's embedding, rotary and mask as QWenModel.forward makes them."""
    cache = ReservedCache(ids.shape[1] + 4, model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    return cache


def test_falls_back_where_it_does_not_apply(monkeypatch):
    """None (the blocks one by one) for: act-order layers (gathered inputs), head_dim 16, the plain DynamicCache, a
    cache with no room left, autograd recording, the 4-bit KV cache (channel_groups keys), and float weights."""
    ids = torch.randint(1, 512, (1, 12), generator=torch.Generator().manual_seed(3))
    for model in (quantized_tiny(4, 64, desc_act=True), quantized_tiny(4, 64, heads=8, head_dim=16),
                  QWenLMHeadModel(QWenConfig(vocab_size=512, hidden_size=128, num_hidden_layers=2,
                                             num_attention_heads=2, kv_channels=64, intermediate_size=512,
                                             fp32=True)).eval()):
        assert decode(model, ids, 3, True, monkeypatch)[2] == 0
    model = quantized_tiny(4, 64)
    assert decode(model, ids, 3, True, monkeypatch)[2] == 2
    calls = []
    real = cpu_decode_step.decode_blocks_cpu
    monkeypatch.setattr(modeling_qwen, "decode_blocks_cpu", lambda *a: calls.append(real(*a)) or calls[-1])
    with torch.no_grad():
        cache = DynamicCache()
        model(ids, past_key_values=cache, use_cache=True)
        model(ids[:, :1], past_key_values=cache, use_cache=True)
        full = ReservedCache(ids.shape[1], model.config)  # room for the prompt only
        model(ids, past_key_values=full, use_cache=True)
        model(ids[:, :1], past_key_values=full, use_cache=True)
        assert full.get_seq_length() == ids.shape[1] + 1  # appended by the blocks, growing the buffer
    roomy = _step_inputs(model, ids)
    model(ids[:, :1], past_key_values=roomy, use_cache=True)  # grad enabled: the ln weights require grad
    assert calls == [None] * 6  # (prefill, decode) x 3: none took the fused step
    model.config.use_cache_quantization, model.config.cache_bits = True, 4
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 3 and calls == [None] * 9  # prefill and 2 decode steps, one by one


@pytest.mark.parametrize("fused", [True, False])
def test_int8_cache_refuses_nan_and_keeps_its_positions(fused, monkeypatch):
    """A token whose key or value holds NaN cannot be quantized: the fused step raises the op-by-op path's error and
    no layer takes the position as filled."""
    from kvcache.quantized_cache import QuantizedKVCache

    model = quantized_tiny(4, 64)
    if not fused:
        monkeypatch.setattr(modeling_qwen, "decode_blocks_cpu", lambda *args: None)
    ids = torch.randint(1, 512, (1, 10), generator=torch.Generator().manual_seed(8))
    cache = QuantizedKVCache(bits=8, config=model.config, capacity=16)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match="NaN or inf"):
            model(inputs_embeds=torch.full((1, 1, 128), float("nan")), past_key_values=cache, use_cache=True)
        assert [layer.get_seq_length() for layer in cache.layers] == [10, 10]
        out = model(ids[:, :1], past_key_values=cache, use_cache=True)
    assert torch.isfinite(out.logits).all() and cache.get_seq_length() == 11


def test_plan_rebuilt_when_the_weights_change(monkeypatch, caplog):
    """The plan holds the layers' prepared tensors; after load_state_dict (new prepared weights) the fused step reads
    the new weights; a deep copy of the model decodes alike. The kernel in use is logged once per model."""
    model, other = quantized_tiny(4, 64, seed=0), quantized_tiny(4, 64, seed=5)
    ids = torch.randint(1, 512, (1, 20), generator=torch.Generator().manual_seed(4))
    with caplog.at_level(logging.INFO, logger="qwen_model.cpu_decode_step"):
        decode(model, ids, 3, True, monkeypatch)
        decode(model, ids, 3, True, monkeypatch)
    assert [r.getMessage() for r in caplog.records] == [
        "decoded tokens run all 2 blocks as one call of the fused CPU decode step"]
    copied = copy.deepcopy(model)  # the plan lives outside the module
    assert torch.equal(decode(copied, ids, 3, True, monkeypatch)[0], decode(model, ids, 3, True, monkeypatch)[0])
    model.load_state_dict(other.state_dict())
    fused = decode(model, ids, 3, True, monkeypatch)
    want = decode(other, ids, 3, False, monkeypatch)
    assert fused[2] == 2 and torch.equal(fused[0], want[0])
    assert all(torch.equal(a, b) for a, b in zip(fused[1], want[1]))


def _plan_blocks(model):
    parts = [cpu_decode_step._block_parts(block) for block in model.transformer.h]
    return [(p[0].detach(), p[1].layer(), p[2].layer(), p[3].detach(), p[4].layer(), p[5].layer(), p[6].layer())
            for p in parts]


def _prepared(model, ids):
    with torch.no_grad():
        model(ids)  # the first forward prepares the CPU weights
    return _plan_blocks(model)


def test_plan_and_step_refuse_bad_input():
    model = quantized_tiny(4, 64)
    blocks = _prepared(model, torch.randint(1, 512, (1, 3)))
    ext = cpu_decode_step.load_step()
    with pytest.raises(RuntimeError, match="a block is"):
        ext.DecodePlan([blocks[0][:6]], 4, 2, 1e-6, 0.125)
    with pytest.raises(RuntimeError, match="head_dim 64 or 128, got 32"):
        ext.DecodePlan(blocks, 4, 4, 1e-6, 0.125)
    with pytest.raises(RuntimeError, match="w1 and w2"):
        ext.DecodePlan([blocks[0][:5] + (blocks[0][6], blocks[0][6])], 4, 2, 1e-6, 0.125)
    plan = ext.DecodePlan(blocks, 4, 2, 1e-6, 0.125)
    keys = [torch.zeros(1, 2, 8, 64) for _ in blocks]
    cos = torch.ones(1, 1, 1, 64)
    with pytest.raises(RuntimeError, match="hidden must be"):
        plan.step(torch.zeros(1, 64), keys, keys, 3, cos, cos)
    with pytest.raises(RuntimeError, match="cache buffers must be"):
        plan.step(torch.zeros(1, 128), keys, keys, 8, cos, cos)  # no room at position 8
    with pytest.raises(RuntimeError, match="one key and one value buffer per block"):
        plan.step(torch.zeros(1, 128), keys[:1], keys, 3, cos, cos)
    with pytest.raises(RuntimeError, match="mask must be"):
        plan.step(torch.zeros(1, 128), keys, keys, 3, cos, cos, torch.zeros(1, 1, 1, 3))
    out = plan.step(torch.zeros(1, 128), keys, [k.clone() for k in keys], 3, cos, cos, torch.zeros(1, 1, 1, 4))
    assert out.shape == (1, 128) and torch.isfinite(out).all()
    codes, scales = torch.zeros(1, 2, 8, 64, dtype=torch.uint8), torch.ones(1, 2, 8, 1)
    layer = [codes, scales, scales.clone(), codes.clone(), scales.clone(), scales.clone()]
    with pytest.raises(RuntimeError, match="an int8 cache layer is"):
        plan.step_int8(torch.zeros(1, 128), [layer[:5]] * 2, 3, cos, cos)
    with pytest.raises(RuntimeError, match="int8 scales and zeros must be"):
        plan.step_int8(torch.zeros(1, 128), [layer[:1] + [scales.half()] + layer[2:]] * 2, 3, cos, cos)
    out, finite = plan.step_int8(torch.zeros(1, 128), [layer, [t.clone() for t in layer]], 3, cos, cos)
    assert finite and out.shape == (1, 128) and torch.isfinite(out).all()


def test_portable_build_agrees(monkeypatch):
    """The build without AVX-512 (what other CPUs run): the same function to float32 rounding."""
    model = quantized_tiny(4, 64)
    ids = torch.randint(1, 512, (2, 30), generator=torch.Generator().manual_seed(6))
    blocks = _prepared(model, ids)
    native, portable = cpu_decode_step.load_step(), cpu_decode_step.load_step(portable=True)
    assert portable is not None
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(2, 128, generator=g)
    keys = [torch.randn(2, 2, 40, 64, generator=g) for _ in blocks]
    values = [torch.randn(2, 2, 40, 64, generator=g) for _ in blocks]
    cos, sin = torch.rand(2, 1, 1, 64, generator=g), torch.rand(2, 1, 1, 64, generator=g)
    outs = []
    for ext in (native, portable):
        k, v = [t.clone() for t in keys], [t.clone() for t in values]
        outs.append((ext.DecodePlan(blocks, 4, 2, 1e-6, 0.125).step(hidden, k, v, 30, cos, sin), k, v))
    (a, ka, va), (b, kb, vb) = outs
    # measured: Frobenius 3e-6 relative, largest difference 4e-6 of the largest output (sums in another order, libm's
    # exp for the AVX-512 one)
    assert (b - a).norm() <= 1e-5 * a.norm() and (b - a).abs().max() <= 2e-5 * a.abs().max()
    for x, y, before in zip(ka + va, kb + vb, keys + values):
        assert (y - x).abs().max() <= 2e-5 * x.abs().max()
        assert torch.equal(y[:, :, :30], before[:, :, :30]) and not torch.equal(y[:, :, 30], before[:, :, 30])


@pytest.fixture(scope="module")
def smollm2_int4(smollm2_dir, tmp_path_factory):
    """SmolLM2-135M (Qwen layout) cut to 3 blocks, Int4 g128 RTN through the CLI."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("smol_step")
    cut = root / "src"
    cut.mkdir()
    for p in smollm2_dir.iterdir():
        if p.name != "config.json":
            os.symlink(p, cut / p.name)
    config = json.loads((smollm2_dir / "config.json").read_text())
    (cut / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    out = root / "int4"
    r = subprocess.run([sys.executable, "-m", "quantize.gptq_int4", "--model", str(cut), "--out", str(out),
                        "--method", "rtn", "-q"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.parametrize("kv", ["float", "int8"])
def test_real_model_same_logits(smollm2_int4, kv, monkeypatch):
    """Real weights and real text (SmolLM2's 576 hidden, 9 heads of 64, 1536-wide MLP, float16 head): a 300-token
    prompt, 6 greedy tokens, every logit equal with the fused step and without, over the float and the int8 cache."""
    from transformers import AutoTokenizer

    model = QWenLMHeadModel.from_pretrained(smollm2_int4, gptq_kernel="cpu",
                                            use_cache_quantization=kv == "int8").eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_int4)
    text = open(os.path.join(os.path.dirname(__file__), "..", "calib_data", "heldout_eval.txt")).read()
    ids = torch.tensor([tokenizer(text)["input_ids"][:300]])
    fused = decode(model, ids, 6, True, monkeypatch)
    plain = decode(model, ids, 6, False, monkeypatch)
    assert fused[2] == 5 and torch.equal(fused[0], plain[0])
    assert all(torch.equal(a, b) for a, b in zip(fused[1], plain[1]))
