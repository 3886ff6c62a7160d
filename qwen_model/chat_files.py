"""What an OpenAI-style server (vLLM, TGI) reads to chat like `model.chat()`: the chat template and the stop ids.

`write_chat_files` makes both explicit in a checkpoint directory, so serving needs no `--chat-template` and no stop
flags: a Qwen (tiktoken) tokenizer gets the ChatML template in `tokenizer_config.json`, and `generation_config.json`
ends a response at `<|im_end|>` and `<|endoftext|>` (ids looked up in the directory's own tokenizer).
"""
import json
import logging
from pathlib import Path

from .qwen_generation_utils import CHATML_TEMPLATE
from .tokenization_qwen import QWenTokenizer, load_tokenizer

logger = logging.getLogger(__name__)

STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def stop_token_ids(tokenizer) -> list[int]:
    """Ids of `<|im_end|>` then `<|endoftext|>`, those the tokenizer has."""
    vocab = tokenizer.get_vocab()
    return [vocab[token] for token in STOP_TOKENS if token in vocab]


def write_chat_files(out_dir) -> None:
    """Add the ChatML template (Qwen tokenizers; another tokenizer keeps its own) and the stop ids to `out_dir`."""
    out_dir = Path(out_dir)
    tokenizer = load_tokenizer(out_dir)
    if isinstance(tokenizer, QWenTokenizer):
        path = out_dir / "tokenizer_config.json"
        _write_json(path, {**_read_json(path), "chat_template": CHATML_TEMPLATE})
    stops = stop_token_ids(tokenizer)
    path = out_dir / "generation_config.json"
    gen = _read_json(path)
    eos = gen.get("eos_token_id")
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    gen["eos_token_id"] = list(dict.fromkeys(stops + eos))
    _write_json(path, gen)
    logger.info("chat files: %s stops at %s", out_dir, gen["eos_token_id"])
