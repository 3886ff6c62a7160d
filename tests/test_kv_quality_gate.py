"""CI perplexity gate of the quantized KV cache on the real SmolLM2-135M model (Qwen layout), WikiText-2.

Protocol (small, for CI: about 3 forward passes of 1024 tokens, ~1 min on 2 idle CPU cores): the first window of
1024 tokens of ``wiki.test.raw``, fed through the cache in chunks of 128 (``quantize.evaluate.chunked_perplexity``),
so every chunk after the first attends to quantized keys/values of the earlier chunks (and to its own in full
precision). The same protocol with a float cache is the reference. The full benchmark
(4 windows, the peer's protocol) is ``benchmarks/kv_quality.py``.

Bounds: int8 at most +0.5% (measured +0.01%). 4-bit (default layout: pre-RoPE keys in per-channel groups of 64
positions) at most +1.5% (measured +0.87% on this single window; the earlier per-token 4-bit keys measured +1.93%
under the old +3% bound; the 4-window figure is in benchmarks/RESULTS.md).
"""
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
WIKI = REPO.parent / "shared" / "data" / "wiki.test.raw"
CTX, CHUNK, WINDOWS = 1024, 128, 1


@pytest.fixture(scope="module")
def wiki_ids(smollm2_dir):
    if not WIKI.is_file():
        pytest.skip(f"WikiText-2 not found at {WIKI}")
    from calib_data.tokenization import encode_text
    from qwen_model import load_tokenizer

    text = WIKI.read_text(encoding="utf-8")
    # Only the first part is needed; cut on a line boundary well past the tokens the windows use.
    return encode_text(load_tokenizer(str(smollm2_dir)), text[:text.index("\n", 20 * CTX * WINDOWS)])


@pytest.fixture(scope="module")
def scores(smollm2_dir, wiki_ids):
    from kvcache.quantized_cache import QuantizedKVCache
    from qwen_model.modeling_qwen import QWenLMHeadModel
    from quantize.evaluate import chunked_perplexity

    def run(model, make_cache=None):
        kwargs = {} if make_cache is None else {"make_cache": make_cache}
        return chunked_perplexity(model, wiki_ids, ctx=CTX, chunk=CHUNK, n_windows=WINDOWS, progress=False, **kwargs)

    model = QWenLMHeadModel.from_pretrained(smollm2_dir).eval()
    out = {"float": run(model)}
    model.config.use_cache_quantization = True
    for bits in (8, 4):
        out[bits] = run(model, lambda bits=bits: QuantizedKVCache(bits=bits))
    print({k: round(v, 4) for k, v in out.items()})
    return out


def test_int8_cache_costs_at_most_half_a_percent(scores):
    assert len(set(scores.values())) == 3  # three different caches really ran
    assert scores[8] <= scores["float"] * 1.005


def test_4bit_cache_figure(scores):
    increase = scores[4] / scores["float"] - 1
    print(f"4-bit cache: perplexity {scores[4]:.4f} vs float {scores['float']:.4f} ({100 * increase:+.2f}%)")
    assert scores[8] < scores[4] <= scores["float"] * 1.015
