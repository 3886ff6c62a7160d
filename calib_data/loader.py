"""Single entry point for calibration data: picks the reader from the source, returns token-id tensors."""
import json
import logging
import os
from pathlib import Path

import torch

from calib_data.conversations import conversation_samples, validate_conversations
from calib_data.hf_datasets import DATA_FILE_BUILDERS, load_text_documents
from calib_data.pretokenized import is_token_id_lists, token_id_samples
from calib_data.windows import sample_document_windows, sample_text_windows

logger = logging.getLogger(__name__)

DEFAULT_CALIBRATION = Path(__file__).with_name("default_calib.json")
LOCAL_SUFFIXES = {".json", ".jsonl", ".txt", *DATA_FILE_BUILDERS}


def _read_json(path: Path):
    try:
        with path.open(encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: malformed JSON ({error})") from None


def _read_jsonl_texts(path: Path) -> list[str]:
    texts = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: malformed JSON on line {number} ({error})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}: line {number} has no string 'text' field")
            texts.append(record["text"])
    return texts


def _vocab_size(tokenizer) -> int | None:
    try:
        return len(tokenizer)
    except TypeError:
        return None


def _json_samples(path: Path, tokenizer, nsamples: int, seqlen: int) -> list[list[int]]:
    data = _read_json(path)
    if isinstance(data, list) and not data:
        raise ValueError(f"{path}: empty calibration set")
    if is_token_id_lists(data):
        return token_id_samples(data, nsamples, seqlen, _vocab_size(tokenizer), str(path))
    if isinstance(data, list) and isinstance(data[0], dict):
        return conversation_samples(tokenizer, validate_conversations(data, str(path)), nsamples, seqlen)
    raise ValueError(f"{path}: expected a list of conversation records or a list of token-id lists")


def _file_samples(path: Path, tokenizer, nsamples: int, seqlen: int, seed: int) -> list[list[int]]:
    suffix = path.suffix.lower()
    if suffix == ".json":
        return _json_samples(path, tokenizer, nsamples, seqlen)
    if suffix == ".jsonl":
        return sample_document_windows(tokenizer, _read_jsonl_texts(path), nsamples, seqlen, seed, str(path))
    if suffix == ".txt":
        text = path.read_text(encoding="utf-8")
        return sample_text_windows(tokenizer, text, nsamples, seqlen, seed, str(path))
    if suffix in DATA_FILE_BUILDERS:
        return sample_document_windows(tokenizer, load_text_documents(str(path)), nsamples, seqlen, seed, str(path))
    raise ValueError(f"{path}: unsupported calibration file type '{path.suffix}' "
                     f"(expected one of {', '.join(sorted(LOCAL_SUFFIXES))}, or a dataset directory)")


def _looks_local(source: str) -> bool:
    return Path(source).suffix.lower() in LOCAL_SUFFIXES or source.startswith((".", "/", "~"))


def load_calibration(source, tokenizer, nsamples: int = 128, seqlen: int = 2048,
                     seed: int = 0) -> list[torch.LongTensor]:
    """Calibration samples as ``[1, L]`` int64 tensors, ``L <= seqlen``.

    ``source``: None or ``"default"`` (the bundled conversations); a conversation ``.json`` (chatml, one sample
    per conversation); a ``.json`` list of token-id lists (used as is); a ``.jsonl`` with a ``text`` field or a
    ``datasets`` directory/file/Hub name (GPTQ C4-style windows of exactly ``seqlen`` tokens); a ``.txt``
    (windows of the whole text). ``seed`` drives the window sampling only; list-like sources take their first
    ``nsamples`` entries.
    """
    for name, value in (("nsamples", nsamples), ("seqlen", seqlen)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if source is None or source == "default":
        source = DEFAULT_CALIBRATION
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"calibration source must be a path or dataset name, got {type(source).__name__}")
    path = Path(source).expanduser()
    if path.is_dir():
        samples = sample_document_windows(tokenizer, load_text_documents(str(path)), nsamples, seqlen, seed, str(path))
    elif path.is_file():
        samples = _file_samples(path, tokenizer, nsamples, seqlen, seed)
    elif isinstance(source, os.PathLike) or _looks_local(str(source)):
        raise FileNotFoundError(f"calibration source not found: {source}")
    else:
        samples = sample_document_windows(tokenizer, load_text_documents(str(source)), nsamples, seqlen, seed,
                                          str(source))
    tensors = [torch.tensor([ids], dtype=torch.long) for ids in samples]
    logger.info("calibration: %d samples, %d tokens from %s", len(tensors), sum(t.shape[1] for t in tensors), source)
    return tensors
