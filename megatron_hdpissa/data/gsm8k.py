"""GSM8K: a fixed train / held-out split of the test file, and canonical answer extraction."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from decimal import Decimal, InvalidOperation
from typing import Callable, Sequence, TypeVar

from megatron_hdpissa.data.sft import read_jsonl_examples, write_jsonl

T = TypeVar("T")
GSM8K_HELDOUT = 319  # problems of the test file's 1319 held out; the rest is for training


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


def split_gsm8k(path: str, num_heldout: int = GSM8K_HELDOUT, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """The fixed split of the GSM8K test file (1319 problems; upstream ships no train split here):
    (train, held-out) lists of {"question", "answer"}, split by question text."""
    examples = read_jsonl_examples(path, "question", "answer")
    records = [{"question": e.prompt, "answer": e.response} for e in examples]
    return train_heldout_split(records, num_heldout, seed, key=lambda r: r["question"])


def write_gsm8k_split(path: str, out_dir: str, num_heldout: int = GSM8K_HELDOUT, seed: int = 0) -> tuple[str, str]:
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
