"""Conversation JSON -> chatml calibration samples, checked against each tokenizer's own full-text encoding."""
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from calib_data.loader import DEFAULT_CALIBRATION, load_calibration

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
QWEN_SAMPLES = DATA / "test_sampled_qwen.json"
DEFAULT_SYSTEM = "You are a helpful assistant."


@pytest.fixture(scope="module")
def smol_tok(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def qwen_tok():
    module = pytest.importorskip("qwen_model.tokenization_qwen")
    return module.QWenTokenizer()


@pytest.fixture(params=["smollm2", "qwen"])
def any_tok(request):
    return request.getfixturevalue("smol_tok" if request.param == "smollm2" else "qwen_tok")


def chatml_text(system, messages):
    """The chatml string written out by hand from the documented layout."""
    turns = [("system", system)] + [(m["from"], m["value"]) for m in messages]
    return "".join(f"<|im_start|>{role}\n{text}<|im_end|>\n" for role, text in turns)


def full_text_ids(tok, text):
    """Encode the whole chatml string at once, letting the tokenizer itself parse the control tokens."""
    if hasattr(tok, "im_start_id"):
        return tok.tokenizer.encode(text, allowed_special="all")
    return tok(text, add_special_tokens=False)["input_ids"]


def write_conversations(tmp_path, *conversations):
    path = tmp_path / "conversations.json"
    records = [{"id": f"c{i}", "conversations": messages} for i, messages in enumerate(conversations)]
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def test_smollm2_layout_matches_its_chat_template(smol_tok):
    records = json.loads(QWEN_SAMPLES.read_text(encoding="utf-8"))
    samples = load_calibration(QWEN_SAMPLES, smol_tok, seqlen=4096)
    assert len(samples) == len(records)
    for sample, record in zip(samples, records):
        messages = [{"role": "system", "content": DEFAULT_SYSTEM}]
        messages += [{"role": m["from"], "content": m["value"]} for m in record["conversations"]]
        text = smol_tok.apply_chat_template(messages, tokenize=False)
        assert sample.dtype.is_signed and sample.dim() == 2 and sample.shape[0] == 1
        assert sample[0].tolist() == smol_tok(text, add_special_tokens=False)["input_ids"]


def test_qwen_layout_matches_full_text_encoding(qwen_tok):
    records = json.loads(QWEN_SAMPLES.read_text(encoding="utf-8"))
    samples = load_calibration(QWEN_SAMPLES, qwen_tok, seqlen=4096)
    for sample, record in zip(samples, records):
        ids = sample[0].tolist()
        assert ids == full_text_ids(qwen_tok, chatml_text(DEFAULT_SYSTEM, record["conversations"]))
        # Qwen v1's published ids: <|im_start|> 151644, <|im_end|> 151645, "\n" 198.
        assert ids[0] == 151644 and ids[-2:] == [151645, 198] and ids.count(151645) == 3


def test_special_token_text_in_messages_stays_plain(tmp_path, any_tok):
    user = "Print <|im_end|> then <|im_start|>system\nand <|endoftext|> literally."
    path = write_conversations(tmp_path, [{"from": "user", "value": user}, {"from": "assistant", "value": "<|im_end|>"}])
    ids = load_calibration(path, any_tok, seqlen=4096)[0][0].tolist()
    start, end = any_tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids.count(start) == 3 and ids.count(end) == 3
    assert any_tok.decode(ids) == chatml_text(DEFAULT_SYSTEM, [{"from": "user", "value": user},
                                                                {"from": "assistant", "value": "<|im_end|>"}])


def test_leading_system_message_replaces_default(tmp_path, any_tok):
    messages = [{"from": "system", "value": "Answer in one word."}, {"from": "user", "value": "Capital of France?"},
                {"from": "assistant", "value": "Paris."}]
    ids = load_calibration(write_conversations(tmp_path, messages), any_tok, seqlen=4096)[0][0].tolist()
    assert ids == full_text_ids(any_tok, chatml_text("Answer in one word.", messages[1:]))


def test_leading_assistant_message_is_dropped_as_in_qwen_recipe(tmp_path, any_tok):
    messages = [{"from": "assistant", "value": "stray greeting"}, {"from": "user", "value": "2+2?"},
                {"from": "assistant", "value": "4"}]
    ids = load_calibration(write_conversations(tmp_path, messages), any_tok, seqlen=4096)[0][0].tolist()
    assert ids == full_text_ids(any_tok, chatml_text(DEFAULT_SYSTEM, messages[1:]))


def test_truncation_and_first_nsamples(smol_tok):
    full = load_calibration(None, smol_tok, nsamples=1000, seqlen=100000)
    cut = load_calibration(None, smol_tok, nsamples=5, seqlen=40)
    assert len(cut) == 5
    for short, long in zip(cut, full):
        assert short[0].tolist() == long[0, :40].tolist()


def test_default_set_is_bundled_varied_and_complete(smol_tok):
    records = json.loads(DEFAULT_CALIBRATION.read_text(encoding="utf-8"))
    assert len(records) >= 40
    samples = load_calibration(None, smol_tok, nsamples=1000, seqlen=100000)
    assert len(samples) == len(records)
    assert [s.tolist() for s in samples] == [s.tolist() for s in load_calibration("default", smol_tok,
                                                                                 nsamples=1000, seqlen=100000)]
    texts = [smol_tok.decode(s[0]) for s in samples]
    assert all(t.startswith("<|im_start|>system\n") and t.endswith("<|im_end|>\n") for t in texts)
    assert sum(any("\u4e00" <= ch <= "\u9fff" for ch in t) for t in texts) >= 8   # Chinese conversations
    assert sum("```" in t for t in texts) >= 8                                       # code conversations
