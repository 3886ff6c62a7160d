"""Chat helpers of the original Qwen release: chatml context building, stop words and response decoding."""
import logging

logger = logging.getLogger(__name__)

DEFAULT_SYSTEM = "You are a helpful assistant."

# The chat format of `make_context` as a Jinja chat template (what transformers' `apply_chat_template` and
# OpenAI-style servers such as vLLM render): an optional leading system message (default DEFAULT_SYSTEM, as `chat()`
# uses), then every turn as `<|im_start|>{role}\n{content}<|im_end|>`, joined by newlines. Unlike `make_context` it
# neither drops old turns to fit a window nor keeps special-token text typed by a user out of the control tokens.
CHATML_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system = '" + DEFAULT_SYSTEM + "' -%}{%- set turns = messages -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>system\\n' + system + '<|im_end|>' -}}"
    "{%- for message in turns -%}"
    "{{- '\\n<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '\\n<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def _plain_ids(tokenizer, text: str) -> list[int]:
    """Ids of untrusted text with special-token strings kept as plain text (never control tokens)."""
    if hasattr(tokenizer, "encode_plain"):
        return tokenizer.encode_plain(text)
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def _chatml_ids(tokenizer) -> tuple[int, int]:
    im_start = getattr(tokenizer, "im_start_id", None)
    im_end = getattr(tokenizer, "im_end_id", None)
    if im_start is None or im_end is None:
        im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        unk = getattr(tokenizer, "unk_token_id", None)
        if not isinstance(im_start, int) or not isinstance(im_end, int) or unk in (im_start, im_end):
            raise ValueError("this tokenizer has no <|im_start|>/<|im_end|> tokens; chatml needs them")
    return im_start, im_end


def make_context(tokenizer, query: str, history=None, system: str = "", max_window_size: int = 6144,
                 chat_format: str = "chatml"):
    """Build `(raw_text, context_tokens)` for a chat turn, oldest history dropped first to fit `max_window_size`.

    User, system and history text is encoded with no special tokens allowed, so typing `<|im_end|>` cannot close
    a turn.
    """
    history = history or []
    if chat_format == "raw":
        return query, _plain_ids(tokenizer, query)
    if chat_format != "chatml":
        raise ValueError(f"unknown chat format {chat_format!r} (expected 'chatml' or 'raw')")
    im_start, im_end = "<|im_start|>", "<|im_end|>"
    start_id, end_id = _chatml_ids(tokenizer)
    im_start_tokens, im_end_tokens = [start_id], [end_id]
    nl_tokens = _plain_ids(tokenizer, "\n")

    def _tokenize_str(role, content):
        return f"{role}\n{content}", _plain_ids(tokenizer, role) + nl_tokens + _plain_ids(tokenizer, content)

    system_text, system_tokens_part = _tokenize_str("system", system)
    system_tokens = im_start_tokens + system_tokens_part + im_end_tokens
    raw_text, context_tokens = "", []
    for turn_query, turn_response in reversed(history):
        query_text, query_tokens_part = _tokenize_str("user", turn_query)
        response_text, response_tokens_part = _tokenize_str("assistant", turn_response)
        next_context_tokens = (nl_tokens + im_start_tokens + query_tokens_part + im_end_tokens + nl_tokens
                               + im_start_tokens + response_tokens_part + im_end_tokens)
        prev_chat = f"\n{im_start}{query_text}{im_end}\n{im_start}{response_text}{im_end}"
        if len(system_tokens) + len(next_context_tokens) + len(context_tokens) >= max_window_size:
            break
        context_tokens = next_context_tokens + context_tokens
        raw_text = prev_chat + raw_text
    context_tokens = system_tokens + context_tokens
    raw_text = f"{im_start}{system_text}{im_end}" + raw_text
    context_tokens += (nl_tokens + im_start_tokens + _tokenize_str("user", query)[1] + im_end_tokens + nl_tokens
                       + im_start_tokens + _plain_ids(tokenizer, "assistant") + nl_tokens)
    raw_text += f"\n{im_start}user\n{query}{im_end}\n{im_start}assistant\n"
    return raw_text, context_tokens


def get_stop_words_ids(chat_format: str, tokenizer) -> list[list[int]]:
    """Token sequences that end a response: `<|im_end|>` and `<|im_start|>` for chatml."""
    if chat_format == "raw":
        return [tokenizer.encode("Human:"), [tokenizer.eos_token_id]]
    if chat_format == "chatml":
        start_id, end_id = _chatml_ids(tokenizer)
        return [[end_id], [start_id]]
    raise ValueError(f"unknown chat format {chat_format!r} (expected 'chatml' or 'raw')")


def decode_tokens(tokens, tokenizer, raw_text_len: int, context_length: int, chat_format: str = "chatml",
                  verbose: bool = False, errors: str = "replace") -> str:
    """The response text: tokens after the context, up to the first end-of-turn or end-of-text token."""
    tokens = [int(t) for t in tokens]
    if chat_format == "chatml":
        stop_ids = {*_chatml_ids(tokenizer), tokenizer.eos_token_id}
    elif chat_format == "raw":
        stop_ids = {tokenizer.eos_token_id}
    else:
        raise ValueError(f"unknown chat format {chat_format!r} (expected 'chatml' or 'raw')")
    end = len(tokens)
    for i in range(context_length, len(tokens)):
        if tokens[i] in stop_ids:
            end = i
            break
    response = tokenizer.decode(tokens[context_length:end], skip_special_tokens=False).strip()
    if verbose:
        logger.info("raw generation: %s", tokenizer.decode(tokens))
    return response
