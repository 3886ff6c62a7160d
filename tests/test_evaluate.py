"""Perplexity protocols against a naive per-position loop on a tiny random Llama, plus CLI input errors."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from quantize.evaluate import chunked_perplexity, main, perplexity

REPO = Path(__file__).resolve().parents[1]
VOCAB = 61


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).eval()
    # Random init gives near-uniform predictions; larger logits make the perplexity sensitive to mistakes.
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model


@pytest.fixture(scope="module")
def stream():
    return torch.randint(0, VOCAB, (150,), generator=torch.Generator().manual_seed(1))


def naive_perplexity(model, ids, ctx, n_windows):
    """Score every position separately: the model sees only the window prefix before the predicted token."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(n_windows):
            window = ids[w * ctx:(w + 1) * ctx]
            for t in range(1, ctx):
                logits = model(window[:t].unsqueeze(0)).logits[0, -1].double()
                nll -= torch.log_softmax(logits, dim=-1)[window[t]].item()
                count += 1
    return math.exp(nll / count)


def test_perplexity_matches_naive_loop(tiny_llama, stream):
    expected = naive_perplexity(tiny_llama, stream, ctx=24, n_windows=3)
    got = perplexity(tiny_llama, stream, ctx=24, n_windows=3, progress=False)
    assert got == pytest.approx(expected, rel=1e-5)
    assert got > 1.5  # the scaled head is far from uniform: a degenerate score would not pass the naive check


def test_perplexity_accepts_batch_row_and_list(tiny_llama, stream):
    flat = perplexity(tiny_llama, stream, ctx=24, n_windows=2, progress=False)
    assert perplexity(tiny_llama, stream.unsqueeze(0), ctx=24, n_windows=2, progress=False) == flat
    assert perplexity(tiny_llama, stream.tolist(), ctx=24, n_windows=2, progress=False) == flat


def test_perplexity_windows_do_not_overlap(tiny_llama, stream):
    """Window 2 alone must equal the naive score of tokens [ctx, 2ctx), so windows start at multiples of ctx."""
    two = perplexity(tiny_llama, stream, ctx=20, n_windows=2, progress=False)
    one = perplexity(tiny_llama, stream, ctx=20, n_windows=1, progress=False)
    second = naive_perplexity(tiny_llama, stream[20:40], ctx=20, n_windows=1)
    assert two == pytest.approx(math.exp((math.log(one) + math.log(second)) / 2), rel=1e-5)


def test_short_stream_uses_available_windows(tiny_llama, stream):
    ctx = 60  # 150 tokens hold two full windows
    assert perplexity(tiny_llama, stream, ctx=ctx, n_windows=5, progress=False) == \
        perplexity(tiny_llama, stream, ctx=ctx, n_windows=2, progress=False)


def test_restores_training_mode(tiny_llama, stream):
    tiny_llama.train()
    try:
        perplexity(tiny_llama, stream, ctx=24, n_windows=1, progress=False)
        assert tiny_llama.training
    finally:
        tiny_llama.eval()


@pytest.mark.parametrize("ctx,chunk", [(48, 16), (40, 16), (30, 1), (30, 64)])
def test_chunked_perplexity_matches_naive_loop(tiny_llama, stream, ctx, chunk):
    expected = naive_perplexity(tiny_llama, stream, ctx=ctx, n_windows=2)
    got = chunked_perplexity(tiny_llama, stream, ctx=ctx, chunk=chunk, n_windows=2, make_cache=DynamicCache,
                             progress=False)
    assert got == pytest.approx(expected, rel=1e-5)


def test_chunked_perplexity_uses_a_fresh_cache_per_window(tiny_llama, stream):
    made = []

    def make_cache():
        made.append(DynamicCache())
        return made[-1]

    chunked_perplexity(tiny_llama, stream, ctx=32, chunk=8, n_windows=3, make_cache=make_cache, progress=False)
    assert len(made) == 3
    assert all(cache.get_seq_length() == 32 for cache in made)


@pytest.mark.parametrize("kwargs,message", [
    (dict(ctx=1), "ctx must be"),
    (dict(ctx=24, n_windows=0), "n_windows must be"),
    (dict(ctx=200), "fewer than one window"),
])
def test_perplexity_rejects_bad_arguments(tiny_llama, stream, kwargs, message):
    with pytest.raises(ValueError, match=message):
        perplexity(tiny_llama, stream, progress=False, **kwargs)


def test_perplexity_rejects_bad_ids(tiny_llama):
    with pytest.raises(ValueError, match="one token stream"):
        perplexity(tiny_llama, torch.zeros(2, 30, dtype=torch.long), ctx=10, progress=False)
    with pytest.raises(ValueError, match="integer token ids"):
        perplexity(tiny_llama, torch.zeros(30), ctx=10, progress=False)


def test_chunked_rejects_bad_chunk(tiny_llama, stream):
    with pytest.raises(ValueError, match="chunk must be"):
        chunked_perplexity(tiny_llama, stream, ctx=24, chunk=0, progress=False)


def test_cli_missing_model_dir_exits_2_without_traceback(tmp_path):
    data = tmp_path / "text.raw"
    data.write_text("some text")
    result = subprocess.run([sys.executable, "-m", "quantize.evaluate", "--model", str(tmp_path / "nope"),
                             "--data", str(data)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "model directory not found" in lines[0]


@pytest.mark.parametrize("data_name,extra,message", [
    ("missing.raw", [], "data file not found"),
    ("text.raw", ["--ctx", "1"], "--ctx must be"),
    ("text.raw", ["--windows", "0"], "--windows must be"),
    ("binary.raw", [], "is not UTF-8 text"),
])
def test_cli_bad_input(tmp_path, capsys, data_name, extra, message):
    (tmp_path / "text.raw").write_text("some text")
    (tmp_path / "binary.raw").write_bytes(b"\xff\xfe\x00text")
    assert main(["--model", str(tmp_path), "--data", str(tmp_path / data_name)] + extra) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
