"""The Qwen model with `use_cache_quantization`: generate, batching, chat, decode accuracy, 4-bit, chunk granularity,
and a GPTQ Int4 checkpoint running over the quantized cache (tiny seeded model, CPU)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from kvcache.quantize_cache import dequantize_cache_torch, quantize_cache_v
from kvcache.quantized_cache import QuantizedKVCache
from qwen_model.modeling_qwen import QWenLMHeadModel

PROMPT = "The quick brown fox jumps over the lazy dog near the river bank"
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.inference_mode():
        yield


def load(path, **flags):
    return QWenLMHeadModel.from_pretrained(path, **flags).eval()


@pytest.fixture(scope="module")
def qmodel(tiny_dir):
    return load(tiny_dir, use_cache_quantization=True)


@pytest.fixture(scope="module")
def prompt_ids(qwen_tokenizer):
    return torch.tensor([qwen_tokenizer.encode(PROMPT)])


def greedy(model, ids, n=12, **kw):
    return model.generate(ids, max_new_tokens=n, do_sample=False, **kw)


def dequantized_layers(cache, bits):
    """[(key, value)] in float, decoded from the cache's stored tensors."""
    return [(dequantize_cache_torch(layer.q_key, layer.key_scale, layer.key_zero, bits=bits),
             dequantize_cache_torch(layer.q_value, layer.value_scale, layer.value_zero, bits=bits))
            for layer in cache.layers]


def float_cache_of(model, ids):
    cache = DynamicCache()
    model(ids, cache=cache)
    return [(layer.keys, layer.values) for layer in cache.layers]


@pytest.mark.parametrize("bits", (8, 4))
def test_generate_fills_a_quantized_cache_with_the_models_keys(tiny_dir, tiny_model, prompt_ids, bits):
    model = load(tiny_dir, use_cache_quantization=True, cache_bits=bits, cache_key_layout="token")
    out = greedy(model, prompt_ids, 8, return_dict_in_generate=True)
    cache = out.past_key_values
    assert isinstance(cache, QuantizedKVCache) and cache.bits == bits and len(cache.layers) == 2
    seq = out.sequences.shape[1] - 1  # the last token is never fed back
    heads, head_dim = tiny_model.config.num_attention_heads, tiny_model.config.kv_channels
    for layer in cache.layers:
        (q_key, key_scale, key_zero), (q_value, value_scale, value_zero) = (
            (layer.q_key, layer.key_scale, layer.key_zero), (layer.q_value, layer.value_scale, layer.value_zero))
        assert q_key.dtype == q_value.dtype == torch.uint8
        assert q_key.shape == q_value.shape == (1, heads, seq, head_dim * bits // 8)
        for t in (key_scale, key_zero, value_scale, value_zero):
            assert t.shape == (1, heads, seq, 1) and t.dtype == torch.float32
    # What is stored is the float model's own K/V: layer 0 (which sees only embeddings) within half a quantization
    # step; later layers also carry the effect of attending over quantized entries, so only approximately.
    reference = float_cache_of(tiny_model, out.sequences[:, :-1])
    (key, value), (ref_key, ref_value) = dequantized_layers(cache, bits)[0], reference[0]
    assert (key - ref_key).abs().le(cache.layers[0].key_scale / 2 + 1e-6).all()
    assert (value - ref_value).abs().le(cache.layers[0].value_scale / 2 + 1e-6).all()
    for (key, value), (ref_key, ref_value) in zip(dequantized_layers(cache, bits)[1:], reference[1:]):
        for got, ref in ((key, ref_key), (value, ref_value)):
            assert (got - ref).norm() <= (0.05 if bits == 8 else 0.3) * ref.norm()


def test_int8_greedy_tokens_match_float_model(tiny_model, qmodel, prompt_ids):
    assert torch.equal(greedy(qmodel, prompt_ids, 16), greedy(tiny_model, prompt_ids, 16))


def test_cached_and_uncached_quantized_generation_agree(qmodel, prompt_ids):
    # Token granularity quantizes every position on its own, so the whole-sequence path equals the cached one.
    assert torch.equal(greedy(qmodel, prompt_ids, 8), greedy(qmodel, prompt_ids, 8, use_cache=False))


def test_batch_left_padding_matches_one_by_one(qmodel, qwen_tokenizer):
    texts = [PROMPT, "你好，世界", "short"]
    batch = qwen_tokenizer(texts, padding=True, return_tensors="pt")
    assert batch["attention_mask"][1:, 0].eq(0).all()  # really left-padded
    out = greedy(qmodel, batch["input_ids"], 12, attention_mask=batch["attention_mask"])
    for i, text in enumerate(texts):
        single = greedy(qmodel, torch.tensor([qwen_tokenizer.encode(text)]), 12)
        assert out[i, -12:].tolist() == single[0, -12:].tolist(), text


@pytest.mark.parametrize("bits,layout", ((8, "token"), (4, "channel_groups")))
def test_first_prefill_is_the_float_models(tiny_dir, tiny_model, bits, layout):
    """With token granularity a first prefill attends only to its own float keys/values: its logits are the float
    model's bit for bit (the same plain attention, here three query chunks, with and without left padding), while
    chunk granularity still attends through the quantized cache."""
    ids = torch.randint(5, 150000, (2, 300), generator=torch.Generator().manual_seed(bits))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    model = load(tiny_dir, use_cache_quantization=True, cache_bits=bits, cache_key_layout=layout)
    chunked = load(tiny_dir, use_cache_quantization=True, cache_granularity="chunk")
    for m in (None, mask):
        want = tiny_model(ids, attention_mask=m, use_cache=True).logits
        assert torch.equal(model(ids, attention_mask=m, use_cache=True).logits, want)
        assert not torch.equal(chunked(ids, attention_mask=m, use_cache=True).logits, want)


def relative_error(got, reference):
    """||got - reference|| / ||reference - mean(reference)||: logit error relative to the logits' spread."""
    return ((got - reference).norm() / (reference - reference.mean()).norm()).item()


@pytest.mark.parametrize("bits,granularity,tol", ((8, "token", 0.03), (4, "token", 0.25), (8, "chunk", 0.04)))
def test_cached_decode_logits_close_to_float_model(tiny_dir, tiny_model, prompt_ids, bits, granularity, tol):
    """Logits of three cached decode steps over the quantized cache vs the float model's full forward.

    The tiny model has random weights (init std 0.2) and sharp attention, so it is harsher than a trained one:
    measured relative errors are 0.012 (int8), 0.10 (4-bit) and 0.016 (chunk int8); the bounds leave ~2.5x room."""
    model = load(tiny_dir, use_cache_quantization=True, cache_bits=bits, cache_granularity=granularity)
    ids = torch.cat([prompt_ids, torch.tensor([[1000, 2000, 3000]])], dim=1)
    cache = QuantizedKVCache(bits=bits, granularity=granularity)
    n = prompt_ids.shape[1]
    model(ids[:, :n], cache=cache)
    for position in range(n, ids.shape[1]):
        logits = model(ids[:, position:position + 1], cache=cache).logits[:, -1]
    assert cache.get_seq_length() == ids.shape[1]
    full = tiny_model(ids).logits[:, -1]
    assert relative_error(logits, full) <= tol
    assert torch.equal(logits.argmax(-1), full.argmax(-1))


class FakeQuantCache(DynamicCache):
    """Float cache holding quantize-then-dequantize K/V: what the quantized model should see, via SDPA.

    As in the model, a prefill chunk (more than one token) attends to its own keys/values in full precision."""

    def __init__(self, bits):
        super().__init__()
        self.bits = bits

    def _round_trip(self, t):
        qmax = 2**self.bits - 1
        return dequantize_cache_torch(*quantize_cache_v(t, self.bits, qmax, 0), bits=self.bits)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = super().update(self._round_trip(key_states), self._round_trip(value_states), layer_idx, *args,
                                      **kwargs)
        n = key_states.shape[-2]
        if n > 1:
            keys = torch.cat([keys[..., :-n, :], key_states], dim=-2)
            values = torch.cat([values[..., :-n, :], value_states], dim=-2)
        return keys, values


@pytest.mark.parametrize("bits", (8, 4))
def test_quantized_model_equals_float_attention_over_round_tripped_kv(tiny_dir, tiny_model, prompt_ids, bits):
    """Prefill and decode over the quantized cache lose nothing beyond the stored values: the float model (SDPA)
    over quantize-dequantize K/V gives the same logits."""
    model = load(tiny_dir, use_cache_quantization=True, cache_bits=bits, cache_key_layout="token")
    cache, reference_cache = QuantizedKVCache(bits=bits, key_layout="token"), FakeQuantCache(bits)
    torch.testing.assert_close(model(prompt_ids, cache=cache).logits,
                               tiny_model(prompt_ids, cache=reference_cache).logits, rtol=1e-4, atol=1e-4)
    for token in (4242, 17, 99999):
        nxt = torch.tensor([[token]])
        torch.testing.assert_close(model(nxt, cache=cache).logits, tiny_model(nxt, cache=reference_cache).logits,
                                   rtol=1e-4, atol=1e-4)


def test_chat_with_history(qmodel, tiny_model, qwen_tokenizer):
    response, history = qmodel.chat(qwen_tokenizer, "你好", history=None, max_new_tokens=8)
    assert isinstance(response, str) and history == [("你好", response)]
    response2, history2 = qmodel.chat(qwen_tokenizer, "再说一次", history=history, max_new_tokens=8)
    assert history2 == [("你好", response), ("再说一次", response2)]
    float_response, _ = tiny_model.chat(qwen_tokenizer, "再说一次", history=history, max_new_tokens=8)
    assert response2[:4] == float_response[:4]  # random tiny weights: later greedy tokens may legitimately diverge
    streamed = list(qmodel.chat_stream(qwen_tokenizer, "再说一次", history=history, max_new_tokens=8))
    assert streamed and streamed[-1] == response2


def test_chunk_granularity_original_arithmetic(tiny_dir, tiny_model, prompt_ids):
    model = load(tiny_dir, use_cache_quantization=True, cache_granularity="chunk")
    out = greedy(model, prompt_ids, 6, return_dict_in_generate=True)
    cache = out.past_key_values
    assert isinstance(cache, QuantizedKVCache) and cache.granularity == "chunk"
    n = prompt_ids.shape[1]
    for layer in cache.layers:
        assert layer.q_key.dtype == torch.uint8 and layer.q_key.shape[-2] == out.sequences.shape[1] - 1
        # One scale per (batch, head) over the whole prefill chunk, then one per decoded token.
        prefill_scale = layer.key_scale[:, :, :n]
        assert torch.equal(prefill_scale, prefill_scale[:, :, :1].expand_as(prefill_scale))
        assert not torch.equal(layer.key_scale[:, :, n], layer.key_scale[:, :, 0])
    step = model(out.sequences[:, -1:], cache=cache).logits[:, -1]
    full = tiny_model(out.sequences).logits[:, -1]
    assert relative_error(step, full) <= 0.1  # measured 0.04 (truncation, and one min/max per decoded token)


def test_bf16_model_keeps_bf16_scales(tiny_dir, prompt_ids):
    model = load(tiny_dir, use_cache_quantization=True, fp32=False, bf16=True)
    out = greedy(model, prompt_ids, 4, return_dict_in_generate=True)
    layer = out.past_key_values.layers[0]
    assert layer.q_key.dtype == torch.uint8 and layer.key_scale.dtype == torch.bfloat16


def test_wrong_cache_type_is_rejected(qmodel, prompt_ids):
    with pytest.raises(ValueError, match="QuantizedKVCache"):
        qmodel(prompt_ids, cache=DynamicCache())


@pytest.fixture(scope="module")
def gptq_dir(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gptq_kv") / "int4"
    subprocess.run([sys.executable, "-m", "quantize.gptq_int4", "--model", str(tiny_dir), "--out", str(out),
                    "--nsamples", "8", "--seqlen", "96", "--group-size", "32"],
                   check=True, cwd=REPO_ROOT, capture_output=True)
    return out


def test_gptq_int4_checkpoint_with_quantized_cache(gptq_dir, qwen_tokenizer, prompt_ids):
    from quantize.quant_linear import QuantLinear

    weights_only = load(gptq_dir)
    model = load(gptq_dir, use_cache_quantization=True)
    assert model.config.use_cache_quantization and not weights_only.config.use_cache_quantization
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 2 * 5
    out = greedy(model, prompt_ids, 10, return_dict_in_generate=True)
    assert isinstance(out.past_key_values, QuantizedKVCache)
    assert out.past_key_values.layers[0].q_key.dtype == torch.uint8
    # Same weights, float cache: the int8 cache changes the decode logits only slightly.
    step = model(out.sequences[:, -1:], cache=out.past_key_values).logits[:, -1]
    full = weights_only(out.sequences).logits[:, -1]
    assert relative_error(step, full) <= 0.04  # measured 0.017
    response, history = model.chat(qwen_tokenizer, "你好", history=[("hi", "hello")], max_new_tokens=6)
    assert isinstance(response, str) and history == [("hi", "hello"), ("你好", response)]


@pytest.mark.parametrize("bits", (8, 4))
def test_half_precision_scales_on_a_float32_model(tiny_dir, tiny_model, prompt_ids, bits):
    """storage_dtype=float16: 2-byte scales/zeros (exact byte count), same accuracy as float32 scales."""
    from kvcache.quantized_cache import cache_nbytes

    model = load(tiny_dir, use_cache_quantization=True, cache_bits=bits, cache_key_layout="token")
    half, full_scales = (QuantizedKVCache(bits=bits, storage_dtype=torch.float16, key_layout="token"),
                         QuantizedKVCache(bits=bits, key_layout="token"))
    ids = torch.cat([prompt_ids, torch.tensor([[1000]])], dim=1)
    model(ids[:, :-1], cache=half)
    model(ids[:, :-1], cache=full_scales)
    half_logits = model(ids[:, -1:], cache=half).logits[:, -1]
    full_scale_logits = model(ids[:, -1:], cache=full_scales).logits[:, -1]
    layer = half.layers[0]
    assert layer.q_key.dtype == torch.uint8 and layer.key_scale.dtype == layer.value_zero.dtype == torch.float16
    heads, head_dim, seq = 4, 16, ids.shape[1]
    assert cache_nbytes(half) == 2 * 2 * heads * seq * (head_dim * bits // 8 + 2 + 2)  # layers x (K, V) x rows
    assert cache_nbytes(full_scales) == 2 * 2 * heads * seq * (head_dim * bits // 8 + 4 + 4)
    # Layer 0 stores the float model's keys within half a step (plus the fp16 rounding of the input).
    ref_key = float_cache_of(tiny_model, ids)[0][0]
    key = dequantize_cache_torch(layer.q_key, layer.key_scale, layer.key_zero, bits=bits).float()
    assert (key - ref_key).abs().le(layer.key_scale.float() / 2 + ref_key.abs() * 2**-11 + 1e-6).all()
    reference = tiny_model(ids).logits[:, -1]
    assert relative_error(half_logits, reference) <= (0.03 if bits == 8 else 0.25)
    # 4-bit: the fp16 zero point moves codes by one level here and there; the sharp random tiny model amplifies that.
    assert relative_error(half_logits, full_scale_logits) <= (0.01 if bits == 8 else 0.15)


def test_bad_storage_dtype_is_rejected():
    with pytest.raises(ValueError, match="storage_dtype"):
        QuantizedKVCache(bits=8, storage_dtype=torch.float32)


def test_gptq_int4_checkpoint_with_4bit_cache(gptq_dir, qwen_tokenizer):
    """The default 4-bit cache (pre-RoPE key groups) on a GPTQ Int4 checkpoint, decoding across a group boundary."""
    weights_only = load(gptq_dir)
    model = load(gptq_dir, use_cache_quantization=True, cache_bits=4)
    ids = torch.randint(100, 20000, (1, 70), generator=torch.Generator().manual_seed(0))
    cache, float_cache = QuantizedKVCache(bits=4), DynamicCache()
    model(ids[:, :60], cache=cache)
    weights_only(ids[:, :60], cache=float_cache)
    errors = [relative_error(model(ids[:, i:i + 1], cache=cache).logits[:, -1],
                             weights_only(ids[:, i:i + 1], cache=float_cache).logits[:, -1]) for i in range(60, 70)]
    assert cache.layers[0].key_layout == "channel_groups" and cache.layers[0].q_key.shape[-2] == 64
    assert sum(errors) / len(errors) <= 0.35  # measured 0.20 (random tiny weights, as the float-keyed tests)
    response, history = model.chat(qwen_tokenizer, "你好", history=[("hi", "hello")], max_new_tokens=6)
    assert isinstance(response, str) and history == [("hi", "hello"), ("你好", response)]
