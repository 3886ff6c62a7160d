"""The Qwen model on the tiny seeded checkpoint: loading, caching, batching, long context, chat, bad input."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from qwen_model.configuration_qwen import QWenConfig
from qwen_model.modeling_qwen import QWenLMHeadModel, RMSNorm, ntk_alpha

PROMPT = "The quick brown fox jumps over the lazy dog near the river bank"


def original_layout_keys(n_layers):
    """Parameter names of the original Qwen-7B-Chat checkpoints, written out independently of our model."""
    keys = {"transformer.wte.weight", "transformer.ln_f.weight", "lm_head.weight"}
    for i in range(n_layers):
        p = f"transformer.h.{i}."
        keys |= {p + "ln_1.weight", p + "ln_2.weight", p + "attn.c_attn.weight", p + "attn.c_attn.bias",
                 p + "attn.c_proj.weight", p + "mlp.w1.weight", p + "mlp.w2.weight", p + "mlp.c_proj.weight"}
    return keys


def greedy(model, ids, n=12, **kw):
    return model.generate(ids, max_new_tokens=n, do_sample=False, **kw)


def test_checkpoint_has_original_layout_and_loads_strictly(tiny_dir):
    state = load_file(tiny_dir / "model.safetensors")
    assert set(state) == original_layout_keys(2)
    config = QWenConfig.from_pretrained(tiny_dir)
    model = QWenLMHeadModel(config)
    model.load_state_dict(state, strict=True)
    _, info = QWenLMHeadModel.from_pretrained(tiny_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_original_config_json_loads_unchanged(tmp_path):
    original = {
        "architectures": ["QWenLMHeadModel"], "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig",
                                                          "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
        "attn_dropout_prob": 0.0, "bf16": False, "emb_dropout_prob": 0.0, "fp16": False, "fp32": False,
        "hidden_size": 4096, "intermediate_size": 22016, "initializer_range": 0.02, "kv_channels": 128,
        "layer_norm_epsilon": 1e-06, "max_position_embeddings": 32768, "model_type": "qwen", "no_bias": True,
        "num_attention_heads": 32, "num_hidden_layers": 32, "onnx_safe": None, "rotary_emb_base": 10000,
        "rotary_pct": 1.0, "scale_attn_weights": True, "seq_length": 8192, "tie_word_embeddings": False,
        "tokenizer_class": "QWenTokenizer", "transformers_version": "4.32.0", "use_cache": True,
        "use_dynamic_ntk": True, "use_flash_attn": "auto", "use_logn_attn": True, "vocab_size": 151936,
        "use_cache_quantization": False, "use_cache_kernel": False, "softmax_in_fp32": False,
    }
    (tmp_path / "config.json").write_text(json.dumps(original))
    config = QWenConfig.from_pretrained(tmp_path)
    for key, value in original.items():
        if key not in ("auto_map", "transformers_version", "architectures", "tokenizer_class"):
            assert getattr(config, key) == value, key


def test_save_load_round_trip(tiny_model, tmp_path):
    ids = torch.tensor([[1, 2, 3, 400, 5000]])
    tiny_model.save_pretrained(tmp_path)
    again = QWenLMHeadModel.from_pretrained(tmp_path).eval()
    assert torch.equal(again(ids).logits, tiny_model(ids).logits)


def test_cached_and_uncached_generation_agree(tiny_model, qwen_tokenizer):
    ids = torch.tensor([qwen_tokenizer.encode(PROMPT)])
    cached = greedy(tiny_model, ids, 16)
    uncached = greedy(tiny_model, ids, 16, use_cache=False)
    assert torch.equal(cached, uncached)
    # Logits of a cached decode step equal those of the full forward.
    cache = DynamicCache()
    tiny_model(ids, cache=cache)
    step = tiny_model(cached[:, ids.shape[1]:ids.shape[1] + 1], cache=cache).logits[:, -1]
    full = tiny_model(cached[:, :ids.shape[1] + 1]).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)


def test_past_key_values_alias_uses_the_cache(tiny_model):
    ids = torch.tensor([[11, 12, 13, 14]])
    cache = DynamicCache()
    out = tiny_model(ids, past_key_values=cache, use_cache=True)
    assert out.cache is cache and cache.get_seq_length() == 4
    nxt = tiny_model(torch.tensor([[15]]), past_key_values=cache).logits[:, -1]
    torch.testing.assert_close(nxt, tiny_model(torch.tensor([[11, 12, 13, 14, 15]])).logits[:, -1],
                               rtol=1e-4, atol=1e-4)


def test_batch_left_padding_matches_single(tiny_model, qwen_tokenizer):
    texts = [PROMPT, "你好，世界", "short"]
    batch = qwen_tokenizer(texts, padding=True, return_tensors="pt")
    out = greedy(tiny_model, batch["input_ids"], 12, attention_mask=batch["attention_mask"])
    for i, text in enumerate(texts):
        single = greedy(tiny_model, torch.tensor([qwen_tokenizer.encode(text)]), 12)
        assert out[i, -12:].tolist() == single[0, -12:].tolist(), text


def test_auto_classes_with_trust_remote_code(tiny_dir, tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained(tiny_dir, trust_remote_code=True)
    assert type(model).__name__ == "QWenLMHeadModel" and type(tok).__name__ == "QWenTokenizer"
    ids = torch.tensor([tok.encode(PROMPT)])
    assert torch.equal(model(ids).logits, tiny_model(ids).logits)


def test_ntk_alpha_formula():
    # 2**ceil(log2(len / seq_length) + 1) - 1, at least 1
    assert [ntk_alpha(n, 64) for n in (10, 64, 65, 128, 129, 256, 257)] == [1, 1, 3, 3, 7, 7, 15]


def _variant(model, **flags):
    config = QWenConfig(**{**model.config.to_dict(), **flags})
    other = QWenLMHeadModel(config).eval()
    other.load_state_dict(model.state_dict())
    return other


def test_eager_attention_matches_sdpa(tiny_model, qwen_tokenizer):
    """use_flash_attn false runs the plain-matmul attention (eager_attention); it must compute what SDPA computes,
    for a left-padded batch at prefill and for cached decode steps."""
    from qwen_model.modeling_qwen import eager_attention

    assert tiny_model.config.use_flash_attn is False and tiny_model.transformer.h[0].attn.eager
    fused = _variant(tiny_model, use_flash_attn=True)
    assert not fused.transformer.h[0].attn.eager
    batch = qwen_tokenizer([PROMPT, "short"], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = fused(**batch).logits
        got = tiny_model(**batch).logits
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-4, atol=1e-4)
    out = greedy(tiny_model, batch["input_ids"], 8, attention_mask=batch["attention_mask"])
    assert out.tolist() == greedy(fused, batch["input_ids"], 8, attention_mask=batch["attention_mask"]).tolist()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g) for n in (1, 7, 7))
    mask = torch.zeros(2, 1, 1, 7)
    mask[1, ..., :3] = torch.finfo(torch.float32).min
    for m in (None, mask):
        ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=m,
                                                               scale=0.25)
        torch.testing.assert_close(eager_attention(q, k, v, m, 0.25).double(), ref, rtol=1e-5, atol=1e-6)
    half = eager_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask.bfloat16(), 0.25)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.double(), ref, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("past", [0, 37])
def test_eager_attention_in_query_chunks(past):
    """More than QUERY_CHUNK queries on CPU: chunks give each row's arithmetic unchanged (bit-identical to one piece,
    with a padding mask too); causal=True skips keys after a chunk's last query (never reads them), equal to float32
    rounding, also after `past` cached positions."""
    from qwen_model import modeling_qwen as mq

    q_len = mq.QUERY_CHUNK * 2 + 21
    g = torch.Generator().manual_seed(past)
    q = torch.randn(2, 3, q_len, 16, generator=g)
    k, v = (torch.randn(2, 3, past + q_len, 16, generator=g) for _ in range(2))
    allowed = torch.ones(q_len, past + q_len, dtype=torch.bool).tril(past)
    causal = torch.zeros(1, 1, q_len, past + q_len).masked_fill(~allowed, torch.finfo(torch.float32).min)
    padded = causal.repeat(2, 1, 1, 1)
    padded[1, ..., :5] = torch.finfo(torch.float32).min
    for mask in (causal, padded):
        assert torch.equal(mq.eager_attention(q, k, v, mask, 0.25), mq._attend(q, k, v, mask, 0.25))
    got = mq.eager_attention(q, k, v, causal, 0.25, causal=True)
    torch.testing.assert_close(got, mq._attend(q, k, v, causal, 0.25), rtol=1e-5, atol=1e-6)
    k[..., -1, :] = float("nan")  # seen by the last query only: the earlier chunks never read it
    assert mq.eager_attention(q, k, v, causal, 0.25, causal=True)[..., :2 * mq.QUERY_CHUNK, :].isfinite().all()
    assert mq._attend(q, k, v, causal, 0.25).isnan().all()


def test_eager_chunked_prefill_matches_sdpa(tiny_model):
    """A 300-token prefill (three query chunks; causal without padding, whole rows with it): the plain-attention
    model's logits match SDPA's at every real token."""
    ids = torch.randint(0, 150000, (2, 300), generator=torch.Generator().manual_seed(5))
    fused = _variant(tiny_model, use_flash_attn=True)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    with torch.no_grad():
        for m in (None, mask):
            keep = torch.ones_like(ids, dtype=torch.bool) if m is None else m.bool()
            torch.testing.assert_close(tiny_model(ids, attention_mask=m).logits[keep],
                                       fused(ids, attention_mask=m).logits[keep], rtol=1e-4, atol=1e-4)


def test_logn_scaling_only_past_seq_length(tiny_model):
    seq = tiny_model.config.seq_length
    ids = torch.randint(0, 150000, (1, seq + 30), generator=torch.Generator().manual_seed(0))
    on = _variant(tiny_model, use_dynamic_ntk=False, use_logn_attn=True)(ids).logits
    off = _variant(tiny_model, use_dynamic_ntk=False, use_logn_attn=False)(ids).logits
    torch.testing.assert_close(on[:, :seq], off[:, :seq])
    assert (on[:, seq:] - off[:, seq:]).abs().amax() > 1e-3


def test_dynamic_ntk_only_past_seq_length(tiny_model):
    seq = tiny_model.config.seq_length
    ids = torch.randint(0, 150000, (1, seq + 30), generator=torch.Generator().manual_seed(1))
    on, off = (_variant(tiny_model, use_dynamic_ntk=f, use_logn_attn=False) for f in (True, False))
    torch.testing.assert_close(on(ids[:, :seq]).logits, off(ids[:, :seq]).logits)
    assert (on(ids).logits - off(ids).logits).abs().amax() > 1e-3


def test_cached_decoding_past_seq_length(tiny_model):
    """Prefill beyond seq_length fixes the NTK factor; decoding in the same bucket matches a full forward."""
    seq = tiny_model.config.seq_length
    ids = torch.randint(0, 150000, (1, seq + 16), generator=torch.Generator().manual_seed(2))
    out = greedy(tiny_model, ids, 10)
    assert ntk_alpha(ids.shape[1], seq) == ntk_alpha(out.shape[1], seq) == 3
    assert torch.equal(out, greedy(tiny_model, ids, 10, use_cache=False))
    assert math.isfinite(tiny_model(out).logits.abs().max().item())


def test_chat_and_chat_stream(tiny_model, qwen_tokenizer):
    response, history = tiny_model.chat(qwen_tokenizer, "你好", history=None, max_new_tokens=8)
    assert isinstance(response, str) and history == [("你好", response)]
    response2, history2 = tiny_model.chat(qwen_tokenizer, "再说一次", history=history, max_new_tokens=8)
    assert history2[0] == ("你好", response) and len(history2) == 2 and len(history) == 1
    streamed = list(tiny_model.chat_stream(qwen_tokenizer, "再说一次", history=history, max_new_tokens=8))
    assert streamed and streamed[-1] == response2


def test_chat_length_when_the_checkpoint_sets_none(tiny_dir, qwen_tokenizer):
    """A generation_config without a length (e.g. SmolLM2's converted one) would leave transformers' 20 tokens, prompt
    included, and cut every answer short: chat then allows the original release's 512 new tokens; a checkpoint's own
    max_new_tokens is kept (and a caller's max_new_tokens= goes to generate(), which applies it over the config)."""
    from qwen_model.modeling_qwen import CHAT_MAX_NEW_TOKENS

    model = QWenLMHeadModel.from_pretrained(tiny_dir)
    assert model.generation_config.max_new_tokens == 16  # the tiny checkpoint's own
    assert model._chat_inputs(qwen_tokenizer, "hi", [], "sys", None, {})[3].max_new_tokens == 16
    model.generation_config.max_new_tokens = None
    assert model._chat_inputs(qwen_tokenizer, "hi", [], "sys", None, {})[3].max_new_tokens == CHAT_MAX_NEW_TOKENS == 512
    assert model.generation_config.max_new_tokens is None  # the model's own config is not changed


def test_precision_flags(tiny_dir):
    assert QWenLMHeadModel.from_pretrained(tiny_dir).dtype == torch.float32
    assert QWenLMHeadModel.from_pretrained(tiny_dir, fp32=False, bf16=True).dtype == torch.bfloat16


def test_bad_inputs(tiny_dir, tiny_model, tmp_path):
    with pytest.raises(OSError):
        QWenLMHeadModel.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="divisible"):
        QWenConfig(hidden_size=100, num_attention_heads=3)
    with pytest.raises(ValueError, match="at most one"):
        QWenConfig(bf16=True, fp16=True)
    with pytest.raises(ValueError, match="cache_bits"):
        QWenConfig(cache_bits=3)
    with pytest.raises(ValueError, match="input_ids must be in"):
        tiny_model(torch.tensor([[151936]]))
    with pytest.raises(ValueError, match="exactly one"):
        tiny_model()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "qwen", "hidden_size": -4}')
    with pytest.raises(ValueError, match="hidden_size"):
        QWenConfig.from_pretrained(broken)


@pytest.mark.parametrize("shape", [(1, 1, 576), (2, 7, 64), (3, 130, 128)])
def test_rms_norm_fast_path_is_the_original_formula(shape):
    """float32 RMSNorm runs as F.rms_norm (one op); it must stay bit-identical to the original's composite formula,
    which bfloat16/float16 inputs still take."""
    g = torch.Generator().manual_seed(shape[-1])
    norm = RMSNorm(shape[-1], eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=g))
    x = torch.randn(shape, generator=g) * 3
    x[0, 0] = 0.0  # an all-zero row: eps alone in the denominator
    composite = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)) * norm.weight
    assert torch.equal(norm(x), composite)
    xb = x.bfloat16()  # the composite path itself: normalized in float32, rounded to the input's dtype, then scaled
    want = (xb.float() * torch.rsqrt(xb.float().pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16() * norm.weight
    assert torch.equal(norm(xb), want)
