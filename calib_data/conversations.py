"""Qwen conversation JSON (``[{"id", "conversations": [{"from", "value"}]}]``) as chatml calibration samples.

The token layout follows Qwen's own fine-tuning / GPTQ recipe, so a chat model is calibrated on exactly what it
sees at inference:

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{value}<|im_end|>\\n<|im_start|>assistant\\n...

Each block is ``im_start + encode(role) + encode("\\n") + encode(value) + im_end + encode("\\n")``; the message
text is encoded as plain text, so a literal ``"<|im_end|>"`` inside a message never becomes the control token.
"""
import logging

from calib_data.tokenization import chat_marker_ids, encode_text

logger = logging.getLogger(__name__)

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
ROLES = ("system", "user", "assistant")


def validate_conversations(data, origin: str) -> list[list[dict]]:
    """Check the conversation schema and return each record's message list; ``origin`` names the source in errors."""
    if not isinstance(data, list):
        raise ValueError(f"{origin}: expected a JSON list of conversation records, got {type(data).__name__}")
    if not data:
        raise ValueError(f"{origin}: no conversations")
    conversations = []
    for index, record in enumerate(data):
        where = f"{origin}: record {index}"
        if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
            raise ValueError(f"{where} has no 'conversations' list")
        messages = record["conversations"]
        if not messages:
            raise ValueError(f"{where} has an empty 'conversations' list")
        for position, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("from") not in ROLES:
                raise ValueError(f"{where}, message {position}: 'from' must be one of {', '.join(ROLES)}")
            if not isinstance(message.get("value"), str):
                raise ValueError(f"{where}, message {position}: 'value' must be a string")
        conversations.append(messages)
    return conversations


def encode_conversation(tokenizer, messages: list[dict], default_system: str = DEFAULT_SYSTEM_PROMPT) -> list[int]:
    """Chatml token ids of one conversation.

    A leading system message replaces ``default_system``. As in Qwen's recipe, a conversation whose first
    non-system message is not from the user loses that first message.
    """
    im_start, im_end = chat_marker_ids(tokenizer)
    newline = encode_text(tokenizer, "\n")
    system = default_system
    if messages and messages[0]["from"] == "system":
        system, messages = messages[0]["value"], messages[1:]
    if messages and messages[0]["from"] != "user":
        messages = messages[1:]

    def block(role: str, text: str) -> list[int]:
        return [im_start] + encode_text(tokenizer, role) + newline + encode_text(tokenizer, text) + [im_end] + newline

    ids = block("system", system)
    for message in messages:
        ids += block(message["from"], message["value"])
    return ids


def conversation_samples(tokenizer, conversations: list[list[dict]], nsamples: int, seqlen: int) -> list[list[int]]:
    """The first ``nsamples`` conversations as chatml token ids, each truncated to ``seqlen``."""
    if len(conversations) < nsamples:
        logger.info("only %d conversations available, fewer than the %d samples asked for",
                    len(conversations), nsamples)
    return [encode_conversation(tokenizer, messages)[:seqlen] for messages in conversations[:nsamples]]
