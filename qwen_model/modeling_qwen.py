"""The Qwen (v1) model: RMSNorm, rotary embeddings with dynamic NTK and logn scaling, fused c_attn, SwiGLU MLP.

Parameter names follow the original Qwen-7B-Chat checkpoints. The KV cache is stored and read in exactly one place,
`QWenAttention.forward`: a float `DynamicCache` (`generate()` reserves its room: `ReservedCache`), or, with `use_cache_quantization`, a `QuantizedKVCache` whose
per-layer entry is `((q_key, key_scale, key_zero), (q_value, value_scale, value_zero))`.
"""
import copy
import logging
import math
import os
import queue
import threading

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation.streamers import BaseStreamer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from kvcache.cpu_kernels import attend_float_cpu
from kvcache.quantized_attention import quantized_attention
from kvcache.quantized_cache import QuantizedKVCache, QuantizedKVLayer
from kvcache.reserved import ReservedCache
from kvcache.rotary import apply_rotary_pos_emb, cos_sin_at, rotary_inv_freq
from qwen_model.cpu_decode_ops import qkv_heads_cpu, rms_norm_cpu
from qwen_model.cpu_decode_step import decode_blocks_cpu
from quantize.quant_linear import gated_mlp_cpu

from .configuration_qwen import QWenConfig
from .qwen_generation_utils import DEFAULT_SYSTEM, decode_tokens, get_stop_words_ids, make_context

logger = logging.getLogger(__name__)

# New tokens of a chat turn when the checkpoint's generation_config does not say (Qwen-7B-Chat's says 512).
CHAT_MAX_NEW_TOKENS = 512


def _default_dtype(config: QWenConfig) -> torch.dtype:
    """Precision from the config flags; with none set, bf16 (else fp16) on CUDA and fp32 on CPU, as the original."""
    if config.bf16:
        return torch.bfloat16
    if config.fp16:
        return torch.float16
    if config.fp32 or not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def ntk_alpha(true_seq_len: int, seq_length: int) -> float:
    """Dynamic NTK factor of the original: 1 up to `seq_length`, then 2**ceil(log2(len/seq_length) + 1) - 1."""
    context_value = math.log(true_seq_len / seq_length, 2) + 1
    return max(2 ** math.ceil(context_value) - 1, 1)


def _cache_settings(config: QWenConfig) -> dict:
    """What `use_cache_quantization` asks of a quantized cache or layer: bits, granularity and key layout."""
    return {"bits": config.cache_bits, "granularity": config.cache_granularity, "key_layout": config.cache_key_layout}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        decode = rms_norm_cpu(x, self.weight, self.eps)  # a few float32 rows on CPU: one call
        if decode is not None:
            return decode
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:  # the same arithmetic in one fused op
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        out = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


# eager_attention's queries per chunk on CPU: measured 1024-token prefill attention of SmolLM2's shapes (9 heads x 64)
# 32.4 ms a layer in one piece, 13.0 / 14.5 / 15.3 ms with causal chunks of 64 / 128 / 256 queries.
QUERY_CHUNK = 128


def eager_attention(query, key, value, mask, scale, causal=False):
    """softmax(q k^T * scale + mask) v in plain matmuls, the original's non-flash `_attn` (softmax in float32).

    `mask` is the additive `[b, 1, q, kv]` mask (None: nothing masked, as for one decoded token). On CPU, more than
    QUERY_CHUNK queries attend QUERY_CHUNK at a time (each row's arithmetic unchanged, and a [b, h, chunk, kv] score
    tensor instead of [b, h, q, kv]: 37 MB a layer at 1024 tokens of SmolLM2, whose fresh pages cost more than the
    matmuls); `causal=True` says the queries are the last q of the keys and `mask` holds nothing but causality, so a
    chunk skips the keys after its last query (masked for all of its rows; ~2.2x the attention of a 1024-token
    prefill; softmax sums may then differ by float32 rounding)."""
    q_len, kv_len = query.shape[-2], key.shape[-2]
    if query.device.type != "cpu" or q_len <= QUERY_CHUNK:
        return _attend(query, key, value, mask, scale)
    chunks = []
    for start in range(0, q_len, QUERY_CHUNK):
        end = min(q_len, start + QUERY_CHUNK)
        keys = kv_len - q_len + end if causal else kv_len
        chunk_mask = None if mask is None else mask[..., start:end, :keys]
        chunks.append(_attend(query[..., start:end, :], key[..., :keys, :], value[..., :keys, :], chunk_mask, scale))
    return torch.cat(chunks, dim=-2)


def _attend(query, key, value, mask, scale):
    scores = torch.matmul(query * scale, key.transpose(-1, -2))
    if mask is not None:
        scores += mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    return torch.matmul(probs, value)


class QWenAttention(nn.Module):
    def __init__(self, config: QWenConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.projection_size = config.kv_channels * config.num_attention_heads
        self.scale_attn_weights = config.scale_attn_weights
        self.c_attn = nn.Linear(config.hidden_size, 3 * self.projection_size)
        self.c_proj = nn.Linear(self.projection_size, config.hidden_size, bias=not config.no_bias)
        self.attn_dropout = nn.Dropout(config.attn_dropout_prob)
        self.config = config
        # use_flash_attn: false = plain attention (`eager_attention`), as the original's non-flash path; true/"auto"
        # = PyTorch's fused kernels (FlashAttention-2 / memory-efficient on CUDA, the flash kernel on CPU). Either way a
        # decoded token over a float32 cache on CPU takes `attend_float_cpu` (the same softmax(q k^T) v in one call).
        self.eager = config.use_flash_attn is False
        self.sdpa_backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                              SDPBackend.MATH]

    def forward(self, hidden_states, rotary_pos_emb, attention_mask=None, cache=None, logn_scale=None, causal=False):
        """`rotary_pos_emb` is `(cos, sin, inv_freq, key_positions)` from `QWenModel.forward`; the last two let a
        quantized cache keep keys before the rotary (its `"channel_groups"` layout) and rotate them when read.
        `causal`: `attention_mask` holds nothing but causality (no padding): the plain attention may skip keys."""
        b, s, _ = hidden_states.shape
        qkv = self.c_attn(hidden_states)
        cos, sin, inv_freq, key_positions = rotary_pos_emb
        heads = qkv_heads_cpu(qkv, cos, sin, self.num_heads)  # a decoded token on CPU: one call, the same values
        if heads is not None:
            query, key, value, raw_key = heads
        else:  # queries and keys side by side as 2 * heads heads, rotated in one go
            query_key, value = qkv.split((2 * self.projection_size, self.projection_size), dim=2)
            query_key = query_key.view(b, s, 2 * self.num_heads, -1).transpose(1, 2)
            value = value.view(b, s, self.num_heads, -1).transpose(1, 2)
            rotated = apply_rotary_pos_emb(query_key, cos, sin)
            query, key = rotated[:, :self.num_heads], rotated[:, self.num_heads:]
            raw_key = query_key[:, self.num_heads:]
        if logn_scale is not None:
            query = query * logn_scale.type_as(query)
        scale = 1.0 / math.sqrt(value.shape[-1]) if self.scale_attn_weights else 1.0

        quantized = isinstance(cache, QuantizedKVCache) or (cache is None and self.config.use_cache_quantization)
        # The one place where the KV cache is stored and read (without a cache, a quantized model still attends
        # over a one-off quantized layer, as the original did).
        if quantized:
            store = cache if cache is not None else QuantizedKVLayer(**_cache_settings(self.config))
            stored_key = raw_key if store.key_layout == "channel_groups" else key
            cache_kwargs = {"positions": key_positions}
            layer_past = (cache.update(stored_key, value, self.layer_idx, cache_kwargs) if cache is not None
                          else store.update(stored_key, value, cache_kwargs))
        elif cache is not None:
            layer_past = cache.update(key, value, self.layer_idx)
        else:
            layer_past = (key, value)

        fused = None if quantized or self.training else attend_float_cpu(query, *layer_past, attention_mask, scale)
        if quantized:
            backend = "auto" if query.device.type == "cpu" else ("cuda" if self.config.use_cache_kernel else "triton")
            # A prefill chunk attends to its own keys/values in full precision and to earlier ones through the
            # quantized cache; "chunk" granularity keeps the original release's all-quantized arithmetic.
            fresh = (key, value) if s > 1 and self.config.cache_granularity == "token" else None
            if fresh is not None and attention_mask is not None and attention_mask.shape[-1] == s:
                # nothing was cached before this chunk (a first prefill): only its own float keys/values count
                out = eager_attention(query, key, value, attention_mask, scale, causal=causal)
            else:
                out = quantized_attention(query, layer_past, attention_mask, scale, backend=backend, fresh=fresh,
                                          inv_freq=inv_freq)
        elif fused is not None:  # a decoded token on CPU: one kernel call, whatever use_flash_attn says
            out = fused
        elif self.eager and not self.training:
            out = eager_attention(query, *layer_past, attention_mask, scale, causal=causal)
        else:
            k, v = layer_past
            with sdpa_kernel(self.sdpa_backends if not self.eager else [SDPBackend.MATH]):
                out = F.scaled_dot_product_attention(
                    query, k, v, attn_mask=attention_mask,
                    is_causal=attention_mask is None and s > 1 and k.shape[2] == s,
                    dropout_p=self.attn_dropout.p if self.training else 0.0, scale=scale,
                )
        out = out.transpose(1, 2).reshape(b, s, self.projection_size)
        return self.c_proj(out)


class QWenMLP(nn.Module):
    def __init__(self, config: QWenConfig):
        super().__init__()
        ff = config.intermediate_size // 2
        self.w1 = nn.Linear(config.hidden_size, ff, bias=not config.no_bias)
        self.w2 = nn.Linear(config.hidden_size, ff, bias=not config.no_bias)
        self.c_proj = nn.Linear(ff, config.hidden_size, bias=not config.no_bias)

    def forward(self, x):
        fused = gated_mlp_cpu(x, self.w1, self.w2, self.c_proj)  # GPTQ layers, a decoded token on CPU: one call
        if fused is not None:
            return fused
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))


class QWenBlock(nn.Module):
    def __init__(self, config: QWenConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = QWenAttention(config, layer_idx)
        self.ln_2 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = QWenMLP(config)

    def forward(self, hidden_states, rotary_pos_emb, attention_mask=None, cache=None, logn_scale=None, causal=False):
        hidden_states = hidden_states + self.attn(self.ln_1(hidden_states), rotary_pos_emb, attention_mask, cache,
                                                  logn_scale, causal)
        return hidden_states + self.mlp(self.ln_2(hidden_states))


class QWenPreTrainedModel(PreTrainedModel):
    config_class = QWenConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["QWenBlock"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    supports_gradient_checkpointing = False

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)


class QWenModel(QWenPreTrainedModel):
    def __init__(self, config: QWenConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.drop = nn.Dropout(config.emb_dropout_prob)
        self.h = nn.ModuleList([QWenBlock(config, i) for i in range(config.num_hidden_layers)])
        self.ln_f = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.rotary_ndims = int(config.kv_channels * config.rotary_pct)
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, new_embeddings):
        self.wte = new_embeddings

    def _ntk_alphas(self, cache, attention_mask, past_len, kv_len, batch):
        """Per-sample NTK factors: fixed at prefill (kept on the cache for decoding), from each row's true length."""
        if self.training or not self.config.use_dynamic_ntk:
            return [1.0]
        stored = getattr(cache, "qwen_ntk_alphas", None)
        if past_len > 0 and stored is not None and len(stored) in (1, batch):
            return stored
        if attention_mask is not None and kv_len > self.config.seq_length:
            alphas = [ntk_alpha(int(n), self.config.seq_length) for n in attention_mask.sum(-1).tolist()]
        else:
            alphas = [ntk_alpha(kv_len, self.config.seq_length)]
        if cache is not None:
            cache.qwen_ntk_alphas = alphas
        return alphas

    def _attention_mask(self, attention_mask, q_len, past_len, dtype, device, explicit):
        """Additive `[b, 1, q, kv]` mask from a 2D padding mask (None: no padding) and causality.

        None when nothing is masked or (unless `explicit`) when SDPA's own causal mask suffices.
        """
        kv_len = past_len + q_len
        if attention_mask is None:
            if q_len == 1 or (past_len == 0 and not explicit):
                return None
            keep = torch.ones(1, kv_len, dtype=torch.bool, device=device)
        else:
            keep = attention_mask[:, -kv_len:].bool()
        causal = torch.arange(kv_len, device=device)[None, :] <= (torch.arange(q_len, device=device) + past_len)[:, None]
        allowed = causal[None, None] & keep[:, None, None, :]
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
        return mask.masked_fill(~allowed, torch.finfo(dtype).min)

    def forward(self, input_ids=None, cache=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                use_cache=None, **kwargs):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
            if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
                raise ValueError(f"input_ids must be in [0, {self.config.vocab_size}), got values outside it")
            inputs_embeds = self.wte(input_ids)
        b, q_len = inputs_embeds.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = (QuantizedKVCache(**_cache_settings(self.config)) if self.config.use_cache_quantization
                     else DynamicCache())
        if cache is not None and not isinstance(cache, Cache):
            raise TypeError(f"cache must be a transformers Cache, got {type(cache).__name__} (tuples are not supported)")
        if self.config.use_cache_quantization and cache is not None and not isinstance(cache, QuantizedKVCache):
            raise ValueError("use_cache_quantization=True needs a QuantizedKVCache, got " + type(cache).__name__)
        past_len = cache.get_seq_length() if cache is not None else 0
        kv_len = past_len + q_len
        if attention_mask is not None and attention_mask.shape[-1] not in (kv_len, q_len):
            raise ValueError(f"attention_mask has length {attention_mask.shape[-1]}, expected {kv_len}")
        if attention_mask is not None and attention_mask.shape[-1] == q_len and past_len:
            attention_mask = torch.cat([attention_mask.new_ones(b, past_len), attention_mask], dim=-1)
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q_len:]
            else:
                position_ids = torch.arange(past_len, kv_len, device=inputs_embeds.device)[None].expand(b, -1)

        alphas = self._ntk_alphas(cache, attention_mask, past_len, kv_len, b)
        inv_freq = rotary_inv_freq(alphas, self.rotary_ndims, self.config.rotary_emb_base, device=position_ids.device)
        key_positions = position_ids if attention_mask is None else \
            position_ids.masked_fill(attention_mask[:, -q_len:] == 0, -1)  # -1: padding (for the quantized cache)
        rotary = (*cos_sin_at(position_ids, inv_freq), inv_freq, key_positions)
        logn_scale = None
        if self.config.use_logn_attn and not self.training and int(position_ids.max()) + 1 > self.config.seq_length:
            pos = position_ids.double() + 1
            logn = torch.where(pos > self.config.seq_length, pos.log() / math.log(self.config.seq_length), 1.0)
            logn_scale = logn.float()[:, None, :, None]
        quantized = self.config.use_cache_quantization or isinstance(cache, QuantizedKVCache)
        eager = self.config.use_flash_attn is False and not self.training
        padded = attention_mask is not None and not bool(attention_mask.all())
        mask = self._attention_mask(attention_mask if padded else None, q_len, past_len, inputs_embeds.dtype,
                                    inputs_embeds.device, explicit=quantized or eager)

        hidden_states = self.drop(inputs_embeds)
        fused = decode_blocks_cpu(self, hidden_states, cache, rotary, mask, logn_scale)
        if fused is not None:  # a decoded token of a GPTQ model on CPU: every block in one call, the same values
            hidden_states = fused
        else:
            for block in self.h:
                hidden_states = block(hidden_states, rotary, mask, cache, logn_scale, causal=not padded)
        return BaseModelOutputWithPast(last_hidden_state=self.ln_f(hidden_states), cache=cache)


class _QueueStreamer(BaseStreamer):
    """Hands each generated chunk of token ids to a queue, for `chat_stream`."""

    def __init__(self):
        self.queue = queue.Queue()

    def put(self, value):
        self.queue.put(value.reshape(-1).tolist())

    def end(self):
        self.queue.put(None)


def _check_float_load(path, model, info) -> None:
    """Refuse a float checkpoint that left weights randomly initialised or held tensors the model has no place for
    (other than known harmless extras, which are logged)."""
    from qwen_model.checkpoint import LazyCheckpoint, describe_names, harmless_extra, holds_safetensors

    if info["missing_keys"]:
        raise ValueError(f"{path}: checkpoint lacks tensors {describe_names(info['missing_keys'])} (they would be "
                         "random)")
    unexpected = set(info["unexpected_keys"])
    if unexpected and holds_safetensors(path):
        values = LazyCheckpoint(path).read_all(unexpected)
        for name in sorted(unexpected):
            reason = harmless_extra(name, values[name], model)
            if reason is not None:
                logger.info("skipped %s: %s", name, reason)
                unexpected.discard(name)
    if unexpected:
        raise ValueError(f"{path}: unexpected tensors {describe_names(unexpected)}")
    if info["mismatched_keys"]:
        shapes = describe_names(map(str, info["mismatched_keys"]))
        raise ValueError(f"{path}: tensor shapes differ from config.json: {shapes}")


class QWenLMHeadModel(QWenPreTrainedModel, GenerationMixin):
    def __init__(self, config: QWenConfig):
        super().__init__(config)
        self.transformer = QWenModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        dtype = _default_dtype(config)
        if config.bf16 or config.fp16 or torch.get_default_dtype() == torch.float32:
            self.to(dtype)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, gptq_backend: str = "qwen",
                        gptq_kernel: str = "auto", **kwargs):
        """Load a float checkpoint, or a GPTQ one with our QuantLinear; never a model with random weights.

        `gptq_kernel` chooses QuantLinear's kernel ("auto": Triton on CUDA, torch's int4 kernel on CPU; "torch": the
        dequantize reference; "triton"; "int4pack"), see quantize.quant_linear.

        A local directory loads quantized when its config.json has a gptq `quantization_config`, when it has a
        `quantize_config.json`, or when its safetensors hold GPTQ tensors (`qweight`): then the settings must be
        found or loading fails with one clear error (`quantize.gptq_checkpoint.load_quantized`). A float directory
        must provide every weight: missing ones are an error, not a random initialisation.
        `gptq_backend="hf"` hands GPTQ checkpoints to transformers' own integration (optimum + gptqmodel) instead.
        """
        if gptq_backend not in ("qwen", "hf"):
            raise ValueError(f"gptq_backend must be 'qwen' or 'hf', got {gptq_backend!r}")
        path = str(pretrained_model_name_or_path)
        if gptq_backend == "qwen" and os.path.isdir(path):
            from quantize.gptq_checkpoint import gptq_settings, has_gptq_tensors, load_quantized

            config = kwargs.get("config")
            if not isinstance(config, QWenConfig):
                config, _ = cls.config_class.from_pretrained(path, return_unused_kwargs=True, **{
                    k: v for k, v in kwargs.items() if k not in ("config", "device_map", "dtype", "torch_dtype",
                                                                 "trust_remote_code", "output_loading_info")})
            if gptq_settings(config, path) is not None or has_gptq_tensors(path):
                device = kwargs.get("device_map")
                return load_quantized(cls, path, config, device=device if isinstance(device, str) else None,
                                      kernel=gptq_kernel)
            want_info = kwargs.pop("output_loading_info", False)
            model, info = super().from_pretrained(pretrained_model_name_or_path, *model_args,
                                                  output_loading_info=True, **kwargs)
            _check_float_load(path, model, info)
            return (model, info) if want_info else model
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, new_embeddings):
        self.transformer.wte = new_embeddings

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(self, input_ids=None, cache=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                labels=None, use_cache=None, past_key_values=None, logits_to_keep=0, **kwargs):
        if past_key_values is not None:
            if cache is not None and cache is not past_key_values:
                raise ValueError("pass the cache once, as cache= or past_key_values=")
            cache = past_key_values
        out = self.transformer(input_ids=input_ids, cache=cache, attention_mask=attention_mask,
                               position_ids=position_ids, inputs_embeds=inputs_embeds, use_cache=use_cache)
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                      max_cache_length, *args, **kwargs):
        """Give `generate()` a cache with room for the whole call reserved up front (`kvcache.reserved`: no copy
        of the cache per token): the quantized cache when `use_cache_quantization` is on, else a float one."""
        if (model_kwargs.get("cache") is None and generation_config.use_cache is not False
                and generation_config.cache_implementation is None):
            model_kwargs["cache"] = (
                QuantizedKVCache(**_cache_settings(self.config), capacity=max_cache_length)
                if self.config.use_cache_quantization else ReservedCache(max_cache_length))
            return
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, generation_mode, batch_size,
                                                     max_cache_length, *args, **kwargs)

    def _chat_inputs(self, tokenizer, query, history, system, generation_config, kwargs):
        generation_config = copy.deepcopy(generation_config or self.generation_config)
        chat_format = getattr(generation_config, "chat_format", "chatml")
        max_window_size = kwargs.pop("max_window_size", None) or getattr(generation_config, "max_window_size", 6144)
        raw_text, context_tokens = make_context(tokenizer, query, history=history, system=system,
                                                max_window_size=max_window_size, chat_format=chat_format)
        stop_ids = [ids[0] for ids in get_stop_words_ids(chat_format, tokenizer) if len(ids) == 1]
        eos = generation_config.eos_token_id
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        generation_config.eos_token_id = list(dict.fromkeys(eos + stop_ids))
        if generation_config.pad_token_id is None:
            generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
        if generation_config.max_new_tokens is None and generation_config.max_length == GenerationConfig().max_length:
            # a checkpoint that leaves the length at transformers' default (20 tokens in all, prompt included) would
            # cut every answer short: the original release's generation_config.json says 512 new tokens
            generation_config.max_new_tokens = CHAT_MAX_NEW_TOKENS
        input_ids = torch.tensor([context_tokens], device=self.device)
        return raw_text, context_tokens, input_ids, generation_config, chat_format

    @torch.no_grad()
    def chat(self, tokenizer, query: str, history=None, system: str = DEFAULT_SYSTEM, generation_config=None,
             **kwargs):
        """One chat turn: returns `(response, history)` with `(query, response)` appended to a copy of `history`."""
        history = copy.deepcopy(history) if history else []
        raw_text, context_tokens, input_ids, gen_config, chat_format = self._chat_inputs(
            tokenizer, query, history, system, generation_config, kwargs)
        outputs = self.generate(input_ids, generation_config=gen_config, **kwargs)
        response = decode_tokens(outputs[0], tokenizer, raw_text_len=len(raw_text),
                                 context_length=len(context_tokens), chat_format=chat_format)
        history.append((query, response))
        return response, history

    @torch.no_grad()
    def chat_stream(self, tokenizer, query: str, history=None, system: str = DEFAULT_SYSTEM, generation_config=None,
                    **kwargs):
        """Like `chat`, but yields the response decoded so far after each new token."""
        history = copy.deepcopy(history) if history else []
        raw_text, context_tokens, input_ids, gen_config, chat_format = self._chat_inputs(
            tokenizer, query, history, system, generation_config, kwargs)
        streamer = _QueueStreamer()
        errors = []

        def run():
            try:
                self.generate(input_ids, generation_config=gen_config, streamer=streamer, **kwargs)
            except Exception as e:  # re-raised in the caller's thread
                errors.append(e)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        tokens = list(context_tokens)
        first = True
        while (chunk := streamer.queue.get()) is not None:
            if first:  # the streamer first receives the prompt itself
                first = False
                continue
            tokens.extend(chunk)
            yield decode_tokens(tokens, tokenizer, raw_text_len=len(raw_text), context_length=len(context_tokens),
                                chat_format=chat_format)
        thread.join()
        if errors:
            raise errors[0]


__all__ = ["QWenLMHeadModel", "QWenModel", "QWenPreTrainedModel"]
