"""QuantizedKVCache in transformers-native models (tiny seeded Qwen2 with GQA and biases, Qwen3 with q/k norms,
Llama) through kvcache.native_attention: generate() with batches and left padding, against the float cache and
against the torch reference attention over the same quantized numbers; the channel_groups layout is refused."""
import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from kvcache.native_attention import use_quantized_kv_attention
from kvcache.quantize_cache import dequantize_cache_torch
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


def test_channel_groups_layout_is_refused(models):
    ids, _ = _batch()
    with pytest.raises(ValueError, match="key_layout='token'"), torch.no_grad():
        models["llama"].generate(ids[1:], max_new_tokens=2, do_sample=False, cache=QuantizedKVCache(bits=4))
