"""Multi-turn chat data: JSONL records of `messages` rendered with the tokenizer's own chat template,
loss on every assistant turn (its content and its end-of-turn token) and nothing else.

Records (one JSON object per line) hold either OpenAI-style `messages: [{role, content}]` (roles
system / user / assistant) or ShareGPT's `conversations: [{from, value}]` (from human / gpt /
system; user / assistant accepted too); both read as the same conversation.

Masking: the whole conversation is rendered once and tokenised once (the text a serving stack
renders for the same history). Assistant turn i's supervised characters start where its content
starts: messages[:i] plus an assistant turn holding a sentinel are rendered, and the text before the
sentinel (the history and the role header, i.e. the generation prompt) is never supervised. They
end with the first special token after the content (the end-of-turn marker, e.g. ChatML's
<|im_end|>) within the rendering of messages[:i + 1]; text the template adds after it (a newline)
is not supervised, and a template that adds no marker at all is refused. A token is
supervised when its characters overlap a supervised span; so where BPE merges across a boundary
(e.g. "\\n" of the header with leading whitespace of the content) the merged token is supervised,
as in transformers' `return_assistant_tokens_mask`. Ids after the last supervised one are dropped.
"""
from __future__ import annotations

import bisect
import json
from dataclasses import dataclass

from megatron_hdpissa.data.sft import ALPACA, CHAT, DataError, SFTDataset, TokenizedExample, jsonl_records
from megatron_hdpissa.data.tokenizer import Tokenizer

# --data-format values: `auto` reads a file whose first record holds `messages` or `conversations`
# as chat data, anything else as prompt/response records.
AUTO, PROMPT_RESPONSE, MESSAGES = "auto", "prompt-response", "messages"
DATA_FORMATS = (AUTO, PROMPT_RESPONSE, MESSAGES)
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
SENTINEL = "<<megatron_hdpissa: assistant content>>"  # rendered in place of a turn's content to find its header
# (list field, role key, content key, role names)
STYLES = (("messages", "role", "content", {r: r for r in ROLES}), ("conversations", "from", "value", SHAREGPT_ROLES))


@dataclass(frozen=True)
class Conversation:
    messages: tuple[dict, ...]  # {"role", "content"} in OpenAI's names
    where: str  # "file:line", for messages


def parse_record(record, where: str) -> Conversation:
    """One JSONL record as a conversation; a bad record is a DataError naming `where`."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    style = next((s for s in STYLES if s[0] in record), None)
    if style is None:
        raise DataError(f"{where}: a chat record needs a 'messages' (OpenAI) or 'conversations' (ShareGPT) "
                        f"list; keys are {sorted(record)}")
    field, role_key, content_key, names = style
    turns = record[field]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: {field!r} must be a non-empty list of turns")
    messages = []
    for n, turn in enumerate(turns):
        at = f"{where}: {field}[{n}]"
        if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
            raise DataError(f"{at} must be an object with {role_key!r} and {content_key!r}")
        role, content = turn[role_key], turn[content_key]
        if role not in names:
            raise DataError(f"{at}: bad {role_key} {role!r}; expected one of {sorted(names)}")
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                             and isinstance(p.get("text"), str) for p in content):
            content = "".join(p["text"] for p in content)  # OpenAI's content parts, text only
        if not isinstance(content, str):
            raise DataError(f"{at}: {content_key!r} must be a string or a list of text parts "
                            f"({{'type': 'text', 'text': ...}}), got {json.dumps(content)[:80]}")
        messages.append({"role": names[role], "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant turn, so nothing would be supervised")
    return Conversation(tuple(messages), where)


def read_chat_jsonl(path: str) -> list[Conversation]:
    """Every conversation of a chat JSONL file; blank lines skipped, errors name `file:line`."""
    conversations = []
    for where, record in jsonl_records(path):
        conversations.append(parse_record(record, where))
    if not conversations:
        raise DataError(f"{path}: no examples (the file holds no JSON lines)")
    return conversations


def is_chat_file(path: str) -> bool:
    """Whether the first record of `path` holds `messages` or `conversations` (--data-format auto);
    a file whose first line does not parse is left to the reader that reports it."""
    try:
        for _, record in jsonl_records(path):
            return isinstance(record, dict) and any(s[0] in record for s in STYLES)
    except DataError:
        return False
    return False


def _render(tokenizer: Tokenizer, messages, where: str) -> str:
    try:
        return tokenizer.apply_chat_template(list(messages))
    except Exception as e:  # noqa: BLE001 - jinja's TemplateError and raise_exception, named with the line
        raise DataError(f"{where}: the chat template of {tokenizer.path!r} cannot render this conversation "
                        f"({type(e).__name__}: {e})") from e


def supervised_spans(tokenizer: Tokenizer, conversation: Conversation) -> tuple[str, list[tuple[int, int, int]]]:
    """(rendered conversation, per assistant turn (start, content end, turn end) character offsets):
    supervision starts at `start` and ends with the end-of-turn marker, searched from `content end`
    up to `turn end`. The turn's header and tail are what the template renders around a sentinel
    content in the same place, so no search for the content (which may also occur in a header or
    be trimmed by the template) is needed."""
    messages, where = conversation.messages, conversation.where
    full = _render(tokenizer, messages, where)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        probe = _render(tokenizer, messages[:i] + ({"role": "assistant", "content": SENTINEL},), where)
        through = _render(tokenizer, messages[: i + 1], where)
        start = probe.find(SENTINEL)
        tail = probe[start + len(SENTINEL):]
        if start < 0 or not (full.startswith(probe[:start]) and full.startswith(through) and through.endswith(tail)
                             and len(through) - len(tail) >= start):
            raise DataError(
                f"{where}: the chat template of {tokenizer.path!r} does not render assistant turn {i} the same way "
                "inside the whole conversation as on its own (header, content, end of turn), so the turn cannot be "
                "located; use prompt/response data with another --prompt-template")
        spans.append((start, len(through) - len(tail), len(through)))
    return full, spans


def tokenize_conversation(tokenizer: Tokenizer, conversation: Conversation, add_bos: bool) -> TokenizedExample:
    """Ids of the rendered conversation and, per id, whether it is supervised (see the module)."""
    full, spans = supervised_spans(tokenizer, conversation)
    ids, offsets = tokenizer.encode_with_offsets(full)
    special = tokenizer.special_ids()
    supervised = [False] * len(ids)
    # Offsets never decrease along the ids, so each turn's tokens are found by bisection (linear in
    # the conversation, not in turns x tokens); a zero-width token counts as one character wide.
    starts, ends = [s for s, _ in offsets], [max(e, s + 1) for s, e in offsets]
    for start, content_end, turn_end in spans:
        j = bisect.bisect_left(starts, content_end)
        while j < len(ids) and ends[j] <= turn_end and ids[j] not in special:
            j += 1
        end = ends[j] if j < len(ids) and ends[j] <= turn_end else None
        if end is None:  # no special token closes the turn: its text up to trailing whitespace
            end = content_end + len(full[content_end:turn_end].rstrip())
            if end == content_end:
                raise DataError(
                    f"{conversation.where}: the chat template of {tokenizer.path!r} renders nothing after the "
                    "assistant content (no end-of-turn marker), so the model would never learn to stop")
        for j in range(bisect.bisect_right(ends, start), bisect.bisect_left(starts, end)):
            supervised[j] = True  # its characters overlap [start, end)
    if add_bos and tokenizer.bos_id is not None and ids[:1] != [tokenizer.bos_id]:
        ids, supervised = [tokenizer.bos_id] + ids, [False] + supervised
    if not any(supervised):
        raise DataError(f"{conversation.where}: no token of an assistant turn survives tokenisation")
    last = len(supervised) - supervised[::-1].index(True)
    return TokenizedExample(ids[:last], supervised.index(True), tuple(supervised[:last]))


def chat_dataset(path: str, tokenizer: Tokenizer, seq_length: int, add_bos: bool | None = None) -> SFTDataset:
    """An SFTDataset of the conversations in `path` (batching, packing and truncation as for
    prompt/response data). `add_bos=None` follows the tokenizer; a template that renders BOS
    itself never gets a second one."""
    if not tokenizer.has_chat_template:
        raise DataError(f"{path} holds chat messages, which are rendered with the tokenizer's chat template, but "
                        f"--tokenizer-model {tokenizer.path!r} has none; use a HuggingFaceTokenizer that defines one")
    add_bos = tokenizer.add_bos if add_bos is None else add_bos
    examples = [tokenize_conversation(tokenizer, c, add_bos) for c in read_chat_jsonl(path)]
    return SFTDataset(examples, tokenizer, seq_length, source=path)


def resolve_format(path: str, data_format: str) -> str:
    if data_format not in DATA_FORMATS:
        raise ValueError(f"--data-format {data_format!r}: choose one of {DATA_FORMATS}")
    if data_format == AUTO:
        return MESSAGES if is_chat_file(path) else PROMPT_RESPONSE
    return data_format


def load_sft_jsonl(path: str, tokenizer: Tokenizer, seq_length: int, data_format: str = AUTO,
                   template: str = ALPACA, **fields) -> SFTDataset:
    """The trainer's data: chat conversations or prompt/response records (`fields`: the
    --prompt-field / --response-field / --input-field names) by `--data-format`."""
    if resolve_format(path, data_format) == PROMPT_RESPONSE:
        return SFTDataset.from_jsonl(path, tokenizer, seq_length, template=template, **fields)
    if template not in (ALPACA, CHAT):  # alpaca is the default; chat is what messages data gets anyway
        raise ValueError(f"--prompt-template {template!r} does not apply to {path} (messages data): conversations "
                         "are rendered with the tokenizer's chat template")
    return chat_dataset(path, tokenizer, seq_length)
