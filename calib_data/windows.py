"""Seeded sampling of fixed-length token windows from raw text, as the GPTQ reference loaders draw calibration data.

Both samplers use their own ``random.Random(seed)``, so the same seed gives the same samples regardless of any
other use of the ``random`` module.
"""
import random
from collections.abc import Sequence

from calib_data.tokenization import encode_text


def sample_document_windows(tokenizer, documents: Sequence[str], nsamples: int, seqlen: int, seed: int,
                            origin: str) -> list[list[int]]:
    """GPTQ's C4 loader: per sample, draw random documents until one has more than ``seqlen`` tokens, then take
    the ``seqlen`` tokens starting at ``randint(0, len - seqlen - 1)``.

    Documents are tokenized lazily (only those drawn), which keeps large datasets cheap; if every document turns
    out to be too short the loop stops with a ValueError instead of drawing forever.
    """
    if len(documents) == 0:
        raise ValueError(f"{origin}: no documents")
    rng = random.Random(seed)
    long_ids: dict[int, list[int]] = {}
    short: set[int] = set()
    samples = []
    for _ in range(nsamples):
        while True:
            index = rng.randint(0, len(documents) - 1)
            ids = long_ids.get(index)
            if ids is None and index not in short:
                ids = encode_text(tokenizer, documents[index])
                if len(ids) > seqlen:
                    long_ids[index] = ids
                else:
                    ids = None
                    short.add(index)
                    if len(short) == len(documents):
                        raise ValueError(f"{origin}: no document has more than seqlen={seqlen} tokens")
            if ids is not None:
                break
        start = rng.randint(0, len(ids) - seqlen - 1)
        samples.append(ids[start:start + seqlen])
    return samples


def sample_text_windows(tokenizer, text: str, nsamples: int, seqlen: int, seed: int, origin: str) -> list[list[int]]:
    """GPTQ's WikiText loader: tokenize the whole text once, then take ``nsamples`` windows of ``seqlen`` tokens
    starting at ``randint(0, len - seqlen - 1)``."""
    ids = encode_text(tokenizer, text)
    if len(ids) <= seqlen:
        raise ValueError(f"{origin}: text has {len(ids)} tokens, window sampling needs more than seqlen={seqlen}")
    rng = random.Random(seed)
    samples = []
    for _ in range(nsamples):
        start = rng.randint(0, len(ids) - seqlen - 1)
        samples.append(ids[start:start + seqlen])
    return samples
