"""The real SmolLM2-135M weights in the Qwen v1 layout: strict loading, its own tokenizer, a sensible chat answer."""
import torch

from qwen_model import load_tokenizer
from qwen_model.modeling_qwen import QWenLMHeadModel


def test_real_checkpoint_loads_strictly_with_its_tokenizer(smollm2_dir):
    model, info = QWenLMHeadModel.from_pretrained(smollm2_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tok = load_tokenizer(smollm2_dir)
    assert type(tok).__name__ != "QWenTokenizer" and tok.vocab_size == model.config.vocab_size == 49152
    response, history = model.eval().chat(tok, "What is the capital of France?", history=None, max_new_tokens=24,
                                          do_sample=False)
    assert "Paris" in response, response
    with torch.no_grad():
        cached = model.generate(torch.tensor([tok.encode("The history of Paris")]), max_new_tokens=12,
                                do_sample=False)
        uncached = model.generate(cached[:, :-12], max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
