"""The Qwen model over the default 4-bit cache (pre-RoPE keys in per-channel groups of 64 positions, float residual):
what it stores, exactness while keys are in the residual (NTK factor and logn included), decode across group
boundaries, left-padded batches, chat (tiny seeded model, CPU)."""
import pytest
import torch
from transformers import DynamicCache

from kvcache.quantize_cache import GroupedKeys, dequantize_cache_torch, dequantize_key_groups, quantize_cache_v
from kvcache.quantized_cache import QuantizedKVCache
from qwen_model.modeling_qwen import QWenLMHeadModel


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.inference_mode():
        yield


def load(path, **flags):
    return QWenLMHeadModel.from_pretrained(path, **flags).eval()


@pytest.fixture(scope="module")
def model4(tiny_dir):
    return load(tiny_dir, use_cache_quantization=True, cache_bits=4)


def random_ids(n, seed, low=100, high=20000):
    return torch.randint(low, high, (1, n), generator=torch.Generator().manual_seed(seed))


def relative_error(got, reference):
    return ((got - reference).norm() / (reference - reference.mean()).norm()).item()


def test_layer0_keys_are_stored_before_the_rotary(model4, tiny_model):
    ids = random_ids(100, 0)
    cache = QuantizedKVCache(bits=4)
    model4(ids, cache=cache)
    layer = cache.layers[0]
    assert layer.key_layout == "channel_groups" and model4.config.cache_key_layout is None
    attn = tiny_model.transformer.h[0].attn
    hidden = tiny_model.transformer.h[0].ln_1(tiny_model.transformer.wte(ids))
    raw_key = attn.c_attn(hidden).split(attn.projection_size, dim=2)[1].view(1, 100, 4, 16).transpose(1, 2)
    assert layer.q_key.shape == (1, 4, 64, 8) and layer.key_scale.shape == (1, 4, 1, 16)
    deq = dequantize_key_groups(layer.q_key, layer.key_scale, layer.key_zero)
    assert ((deq - raw_key[:, :, :64]).abs() <= layer.key_scale / 2 + 1e-5).all()
    torch.testing.assert_close(layer.key_residual, raw_key[:, :, 64:], rtol=1e-6, atol=1e-6)
    assert torch.equal(layer.key_positions, torch.arange(100, dtype=torch.int32)[None])


class ValuesOnlyCache(DynamicCache):
    """Float keys, 4-bit per-token values (the own chunk in float): what the 4-bit model sees while every key is
    still in the float residual."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        rounded = dequantize_cache_torch(*quantize_cache_v(value_states, 4, 15, 0), bits=4)
        keys, values = super().update(key_states, rounded, layer_idx)
        n = value_states.shape[-2]
        if n > 1:
            values = torch.cat([values[..., :-n, :], value_states], dim=-2)
        return keys, values


def test_exact_while_keys_are_in_the_residual_with_ntk_and_logn(tiny_dir):
    """seq_length 16: a 40-token prompt gets NTK factor 7 and logn scaling; the residual keys are rotated at read time
    with the positions and factor the model used, so the logits equal the float model's over the same values."""
    model = load(tiny_dir, use_cache_quantization=True, cache_bits=4, seq_length=16)
    float_model = load(tiny_dir, seq_length=16)
    ids = random_ids(40, 1)
    cache, reference = QuantizedKVCache(bits=4), ValuesOnlyCache()
    torch.testing.assert_close(model(ids, cache=cache).logits, float_model(ids, cache=reference).logits,
                               rtol=1e-4, atol=1e-4)  # float32 rounding of the blocked attention's sums
    assert cache.qwen_ntk_alphas == [7]
    for token in (4242, 17, 99999):
        nxt = torch.tensor([[token]])
        torch.testing.assert_close(model(nxt, cache=cache).logits, float_model(nxt, cache=reference).logits,
                                   rtol=1e-4, atol=1e-4)


def test_decode_across_group_boundaries_close_to_float(model4, tiny_model):
    """Prefill 100 (one group + residual), then 40 decode steps across the 128 boundary; logits vs the float model
    decoding the same way (a float cache: the NTK factor is fixed at prefill in both). The tiny random model is harsh
    (sharp attention): measured mean 0.22 and max 0.48 over the 40 steps, the same as the token layout (0.22 / 0.46)
    on this model, whose random keys have no channel structure."""
    ids = random_ids(140, 2)
    cache, float_cache = QuantizedKVCache(bits=4), DynamicCache()
    model4(ids[:, :100], cache=cache)
    tiny_model(ids[:, :100], cache=float_cache)
    errors = []
    for position in range(100, 140):
        logits = model4(ids[:, position:position + 1], cache=cache).logits[:, -1]
        reference = tiny_model(ids[:, position:position + 1], cache=float_cache).logits[:, -1]
        errors.append(relative_error(logits, reference))
    layer = cache.layers[0]
    assert layer.q_key.shape[-2] == 128 and layer.key_residual.shape[-2] == 12 and cache.get_seq_length() == 140
    assert sum(errors) / len(errors) <= 0.3 and max(errors) <= 0.7, errors


def test_left_padded_batch_equals_single_runs(model4):
    """Greedy tokens of a left-padded batch equal single runs. Padding of exactly one group (64) keeps every sample's
    groups aligned with its single run, so the quantized keys are the same; the padded group is left out of the
    ranges. An unaligned padding (30) quantizes other groups, so only the logits' closeness is checked."""
    long, short = random_ids(120, 3), random_ids(56, 4)
    batch = torch.cat([long, torch.cat([torch.zeros(1, 64, dtype=torch.long), short], dim=1)])
    mask = torch.cat([torch.ones(1, 120), torch.cat([torch.zeros(1, 64), torch.ones(1, 56)], dim=1)]).long()
    out = model4.generate(batch, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    for i, ids in enumerate((long, short)):
        single = model4.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0)
        assert out[i, -16:].tolist() == single[0, -16:].tolist()

    mid = random_ids(90, 5)
    batch = torch.cat([long, torch.cat([torch.zeros(1, 30, dtype=torch.long), mid], dim=1)])
    mask = torch.cat([torch.ones(1, 120), torch.cat([torch.zeros(1, 30), torch.ones(1, 90)], dim=1)]).long()
    out = model4.generate(batch, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                          output_logits=True, return_dict_in_generate=True)
    single = model4.generate(mid, max_new_tokens=12, do_sample=False, pad_token_id=0, output_logits=True,
                             return_dict_in_generate=True)
    assert out.sequences[1, -12].item() == single.sequences[0, -12].item()  # from the prefill (float keys)
    errors = [relative_error(out.logits[step][1], single.logits[step][0]) for step in range(2)]
    assert errors[0] <= 1e-5 and errors[1] <= 0.3  # measured 1e-7 and 0.16


def test_chat_with_history(model4, tiny_model, qwen_tokenizer):
    history = [("你好", "你好！有什么可以帮你的吗？"), ("讲个故事", "从前有座山，山里有座庙，庙里有个老和尚在讲故事。")]
    response, new_history = model4.chat(qwen_tokenizer, "再讲一个", history=history, max_new_tokens=12)
    assert new_history == history + [("再讲一个", response)] and isinstance(response, str)
    out = model4.generate(torch.tensor([qwen_tokenizer.encode("hello " * 70)]), max_new_tokens=2,
                          return_dict_in_generate=True)
    assert out.past_key_values.layers[0].q_key.shape[-2] == 64  # long enough to quantize a group
    float_response, _ = tiny_model.chat(qwen_tokenizer, "再讲一个", history=history, max_new_tokens=12)
    assert response[:2] == float_response[:2]
    assert list(model4.chat_stream(qwen_tokenizer, "再讲一个", history=history, max_new_tokens=12))[-1] == response


def test_layout_switches(tiny_dir):
    from qwen_model.configuration_qwen import QWenConfig

    with pytest.raises(ValueError, match="cache_key_layout"):
        QWenConfig(use_cache_quantization=True, cache_bits=8, cache_key_layout="channel_groups")
    with pytest.raises(ValueError, match="cache_key_layout"):
        QWenConfig(cache_key_layout="channel")
    model = load(tiny_dir, use_cache_quantization=True, cache_bits=4, cache_key_layout="token")
    out = model.generate(random_ids(10, 6), max_new_tokens=2, return_dict_in_generate=True, pad_token_id=0)
    assert out.past_key_values.key_layout == "token" and not isinstance(
        out.past_key_values.layers[0].update(torch.zeros(1, 4, 1, 16), torch.zeros(1, 4, 1, 16))[0], GroupedKeys)
