"""Pre-tokenized calibration sets: a JSON list of token-id lists, used as is so every tool sees identical samples."""
import logging

logger = logging.getLogger(__name__)


def is_token_id_lists(data) -> bool:
    """Whether parsed JSON looks like a list of token-id lists (decided by its first element)."""
    return isinstance(data, list) and bool(data) and isinstance(data[0], list)


def token_id_samples(data, nsamples: int, seqlen: int, vocab_size: int | None, origin: str) -> list[list[int]]:
    """The first ``nsamples`` id lists, each truncated to ``seqlen``, after checking every id is an int in
    ``[0, vocab_size)`` (a file drawn for another vocabulary fails here rather than inside the model)."""
    if not isinstance(data, list) or not data:
        raise ValueError(f"{origin}: expected a non-empty JSON list of token-id lists")
    if len(data) < nsamples:
        logger.info("%s holds only %d samples, fewer than the %d asked for", origin, len(data), nsamples)
    samples = []
    for index, ids in enumerate(data[:nsamples]):
        if not isinstance(ids, list) or not ids:
            raise ValueError(f"{origin}: sample {index} is not a non-empty list of token ids")
        for token in ids:
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise ValueError(f"{origin}: sample {index} holds {token!r}, not a non-negative integer token id")
            if vocab_size is not None and token >= vocab_size:
                raise ValueError(f"{origin}: sample {index} holds token id {token}, outside the tokenizer's "
                                 f"vocabulary of {vocab_size}")
        samples.append(ids[:seqlen])
    return samples
