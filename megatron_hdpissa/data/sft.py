"""Supervised fine-tuning examples: JSONL prompt/response records, prompt templates, tokenisation and loss-masked rows.

Flow: `read_jsonl_examples` -> `SFTDataset` (prompt template, tokenise, truncate; `build_row`
lays examples out as one row) -> `megatron_hdpissa.data.batches.SFTBatchIterator` (micro-batches).
Multi-turn chat records are tokenised by `megatron_hdpissa.data.chat` into the same dataset.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Sequence

import torch

from megatron_hdpissa.data.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# The template of the PiSSA / HD-PiSSA reference code (Stanford Alpaca, no-input variant).
ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{prompt}\n\n### Response:"
)
# Stanford Alpaca's variant for records with a non-empty `input`.
ALPACA_INPUT_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{prompt}\n\n### Input:\n{input}\n\n### Response:"
)


# --prompt-template names besides a format string with {prompt}.
ALPACA, CHAT = "alpaca", "chat"
PROMPT_TEMPLATES = (ALPACA, CHAT)


class DataError(ValueError):
    """Bad training data; the message names the file (and line) at fault."""


@dataclass(frozen=True)
class SFTExample:
    prompt: str
    response: str
    input: str = ""


@dataclass(frozen=True)
class TokenizedExample:
    ids: list[int]  # [BOS] + prompt + response + [EOS], at most seq_length + 1 long
    num_prompt: int  # leading ids that are not supervised (BOS and the rendered prompt)
    # Per id, whether it is a supervised label (multi-turn chat: every assistant turn, see
    # data/chat.py); None: exactly ids[num_prompt:] are. Either way the last id is supervised.
    supervised: tuple[bool, ...] | None = None

    def truncated(self, length: int) -> "TokenizedExample":
        """The first `length` ids, then (per-token mask) cut after the last supervised one left."""
        if self.supervised is None:
            return TokenizedExample(self.ids[:length], self.num_prompt)
        keep = self.supervised[:length]
        end = max((j + 1 for j in range(len(keep)) if keep[j]), default=0)
        return TokenizedExample(self.ids[:end], self.num_prompt, keep[:end])

    def usable(self) -> bool:
        """At least one label (ids[1:]) is supervised."""
        if self.supervised is None:
            return len(self.ids) >= max(self.num_prompt + 1, 2)
        return any(self.supervised[1:])


# ---------------------------------------------------------------------------------------------
# Reading


def jsonl_records(path: str):
    """(`path:line`, parsed value) per non-blank line of a JSONL file; a line that is not UTF-8 or
    not JSON is a `DataError` naming the file and line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8 ({e.reason})") from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            yield where, value


def read_jsonl_examples(
    path: str,
    prompt_field: str = "question",
    response_field: str = "answer",
    input_field: str | None = None,
) -> list[SFTExample]:
    """Read one JSON object per line; blank lines are skipped, anything else malformed is an error.

    `input_field` (Alpaca's `input`) is optional per record: missing or null reads as "".
    """
    examples = []
    for where, record in jsonl_records(path):
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        values = []
        for role, name in (("prompt", prompt_field), ("response", response_field), ("input", input_field)):
            if role == "input":
                value = record.get(name) if name else None
                value = "" if value is None else value
            elif name not in record:
                raise DataError(
                    f"{where}: missing {role} field {name!r} (--{role}-field); keys are {sorted(record)}"
                )
            else:
                value = record[name]
            if not isinstance(value, str):
                raise DataError(f"{where}: {role} field {name!r} must be a string, got {type(value).__name__}")
            values.append(value)
        examples.append(SFTExample(*values))
    if not examples:
        raise DataError(f"{path}: no examples (the file holds no JSON lines)")
    return examples


def write_jsonl(records: Sequence[dict], path: str) -> None:
    """Write one JSON object per line, atomically (written aside, then renamed)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Templates and tokenisation


def check_template(template: str) -> None:
    if template not in PROMPT_TEMPLATES and "{prompt}" not in template:
        raise ValueError(
            f"prompt template {template!r} must be 'alpaca', 'chat' or a format string containing {{prompt}}"
        )


def render(example: SFTExample, template: str, tokenizer: Tokenizer) -> tuple[str, str]:
    """Return (prompt text, response text) for one example under `template`.

    'alpaca': the PiSSA/Alpaca template; 'chat': the tokenizer's chat template with one user and one
    assistant turn (the response text is what the template renders after the generation prompt,
    end-of-turn markers included); otherwise a format string with `{prompt}` and optionally `{input}`.
    """
    if template == CHAT:
        user = example.prompt + (f"\n\n{example.input}" if example.input else "")
        turns = [{"role": "user", "content": user}]
        prompt = tokenizer.apply_chat_template(turns, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(turns + [{"role": "assistant", "content": example.response}])
        if not full.startswith(prompt):
            raise ValueError(
                f"the chat template of {tokenizer.path!r} does not render the generation prompt as a "
                "prefix of the conversation, so the response cannot be separated; use another template"
            )
        return prompt, full[len(prompt):]
    if template == ALPACA:
        text = ALPACA_INPUT_TEMPLATE if example.input else ALPACA_TEMPLATE
        return text.replace("{input}", example.input).replace("{prompt}", example.prompt), example.response
    check_template(template)
    prompt = example.prompt
    if example.input and "{input}" not in template:
        prompt = f"{prompt}\n\n{example.input}"
    # str.replace rather than str.format: templates and texts may hold literal braces.
    return template.replace("{input}", example.input).replace("{prompt}", prompt), example.response


def tokenize_example(
    tokenizer: Tokenizer, prompt: str, response: str, add_bos: bool, chat: bool = False
) -> TokenizedExample:
    """Prompt and response are encoded separately, so the loss boundary is exact by construction.

    EOS follows the response; under a chat template whose end-of-turn token is EOS the rendered
    response already ends with it, and nothing after it is kept.
    """
    prompt_ids = tokenizer.encode(prompt)
    if add_bos and tokenizer.bos_id is not None and prompt_ids[:1] != [tokenizer.bos_id]:
        prompt_ids = [tokenizer.bos_id] + prompt_ids
    response_ids = tokenizer.encode(response)
    if chat and tokenizer.eos_id in response_ids:
        last = len(response_ids) - 1 - response_ids[::-1].index(tokenizer.eos_id)
        response_ids = response_ids[: last + 1]
    else:
        response_ids = response_ids + [tokenizer.eos_id]
    return TokenizedExample(prompt_ids + response_ids, len(prompt_ids))


class SFTDataset:
    """Tokenised examples, each truncated to seq_length + 1 ids (seq_length after the label shift)."""

    def __init__(
        self,
        examples: Sequence[SFTExample | TokenizedExample],
        tokenizer: Tokenizer,
        seq_length: int,
        template: str = ALPACA,
        add_bos: bool | None = None,
        source: str = "<examples>",
    ):
        """`add_bos=None` follows the tokenizer (`tokenizer.add_bos`); a chat template that renders
        BOS itself never gets a second one. `source` names the data in messages."""
        if seq_length < 2:
            raise ValueError(f"--seq-length must be at least 2, got {seq_length}")
        check_template(template)
        self.tokenizer = tokenizer
        self.seq_length = seq_length
        self.source = source
        add_bos = tokenizer.add_bos if add_bos is None else add_bos
        self.examples: list[TokenizedExample] = []
        self.num_truncated = 0
        self.num_dropped = 0
        for example in examples:
            if isinstance(example, TokenizedExample):  # already rendered and tokenised (data/chat.py)
                tokenized = example
            else:
                prompt, response = render(example, template, tokenizer)
                tokenized = tokenize_example(tokenizer, prompt, response, add_bos, chat=template == CHAT)
            if len(tokenized.ids) > seq_length + 1:
                self.num_truncated += 1
                tokenized = tokenized.truncated(seq_length + 1)
            if not tokenized.usable():
                self.num_dropped += 1
                continue
            self.examples.append(tokenized)
        if self.num_truncated:
            logger.warning(
                "%s: %d of %d examples exceed --seq-length %d (+1 for the label shift) and were truncated",
                source, self.num_truncated, len(examples), seq_length,
            )
        if self.num_dropped:
            logger.warning(
                "%s: %d examples kept no response token within --seq-length %d and were dropped",
                source, self.num_dropped, seq_length,
            )
        if not self.examples:
            raise DataError(
                f"{source}: no usable examples ({len(examples)} read, {self.num_dropped} dropped as their "
                f"prompt fills --seq-length {seq_length})"
            )

    @classmethod
    def from_jsonl(
        cls,
        path: str,
        tokenizer: Tokenizer,
        seq_length: int,
        prompt_field: str = "question",
        response_field: str = "answer",
        input_field: str | None = None,
        template: str = ALPACA,
        add_bos: bool | None = None,
    ) -> "SFTDataset":
        examples = read_jsonl_examples(path, prompt_field, response_field, input_field)
        return cls(examples, tokenizer, seq_length, template, add_bos, source=path)

    def __len__(self) -> int:
        return len(self.examples)

    def row_length(self, indices: Sequence[int]) -> int:
        """Positions the examples `indices` take up back to back in one row."""
        return sum(len(self.examples[i].ids) - 1 for i in indices)

    def build_row(self, indices: Sequence[int], length: int | None = None) -> dict[str, torch.Tensor]:
        """One row of `length` (default seq_length) positions holding the examples `indices` back
        to back, then padding.

        Packed examples are separated in the labels, loss mask and position ids; a plain causal
        mask would still let a token attend to earlier examples of the row, so the trainer passes
        `data.batches.attention_mask(batch)`, built from `document_ids`.
        """
        s, pad = self.seq_length if length is None else length, self.tokenizer.pad_id
        if self.row_length(indices) > s:
            limit = f"--seq-length {s}" if length is None else f"{s}"
            raise ValueError(f"examples {list(indices)} need more than {limit} positions")
        tokens = torch.full((s,), pad, dtype=torch.int64)
        labels = torch.full((s,), pad, dtype=torch.int64)
        loss_mask = torch.zeros(s, dtype=torch.float32)
        position_ids = torch.zeros(s, dtype=torch.int64)
        document_ids = torch.full((s,), len(indices), dtype=torch.int64)
        offset, n = 0, 0
        for doc, index in enumerate(indices):
            example = self.examples[index]
            n = len(example.ids) - 1
            ids = torch.tensor(example.ids, dtype=torch.int64)
            tokens[offset : offset + n] = ids[:-1]
            labels[offset : offset + n] = ids[1:]
            if example.supervised is None:
                loss_mask[offset + max(example.num_prompt - 1, 0) : offset + n] = 1.0
            else:
                loss_mask[offset : offset + n] = torch.tensor(example.supervised[1:], dtype=torch.float32)
            position_ids[offset : offset + n] = torch.arange(n)
            document_ids[offset : offset + n] = doc
            offset += n
        # Padding continues the last example's positions (so an unpacked row is arange(s)).
        position_ids[offset:] = torch.arange(n, n + s - offset)
        return dict(
            tokens=tokens, labels=labels, loss_mask=loss_mask, position_ids=position_ids,
            document_ids=document_ids,
        )
