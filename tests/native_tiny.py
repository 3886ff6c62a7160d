"""Tiny seeded transformers-native models (Qwen2 with GQA, biases and tied embeddings; Qwen3 with q/k norms and
linear rope scaling; Llama with GQA), saved with save_pretrained to safetensors, plus a byte-level BPE tokenizer."""
from pathlib import Path

import torch

VOCAB = 320
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, initializer_range=0.2,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
CONFIGS = {
    "qwen2": dict(COMMON, tie_word_embeddings=True),
    "qwen3": dict(COMMON, head_dim=32, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
    "llama": dict(COMMON, tie_word_embeddings=False),
}


def write_byte_tokenizer(path) -> None:
    """A byte-level BPE tokenizer without merges: every byte is a token (ids 3..258), plus <pad> <s> </s> and the
    chatml markers <|im_start|> <|im_end|> (259, 260) that the bundled calibration conversations need."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{ch: 3 + i for i, ch in enumerate(sorted(alphabet))}}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True) for t in ("<|im_start|>", "<|im_end|>")])
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<pad>").save_pretrained(path)


def create_native_tiny(model_type: str, path, seed: int = 0) -> Path:
    """Write a seeded tiny float32 `model_type` checkpoint (config.json, model.safetensors, tokenizer) to `path`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **CONFIGS[model_type])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    path = Path(path)
    model.save_pretrained(path)
    write_byte_tokenizer(path)
    return path
