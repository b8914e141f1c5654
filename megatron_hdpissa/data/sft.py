"""Supervised fine-tuning data: JSONL prompt/response pairs to loss-masked, sharded, resumable micro-batches.

Flow: `read_jsonl_examples` -> `SFTDataset` (prompt template, tokenise, truncate) ->
`SFTBatchIterator` (per-epoch shuffle, optional packing, shard slicing, micro-batches).

A batch is a dict of torch tensors, each (micro_batch_size, length); `length` is the micro-batch's
longest row rounded up to a multiple of `pad_multiple` and capped at seq_length, or seq_length
itself with `pad_to_max_length`:
  tokens        int64   input ids
  labels        int64   labels[i] = tokens[i + 1] of the same example (Megatron GPT convention)
  loss_mask     float32 1 where the label is a response token or the closing EOS, else 0
  position_ids  int64   0, 1, ... restarting at each packed example
  document_ids  int64   0, 1, ... which example in the row a position belongs to; padding is
                        one more segment after the last example
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Callable, Sequence, TypeVar

import numpy as np
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


# ---------------------------------------------------------------------------------------------
# Reading


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
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
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


# ---------------------------------------------------------------------------------------------
# Templates and tokenisation


def check_template(template: str) -> None:
    if template not in ("alpaca", "chat") and "{prompt}" not in template:
        raise ValueError(
            f"prompt template {template!r} must be 'alpaca', 'chat' or a format string containing {{prompt}}"
        )


def render(example: SFTExample, template: str, tokenizer: Tokenizer) -> tuple[str, str]:
    """Return (prompt text, response text) for one example under `template`.

    'alpaca': the PiSSA/Alpaca template; 'chat': the tokenizer's chat template with one user and one
    assistant turn (the response text is what the template renders after the generation prompt,
    end-of-turn markers included); otherwise a format string with `{prompt}` and optionally `{input}`.
    """
    if template == "chat":
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
    if template == "alpaca":
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
        examples: Sequence[SFTExample],
        tokenizer: Tokenizer,
        seq_length: int,
        template: str = "alpaca",
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
            prompt, response = render(example, template, tokenizer)
            tokenized = tokenize_example(tokenizer, prompt, response, add_bos, chat=template == "chat")
            if len(tokenized.ids) > seq_length + 1:
                self.num_truncated += 1
                tokenized = TokenizedExample(tokenized.ids[: seq_length + 1], tokenized.num_prompt)
            # Usable when at least one label (ids[1:]) is a response token.
            if len(tokenized.ids) < max(tokenized.num_prompt + 1, 2):
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
        template: str = "alpaca",
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

        Packed examples are separated in the labels, loss mask and position ids, but a plain causal
        mask still lets a token attend to earlier examples of the row; build a per-document block
        mask from `document_ids` to prevent that.
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
            loss_mask[offset + max(example.num_prompt - 1, 0) : offset + n] = 1.0
            position_ids[offset : offset + n] = torch.arange(n)
            document_ids[offset : offset + n] = doc
            offset += n
        # Padding continues the last example's positions (so an unpacked row is arange(s)).
        position_ids[offset:] = torch.arange(n, n + s - offset)
        return dict(
            tokens=tokens, labels=labels, loss_mask=loss_mask, position_ids=position_ids,
            document_ids=document_ids,
        )


def padded_length(longest: int, seq_length: int, pad_multiple: int) -> int:
    """`longest` rounded up to a multiple of `pad_multiple`, at least one multiple, at most
    `seq_length`."""
    return min(seq_length, max(1, -(-longest // pad_multiple)) * pad_multiple)


def pad_batch(batch: dict[str, torch.Tensor], length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """`batch` extended with padding to `length` positions, as `SFTDataset.build_row` pads: for a
    caller that needs one shape across micro-batches (a pipeline schedule without
    `variable_seq_lengths`, a comparison across shards)."""
    have = batch["tokens"].shape[1]
    if length < have:
        raise ValueError(f"cannot pad a batch of {have} positions to {length}")
    extra = length - have
    if extra == 0:
        return dict(batch)
    rows = batch["tokens"].shape[0]
    last_pos = batch["position_ids"][:, -1:]
    # A row already ending in padding keeps its padding segment; a full row (its last label is
    # always supervised) gets a new one.
    last_doc = batch["document_ids"][:, -1:] + (batch["loss_mask"][:, -1:] > 0).long()
    tail = dict(
        tokens=torch.full((rows, extra), pad_id, dtype=batch["tokens"].dtype),
        labels=torch.full((rows, extra), pad_id, dtype=batch["labels"].dtype),
        loss_mask=torch.zeros((rows, extra), dtype=batch["loss_mask"].dtype),
        position_ids=last_pos + torch.arange(1, extra + 1),
        document_ids=last_doc.expand(rows, extra),
    )
    return {key: torch.cat([value, tail[key]], dim=1) for key, value in batch.items()}


# ---------------------------------------------------------------------------------------------
# Shuffling, packing, sharding


def pack_greedy(lengths: Sequence[int], order: Sequence[int], capacity: int) -> list[list[int]]:
    """Fill rows of `capacity` positions with examples in `order`, starting a new row when the next
    example does not fit."""
    rows, row, used = [], [], 0
    for index in order:
        if row and used + lengths[index] > capacity:
            rows.append(row)
            row, used = [], 0
        row.append(int(index))
        used += lengths[index]
    if row:
        rows.append(row)
    return rows


class SFTBatchIterator:
    """Micro-batches for one shard (a data-parallel rank, or a virtual rank inside one).

    Each epoch shuffles the examples with seed `seed + epoch` (the same on every shard), groups them
    into rows (one example per row, or packed), and walks the rows in steps of
    `num_shards * micro_batch_size`: shard k takes rows [k*mbs, (k+1)*mbs) of each step, so shards
    are disjoint and all shards yield the same number of micro-batches. With `drop_last` a final
    incomplete step is skipped; without it the step is filled with empty rows (loss mask 0), which
    suits one evaluation pass (`shuffle=False, drop_last=False, num_epochs=1`).

    With `pack=True` a row holds several examples; attention stays causal across them unless the
    caller builds a per-document block mask from the batch's `document_ids`.

    Each micro-batch is as long as its longest row, rounded up to a multiple of `pad_multiple`
    (so TP / sequence-parallel splits and kernels get friendly shapes) and capped at the dataset's
    seq_length; `pad_to_max_length=True` pads every micro-batch to seq_length. Padding comes
    after every real position and carries loss mask 0, so under a causal mask it changes no loss
    or gradient. Packed rows are trimmed the same way (greedy packing leaves most rows nearly
    full, the last ones of an epoch less so). The padding never changes which examples a batch
    holds, so it is not part of the resumable position.

    With `balance_window=W > 1` the rows of W consecutive steps (W micro-batches per shard) are
    dealt out together: longest first, each to the shard with the fewest positions so far that
    still has room, then each shard's rows, longest first, make its W micro-batches. Every shard
    then computes about the same number of positions and similar lengths share a micro-batch, so
    with variable lengths no rank waits for a slower one. Give W = the micro-batches per shard of
    one optimizer step: the step's examples stay the same, only which shard computes which one
    changes. W = 1 keeps the rows in order.

    The position is (epoch, consumed rows over all shards); `state_dict` after a batch, loaded into
    a fresh iterator, yields exactly the batches that would have followed, also with another
    number of shards (with `balance_window` 1; balancing depends on the shard count).
    """

    def __init__(
        self,
        dataset: SFTDataset,
        micro_batch_size: int,
        num_shards: int = 1,
        shard_index: int = 0,
        seed: int = 1234,
        shuffle: bool = True,
        pack: bool = False,
        drop_last: bool = True,
        num_epochs: int | None = None,
        pad_to_max_length: bool = False,
        pad_multiple: int = 8,
        balance_window: int = 1,
    ):
        if micro_batch_size < 1:
            raise ValueError(f"--micro-batch-size must be positive, got {micro_batch_size}")
        if pad_multiple < 1:
            raise ValueError(f"--pad-multiple must be positive, got {pad_multiple}")
        if balance_window < 1:
            raise ValueError(f"balance_window must be positive, got {balance_window}")
        if not 0 <= shard_index < num_shards:
            raise ValueError(f"shard_index {shard_index} outside [0, num_shards={num_shards})")
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.num_shards = num_shards
        self.shard_index = shard_index
        self.seed = seed
        self.shuffle = shuffle
        self.pack = pack
        self.drop_last = drop_last
        self.num_epochs = num_epochs
        self.pad_to_max_length = pad_to_max_length
        self.pad_multiple = pad_multiple
        self.balance_window = balance_window
        self._window_key, self._window = None, None
        self.epoch = 0
        self.consumed = 0
        self._lengths = [len(e.ids) - 1 for e in dataset.examples]
        self._rows_epoch, self._rows = None, None

    @property
    def rows_per_step(self) -> int:
        return self.num_shards * self.micro_batch_size

    def rows(self, epoch: int) -> list[list[int]]:
        """The epoch's rows, each a list of example indices (the same on every shard)."""
        if self._rows_epoch != epoch:
            n = len(self.dataset)
            order = np.random.default_rng(self.seed + epoch).permutation(n) if self.shuffle else np.arange(n)
            if self.pack:
                self._rows = pack_greedy(self._lengths, order, self.dataset.seq_length)
            else:
                self._rows = [[int(i)] for i in order]
            self._rows_epoch = epoch
        return self._rows

    def batches_in_epoch(self, epoch: int) -> int:
        """Micro-batches each shard yields in `epoch` (packing makes it vary between epochs)."""
        num_rows = len(self.rows(epoch))
        if self.drop_last:
            return num_rows // self.rows_per_step
        return -(-num_rows // self.rows_per_step)

    def __iter__(self) -> "SFTBatchIterator":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        while True:
            if self.num_epochs is not None and self.epoch >= self.num_epochs:
                raise StopIteration
            rows = self.rows(self.epoch)
            left = len(rows) - self.consumed
            if left >= self.rows_per_step or (left > 0 and not self.drop_last):
                break
            if self.consumed == 0:
                raise DataError(
                    f"{self.dataset.source}: epoch {self.epoch} has {len(rows)} rows, fewer than one step "
                    f"of {self.num_shards} shards x micro-batch {self.micro_batch_size}"
                )
            self.epoch, self.consumed = self.epoch + 1, 0
        if self.balance_window > 1:
            mine = self._balanced_rows(rows)
        else:
            start = self.consumed + self.shard_index * self.micro_batch_size
            mine = rows[start : min(start + self.micro_batch_size, len(rows))]
            mine = mine + [[]] * (self.micro_batch_size - len(mine))
        self.consumed += self.rows_per_step
        length = self.dataset.seq_length
        if not self.pad_to_max_length:
            longest = max(sum(self._lengths[i] for i in row) for row in mine)
            length = padded_length(longest, length, self.pad_multiple)
        built = [self.dataset.build_row(row, length) for row in mine]
        return {key: torch.stack([row[key] for row in built]) for key in built[0]}

    def _balanced_rows(self, rows: list[list[int]]) -> list[list[int]]:
        """This shard's rows for the current micro-batch under `balance_window` (see the class)."""
        step = self.consumed // self.rows_per_step
        window, within = divmod(step, self.balance_window)
        if self._window_key != (self.epoch, window):
            first = window * self.balance_window
            steps = min(self.balance_window, self.batches_in_epoch(self.epoch) - first)
            start = first * self.rows_per_step
            group = rows[start : min(start + steps * self.rows_per_step, len(rows))]
            group = group + [[]] * (steps * self.rows_per_step - len(group))
            sizes = [sum(self._lengths[i] for i in row) for row in group]
            room = steps * self.micro_batch_size
            shards: list[list[int]] = [[] for _ in range(self.num_shards)]
            totals = [0] * self.num_shards
            for r in sorted(range(len(group)), key=lambda r: (-sizes[r], r)):
                k = min((k for k in range(self.num_shards) if len(shards[k]) < room), key=lambda k: (totals[k], k))
                shards[k].append(r)
                totals[k] += sizes[r]
            self._window = [group[r] for r in shards[self.shard_index]]  # dealt longest first
            self._window_key = (self.epoch, window)
        m = self.micro_batch_size
        return self._window[within * m : (within + 1) * m]

    def state_dict(self) -> dict:
        return dict(
            epoch=self.epoch, consumed=self.consumed, seed=self.seed, pack=self.pack,
            num_examples=len(self.dataset),
        )

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("seed", self.seed), ("pack", self.pack), ("num_examples", len(self.dataset))):
            if key in state and state[key] != mine:
                raise ValueError(
                    f"data position saved with {key}={state[key]} cannot resume with {key}={mine} "
                    f"({self.dataset.source}): the batch order would differ"
                )
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])


# ---------------------------------------------------------------------------------------------
# GSM8K: a fixed train / held-out split of the test file, and answer extraction

T = TypeVar("T")


def _default_key(item) -> str:
    if dataclasses.is_dataclass(item):
        item = dataclasses.asdict(item)
    return json.dumps(item, sort_keys=True, ensure_ascii=False)


def train_heldout_split(
    examples: Sequence[T], num_heldout: int, seed: int, key: Callable[[T], str] = _default_key
) -> tuple[list[T], list[T]]:
    """Split by a seeded hash of each item's `key`, so the split depends only on content and seed
    (not on library versions or file order). Items with equal keys land on the same side, so the
    held-out side may exceed `num_heldout` by duplicates. Both sides keep the input order."""
    if not 0 < num_heldout < len(examples):
        raise ValueError(
            f"num_heldout must be in [1, {len(examples) - 1}] for {len(examples)} examples, got {num_heldout}"
        )
    keys = [key(e) for e in examples]

    def rank(k: str) -> str:
        return hashlib.sha256(f"{seed}\n{k}".encode("utf-8")).hexdigest()

    counts: dict[str, int] = {}
    for k in keys:
        counts[k] = counts.get(k, 0) + 1
    heldout_keys, taken = set(), 0
    for k in sorted(counts, key=lambda k: (rank(k), k)):
        if taken >= num_heldout:
            break
        heldout_keys.add(k)
        taken += counts[k]
    train = [e for e, k in zip(examples, keys) if k not in heldout_keys]
    heldout = [e for e, k in zip(examples, keys) if k in heldout_keys]
    return train, heldout


def split_gsm8k(path: str, num_heldout: int = 319, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """The fixed split of the GSM8K test file (1319 problems; upstream ships no train split here):
    (train, held-out) lists of {"question", "answer"}, split by question text."""
    examples = read_jsonl_examples(path, "question", "answer")
    records = [{"question": e.prompt, "answer": e.response} for e in examples]
    return train_heldout_split(records, num_heldout, seed, key=lambda r: r["question"])


def write_jsonl(records: Sequence[dict], path: str) -> None:
    """Write one JSON object per line, atomically (written aside, then renamed)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_gsm8k_split(path: str, out_dir: str, num_heldout: int = 319, seed: int = 0) -> tuple[str, str]:
    """Write `gsm8k_train.jsonl` and `gsm8k_heldout.jsonl` under `out_dir` (for --data-path and
    --valid-data-path with --prompt-field question --response-field answer); returns both paths."""
    train, heldout = split_gsm8k(path, num_heldout, seed)
    train_path = os.path.join(out_dir, "gsm8k_train.jsonl")
    heldout_path = os.path.join(out_dir, "gsm8k_heldout.jsonl")
    write_jsonl(train, train_path)
    write_jsonl(heldout, heldout_path)
    return train_path, heldout_path


_NUMBER = re.compile(r"\s*\$?\s*([-+]?)\s*\$?\s*(\d[\d,]*(?:\.\d*)?|\.\d+)")


def extract_gsm8k_answer(text: str) -> str | None:
    """The number after the first `####` in canonical form ("1,000." -> "1000", "18.50" -> "18.5"),
    or None when there is none. Compare two answers with ==."""
    at = text.find("####")
    if at < 0:
        return None
    match = _NUMBER.match(text, at + 4)
    if match is None:
        return None
    sign, digits = match.groups()
    try:
        value = Decimal(digits.replace(",", "").rstrip("."))
    except InvalidOperation:
        return None
    if sign == "-":
        value = -value
    if value == 0:
        return "0"
    return format(value.normalize(), "f")
