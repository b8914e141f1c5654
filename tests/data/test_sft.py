"""SFT examples on a real tokenizer: prompt templates, loss masks at the prompt boundary, truncation, bad JSONL lines."""
import json
import logging

import pytest
import torch

from megatron_hdpissa.data.batches import SFTBatchIterator
from megatron_hdpissa.data.sft import DataError, SFTDataset, SFTExample, read_jsonl_examples
from megatron_hdpissa.data.tokenizer import build_tokenizer
from tests.helpers.sft_data import ALPACA, ALPACA_INPUT


def test_alpaca_masks_match_prompt_boundary(sp, sp_tok, gsm8k_examples):
    examples = gsm8k_examples[:6] + [SFTExample("Add the numbers.", "5", input="2 and 3")]
    dataset = SFTDataset(examples, sp_tok, seq_length=400)
    assert dataset.num_truncated == 0 and len(dataset) == 7
    batch = next(SFTBatchIterator(dataset, micro_batch_size=7, shuffle=False, pad_to_max_length=True))
    assert batch["tokens"].shape == (7, 400) and batch["tokens"].dtype == torch.int64
    assert batch["loss_mask"].dtype == torch.float32 and batch["position_ids"].dtype == torch.int64
    for row, ex in enumerate(examples):
        prompt_text = ALPACA_INPUT.format(ex.prompt, ex.input) if ex.input else ALPACA.format(ex.prompt)
        prompt = [1] + sp.encode(prompt_text)
        full = prompt + sp.encode(ex.response) + [2]
        n = len(full) - 1
        assert batch["tokens"][row, :n].tolist() == full[:-1]
        assert batch["labels"][row, :n].tolist() == full[1:]
        expected_mask = [0.0] * (len(prompt) - 1) + [1.0] * (n - len(prompt) + 1) + [0.0] * (400 - n)
        assert batch["loss_mask"][row].tolist() == expected_mask
        supervised = batch["labels"][row][batch["loss_mask"][row] == 1].tolist()
        assert sp.decode(supervised[:-1]) == ex.response and supervised[-1] == 2
        assert (batch["tokens"][row, n:] == 2).all() and (batch["labels"][row, n:] == 2).all()
        assert batch["position_ids"][row].tolist() == list(range(400))


def test_format_string_template_with_input(sp, sp_tok):
    examples = [SFTExample("What is 2+3?", "5", input="{literal braces}"), SFTExample("Say hi.", "hi")]
    dataset = SFTDataset(examples, sp_tok, seq_length=64, template="Q: {prompt}\nContext: {input}\nA:")
    expected_prompts = ["Q: What is 2+3?\nContext: {literal braces}\nA:", "Q: Say hi.\nContext: \nA:"]
    for tokenized, ex, text in zip(dataset.examples, examples, expected_prompts):
        assert tokenized.ids == [1] + sp.encode(text) + sp.encode(ex.response) + [2]
        assert tokenized.num_prompt == 1 + len(sp.encode(text))
    plain = SFTDataset(examples[:1], sp_tok, seq_length=64, template="Q: {prompt}\nA:", add_bos=False)
    assert plain.examples[0].ids[: plain.examples[0].num_prompt] == sp.encode("Q: What is 2+3?\n\n{literal braces}\nA:")
    with pytest.raises(ValueError, match=r"\{prompt\}"):
        SFTDataset(examples, sp_tok, seq_length=64, template="Q: {question}")


def test_chat_template_masks(hf_dir):
    tok = build_tokenizer("HuggingFaceTokenizer", hf_dir)
    examples = [SFTExample("What is 2+3?", "It is 5."), SFTExample("Name a colour.", "Blue.")]
    dataset = SFTDataset(examples, tok, seq_length=64, template="chat")
    batch = next(SFTBatchIterator(dataset, micro_batch_size=2, shuffle=False))
    for row, ex in enumerate(examples):
        prompt = tok.hf.encode(f"<|user|>\n{ex.prompt}</s>\n<|assistant|>\n", add_special_tokens=False)
        response = tok.hf.encode(f"{ex.response}</s>", add_special_tokens=False)
        assert response[-1] == 2 and 2 in prompt  # the turn end is EOS; nothing after it is kept
        full = prompt + response
        n = len(full) - 1
        assert batch["tokens"][row, :n].tolist() == full[:-1]
        assert batch["loss_mask"][row].nonzero().flatten().tolist() == list(range(len(prompt) - 1, n))


def test_truncation_counts_and_drops(sp, sp_tok, gsm8k_examples, caplog):
    examples = gsm8k_examples[:40]
    seq_length = 100
    lengths = [(1 + len(sp.encode(e.prompt)), len(sp.encode(e.response)) + 1) for e in examples]
    expected_truncated = sum(p + r > seq_length + 1 for p, r in lengths)
    expected_dropped = sum(p > seq_length for p, r in lengths)
    assert 0 < expected_dropped < expected_truncated < len(examples)
    with caplog.at_level(logging.WARNING, logger="megatron_hdpissa.data.sft"):
        dataset = SFTDataset(examples, sp_tok, seq_length=seq_length, template="{prompt}")
    assert (dataset.num_truncated, dataset.num_dropped) == (expected_truncated, expected_dropped)
    assert len(dataset) == len(examples) - expected_dropped
    assert f"{expected_truncated} of 40 examples exceed --seq-length 100" in caplog.text
    assert all(len(e.ids) <= seq_length + 1 for e in dataset.examples)
    with pytest.raises(DataError, match="<examples>: no usable examples"):
        SFTDataset(examples[:3], sp_tok, seq_length=4, template="{prompt}")


def test_garbled_lines_name_file_and_line(tmp_path):
    good = json.dumps({"question": "q", "answer": "a"})
    cases = {
        "invalid JSON": [good, "", good, '{"question": "q", "answer": '],
        "missing response field 'answer'": [good, json.dumps({"question": "q", "reply": "a"})],
        "response field 'answer' must be a string, got int": [good, good, json.dumps({"question": "q", "answer": 5})],
        "expected a JSON object": [good, "[1, 2]"],
    }
    for message, lines in cases.items():
        path = tmp_path / "data.jsonl"
        path.write_text("\n".join(lines) + "\n")
        with pytest.raises(DataError, match=f"{path}:{len(lines)}: .*{message}"):
            read_jsonl_examples(str(path))
    path.write_text("\n\n")
    with pytest.raises(DataError, match=f"{path}: no examples"):
        read_jsonl_examples(str(path))
    path.write_text(json.dumps({"instruction": "i", "input": None, "output": "o"}) + "\n")
    assert read_jsonl_examples(str(path), "instruction", "output", "input") == [SFTExample("i", "o", "")]
