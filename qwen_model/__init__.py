"""The Qwen (v1) model, tokenizer and chat helpers."""
from .configuration_qwen import QWenConfig
from .tokenization_qwen import QWenTokenizer, load_tokenizer

__all__ = ["QWenConfig", "QWenTokenizer", "load_tokenizer"]
