"""Tokenizer adapter: plain-text encoding and chat-marker ids for the Qwen tiktoken tokenizer or any HF tokenizer.

Calibration and evaluation must never turn text that merely looks like a control token (``"<|im_end|>"`` typed by
a user) into that control token, so every path here encodes with special tokens disallowed and none added.
"""
import unicodedata

import tiktoken
from transformers import PreTrainedTokenizerBase

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"


def _tiktoken_encoding(tokenizer):
    """The tiktoken Encoding behind a Qwen-style tokenizer (``.tokenizer`` attribute), or None."""
    encoding = getattr(tokenizer, "tokenizer", None)
    return encoding if isinstance(encoding, tiktoken.Encoding) else None


def _unsupported(tokenizer) -> ValueError:
    return ValueError(
        f"unsupported tokenizer {type(tokenizer).__name__}: expected a Qwen tokenizer with a tiktoken `.tokenizer` "
        "or a Hugging Face PreTrainedTokenizer"
    )


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` as plain text: no BOS/EOS added, special-token strings encoded as ordinary text
    (Qwen tiktoken tokenizers: NFC-normalized first, as Qwen's own tokenizer does)."""
    if not isinstance(text, str):
        raise ValueError(f"expected text as str, got {type(text).__name__}")
    encoding = _tiktoken_encoding(tokenizer)
    if encoding is not None:
        # Qwen's tokenizer NFC-normalizes before BPE; doing the same keeps ids identical to its own encode.
        return encoding.encode(unicodedata.normalize("NFC", text), allowed_special=set(), disallowed_special=())
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        # verbose=False: a corpus longer than model_max_length is expected here, callers cut it into windows.
        return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"])
    raise _unsupported(tokenizer)


def chat_marker_ids(tokenizer) -> tuple[int, int]:
    """The ``(<|im_start|>, <|im_end|>)`` token ids the chatml template needs."""
    if _tiktoken_encoding(tokenizer) is not None:
        ids = (getattr(tokenizer, "im_start_id", None), getattr(tokenizer, "im_end_id", None))
    elif isinstance(tokenizer, PreTrainedTokenizerBase):
        vocab = tokenizer.get_vocab()
        ids = (vocab.get(IM_START), vocab.get(IM_END))
    else:
        raise _unsupported(tokenizer)
    if all(isinstance(i, int) for i in ids):
        return ids
    raise ValueError(
        f"tokenizer {type(tokenizer).__name__} has no {IM_START}/{IM_END} tokens, needed for chatml conversations"
    )
