"""Configuration of Qwen (v1) models, with the field names and defaults of the original Qwen-7B release."""
import inspect

from transformers import PretrainedConfig

# GPTQ checkpoints record their dtype as `dtype` and, for readers on transformers < 4.56, as `torch_dtype`; where
# transformers knows `dtype`, the equal legacy copy is dropped on load (it would only print a deprecation warning).
_KNOWS_DTYPE = "dtype" in inspect.signature(PretrainedConfig.__init__).parameters


class QWenConfig(PretrainedConfig):
    """Hyper-parameters of a Qwen (v1) model; a `config.json` of the original release loads unchanged."""

    model_type = "qwen"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size=151936,
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        emb_dropout_prob=0.0,
        attn_dropout_prob=0.0,
        layer_norm_epsilon=1e-6,
        initializer_range=0.02,
        max_position_embeddings=8192,
        scale_attn_weights=True,
        use_cache=True,
        bf16=False,
        fp16=False,
        fp32=False,
        kv_channels=128,
        rotary_pct=1.0,
        rotary_emb_base=10000,
        use_dynamic_ntk=True,
        use_logn_attn=True,
        use_flash_attn="auto",
        intermediate_size=22016,
        no_bias=True,
        tie_word_embeddings=False,
        use_cache_quantization=False,
        use_cache_kernel=False,
        softmax_in_fp32=False,
        seq_length=8192,
        cache_bits=8,
        cache_granularity="token",
        cache_key_layout=None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.emb_dropout_prob = emb_dropout_prob
        self.attn_dropout_prob = attn_dropout_prob
        self.layer_norm_epsilon = layer_norm_epsilon
        self.initializer_range = initializer_range
        self.scale_attn_weights = scale_attn_weights
        self.use_cache = use_cache
        self.max_position_embeddings = max_position_embeddings
        self.bf16 = bf16
        self.fp16 = fp16
        self.fp32 = fp32
        self.kv_channels = kv_channels
        self.rotary_pct = rotary_pct
        self.rotary_emb_base = rotary_emb_base
        self.use_dynamic_ntk = use_dynamic_ntk
        self.use_logn_attn = use_logn_attn
        self.use_flash_attn = use_flash_attn
        self.no_bias = no_bias
        self.use_cache_quantization = use_cache_quantization
        self.use_cache_kernel = use_cache_kernel
        self.softmax_in_fp32 = softmax_in_fp32
        self.seq_length = seq_length
        self.cache_bits = cache_bits
        self.cache_granularity = cache_granularity
        # Quantized-cache key layout: "token" (post-RoPE, one scale/zero per position, as the values) or
        # "channel_groups" (4 bits only: pre-RoPE, per channel over groups of 64 positions, float residual);
        # None = "channel_groups" for cache_bits=4 (token granularity), "token" otherwise.
        self.cache_key_layout = cache_key_layout
        if _KNOWS_DTYPE and "dtype" in kwargs and kwargs.get("torch_dtype") == kwargs["dtype"]:
            del kwargs["torch_dtype"]
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.validate_qwen()

    def validate_qwen(self):
        """Reject values the model cannot run with, in one clear sentence each."""
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_channels",
                     "intermediate_size", "seq_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"QWenConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"QWenConfig.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.intermediate_size % 2:
            raise ValueError(f"QWenConfig.intermediate_size must be even (w1 and w2 each get half), got {self.intermediate_size}")
        if not 0.0 < float(self.rotary_pct) <= 1.0:
            raise ValueError(f"QWenConfig.rotary_pct must be in (0, 1], got {self.rotary_pct!r}")
        if int(self.kv_channels * self.rotary_pct) % 2:
            raise ValueError("QWenConfig: kv_channels * rotary_pct must be an even number of rotary dimensions")
        if sum(bool(f) for f in (self.bf16, self.fp16, self.fp32)) > 1:
            raise ValueError("QWenConfig: set at most one of bf16, fp16, fp32")
        if self.use_flash_attn not in (True, False, "auto"):
            raise ValueError(f"QWenConfig.use_flash_attn must be true, false or \"auto\", got {self.use_flash_attn!r}")
        if self.cache_bits not in (4, 8):
            raise ValueError(f"QWenConfig.cache_bits must be 8 or 4, got {self.cache_bits!r}")
        if self.cache_granularity not in ("token", "chunk"):
            raise ValueError(f"QWenConfig.cache_granularity must be \"token\" or \"chunk\", got {self.cache_granularity!r}")
        if self.cache_key_layout not in (None, "token", "channel_groups"):
            raise ValueError("QWenConfig.cache_key_layout must be null, \"token\" or \"channel_groups\", got "
                             f"{self.cache_key_layout!r}")
        if self.cache_key_layout == "channel_groups" and (self.cache_bits != 4 or self.cache_granularity != "token"):
            raise ValueError("QWenConfig.cache_key_layout \"channel_groups\" needs cache_bits=4 and token granularity")
