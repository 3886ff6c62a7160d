"""QuantizedKVCache in transformers-native models (tiny seeded Qwen2 with GQA and biases, Qwen3 with q/k norms,
Llama) through kvcache.native_attention: generate() with batches and left padding, against the float cache and
against the torch reference attention over the same quantized numbers; the 4-bit channel_groups layout (keys
rotated back before the cache) against the float keys."""
from functools import partial

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from kvcache.native_attention import use_quantized_kv_attention
from kvcache.quantize_cache import GroupedKeys, dequantize_cache_torch
from kvcache.quantized_attention import quantized_attention
from kvcache.quantized_cache import QuantizedKVCache, cache_nbytes
from native_tiny import create_native_tiny

TYPES = ("qwen2", "qwen3", "llama")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("native_kv")
    out = {}
    for t in TYPES:
        model = AutoModelForCausalLM.from_pretrained(create_native_tiny(t, root / t), dtype=torch.float32).eval()
        use_quantized_kv_attention(model)
        out[t] = model
    return out


def _batch():
    """Two prompts, the first left-padded by 3 (pad id 0)."""
    ids = torch.tensor([[0, 0, 0, 1, 40, 77, 12, 200, 9, 31], [1, 5, 90, 91, 17, 250, 3, 4, 66, 80]])
    mask = (torch.arange(10)[None] >= torch.tensor([[3], [0]])).long()
    return ids, mask


class DequantizedCache(DynamicCache):
    """Float cache holding each update's int8 round trip: what the quantized cache's reader sees, in float."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        from kvcache.quantize_cache import quantize_cache_v

        rt = [dequantize_cache_torch(*quantize_cache_v(x, 8, 255, 0), bits=8).to(x.dtype)
              for x in (key_states, value_states)]
        return super().update(*rt, layer_idx)


@pytest.mark.parametrize("model_type", TYPES)
def test_int8_decode_matches_float_attention_over_the_same_numbers(models, model_type):
    """One prefill token at a time (no full-precision chunk), then decoding: logits equal those of SDPA over the
    dequantized int8 keys/values, with GQA folded and left padding masked."""
    model = models[model_type]
    ids, mask = _batch()
    caches = (QuantizedKVCache(bits=8), DequantizedCache())
    outs = [[], []]
    with torch.no_grad():
        for t in range(ids.shape[1]):
            for out, cache in zip(outs, caches):
                out.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache,
                                 use_cache=True).logits)
    got, want = torch.cat(outs[0], 1), torch.cat(outs[1], 1)
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", TYPES)
@pytest.mark.parametrize("bits", [8, 4])
def test_generate_with_left_padding(models, model_type, bits):
    model = models[model_type]
    ids, mask = _batch()
    make = (lambda: QuantizedKVCache(bits=8)) if bits == 8 else (lambda: QuantizedKVCache(bits=4, key_layout="token"))
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        cache = make()
        got = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, cache=cache)
        # the padded row alone, unpadded, gives the same tokens: padding is masked and does not shift positions
        alone = model.generate(ids[:1, 3:], max_new_tokens=8, do_sample=False, cache=make())
    assert got.shape == ref.shape and isinstance(cache, QuantizedKVCache)
    assert torch.equal(got[0, 3:], alone[0])
    if bits == 8:
        assert torch.equal(got, ref)
    else:  # random tiny weights: 4-bit keys move near-tied logits; the first new token per row still agrees
        assert torch.equal(got[:, 10], ref[:, 10])
    # bytes: per layer, key and value, batch 2, KV heads, 17 positions: head_dim * bits / 8 data bytes plus a float32
    # scale and zero point per position (the GQA cache holds num_key_value_heads heads, never repeated)
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    per_position = head_dim * bits // 8 + 8
    assert cache_nbytes(cache) == c.num_hidden_layers * 2 * 2 * c.num_key_value_heads * 17 * per_position


@pytest.mark.parametrize("model_type", TYPES)
def test_prefill_chunk_attends_to_itself_in_full_precision(models, model_type):
    """A one-chunk prefill through the quantized cache gives the float model's logits exactly (up to float noise):
    the chunk's own keys/values are used unrounded."""
    model = models[model_type]
    ids, mask = _batch()
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        got = model(ids, attention_mask=mask, cache=QuantizedKVCache(bits=4, key_layout="token"),
                    use_cache=True).logits
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", TYPES)
def test_channel_groups_keys_are_the_float_keys_before_the_rotary(models, model_type):
    """A 70-token prefill: the cache keeps 64 keys quantized per channel and 6 in its float residual. Rotated with
    the model's inv_freq at their positions, the residual equals the float cache's keys (the un-rotation is exact
    up to float rounding; Qwen3's linear rope scaling included), and the quantized ones are within half a step."""
    from kvcache.quantize_cache import dequantize_key_groups
    from kvcache.quantized_attention import rotated_keys
    from kvcache.rotary import apply_rotary_pos_emb, cos_sin_at

    model = models[model_type]
    ids = torch.randint(3, 250, (2, 70), generator=torch.Generator().manual_seed(1))
    float_cache, cache = DynamicCache(), QuantizedKVCache(bits=4)
    with torch.no_grad():
        model(ids, cache=float_cache, use_cache=True)
        model(ids, cache=cache, use_cache=True)
    inv_freq = model.get_decoder().rotary_emb.inv_freq[None]
    for layer, want_layer in zip(cache.layers, float_cache.layers):
        keys = GroupedKeys(layer.q_key, layer.key_scale, layer.key_zero, layer.key_residual, layer.key_positions)
        assert layer.key_residual.shape[-2] == 6 and torch.equal(layer.key_positions[0], torch.arange(70).int())
        got, want = rotated_keys(keys, inv_freq, torch.float32), want_layer.keys
        torch.testing.assert_close(got[..., 64:, :], want[..., 64:, :], rtol=1e-5, atol=1e-5)
        # the quantized ones: within half a step of their channel's group range, before the rotary
        cos, sin = cos_sin_at(layer.key_positions[:, :64], inv_freq)
        raw_want = apply_rotary_pos_emb(want[..., :64, :], cos, -sin)
        err = (dequantize_key_groups(layer.q_key, layer.key_scale, layer.key_zero) - raw_want).abs()
        assert (err <= layer.key_scale / 2 + 1e-5).all()


@pytest.mark.parametrize("model_type", TYPES)
def test_channel_groups_generate_with_left_padding(models, model_type):
    """generate() with the default 4-bit cache (channel_groups): padding slots get position -1 (left out of the
    group ranges), the prompt's positions stay those of the float model, and the first new token per row matches
    the float cache's (the prefill chunk attends to itself in full precision)."""
    model = models[model_type]
    ids, mask = _batch()
    cache = QuantizedKVCache(bits=4)
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        got = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, cache=cache)
    assert got.shape == ref.shape and torch.equal(got[:, 10], ref[:, 10])
    positions = cache.layers[0].key_positions
    assert positions[0, :3].tolist() == [-1, -1, -1] and positions[0, 3:10].tolist() == list(range(7))
    assert positions[1, :10].tolist() == list(range(10))
    assert cache.layers[0].key_layout == "channel_groups" and cache.layers[0].key_residual.shape[-2] == 17


def test_channel_groups_decode_matches_the_reference_attention(models, monkeypatch):
    """Decoding over a channel_groups cache (128 positions in groups, the rest in the residual): the CPU path
    ("auto": the CPU kernels or blocks) gives the logits of the torch reference that dequantizes and rotates the
    whole layer, on the same cache contents, batch 3."""
    import kvcache.native_attention as native

    model = models["qwen3"]
    ids = torch.randint(3, 250, (3, 140), generator=torch.Generator().manual_seed(2))
    outs = []
    for backend in ("auto", "torch"):
        monkeypatch.setattr(native, "quantized_attention", partial(quantized_attention, backend=backend))
        cache = QuantizedKVCache(bits=4)
        with torch.no_grad():
            model(ids[:, :130], cache=cache, use_cache=True)
            outs.append(torch.cat([model(ids[:, t:t + 1], cache=cache, use_cache=True).logits
                                   for t in range(130, 140)], 1))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_cache_without_our_attention_says_what_to_call(tmp_path, bits):
    """A QuantizedKVCache handed to a native model that still runs SDPA fails with the fix in the message."""
    model = AutoModelForCausalLM.from_pretrained(create_native_tiny("llama", tmp_path / "m"), dtype=torch.float32)
    with pytest.raises(TypeError, match=r"use_quantized_kv_attention\(model\)"), torch.no_grad():
        model.generate(torch.tensor([[1, 5, 7]]), max_new_tokens=2, do_sample=False,
                       cache=QuantizedKVCache(bits=bits))
