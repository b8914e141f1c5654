"""Multi-turn chat data: the loss mask token by token against the rendered template (SmolLM2's ChatML
and a Llama SentencePiece tokenizer with another template), ShareGPT records equal OpenAI ones,
truncation, packing, errors naming file:line, and a 1-rank trainer run whose held-out loss equals
an independent per-token computation on the HF model."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from megatron_hdpissa.data.batches import SFTBatchIterator
from megatron_hdpissa.data.chat import chat_dataset, load_sft_jsonl
from megatron_hdpissa.data.sft import DataError
from megatron_hdpissa.data.tokenizer import build_tokenizer
from tests.helpers.distributed import run_distributed
from tests.helpers.hf_models import tiny_trainer_material
from tests.helpers.sft_data import SP_MODEL
from tests.helpers.trainer import expect_errors, finetune_main

SYSTEM = "You are terse."
CONVERSATIONS = [
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is 2+3?"},
     {"role": "assistant", "content": "It is 5."}, {"role": "user", "content": "And doubled?"},
     {"role": "assistant", "content": "10."}],
    # no system turn (SmolLM2's template adds its own), leading whitespace merging with the header's "\n"
    [{"role": "user", "content": "Indent this."}, {"role": "assistant", "content": "  indented\n\n"},
     {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "\n\nYou're welcome!"}],
    # a trailing user turn is not supervised and not kept; the assistant repeats a user's text
    [{"role": "user", "content": "Say: hello there"}, {"role": "assistant", "content": "hello there"},
     {"role": "user", "content": "hello there"}],
]
SHAREGPT = {"system": "system", "user": "human", "assistant": "gpt"}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def as_sharegpt(conversation):
    return {"conversations": [{"from": SHAREGPT[m["role"]], "value": m["content"]} for m in conversation]}


def expected(hf, conversation, header, end):
    """Independently: the full rendering tokenised once; each assistant turn located by string search
    as header + content + end marker; a token is supervised when its characters overlap
    content + end marker; ids after the last supervised one dropped."""
    full = hf.apply_chat_template(conversation, tokenize=False)
    enc = hf(full, add_special_tokens=False, return_offsets_mapping=True)
    spans, cursor = [], 0
    for m in conversation:
        if m["role"] == "assistant":
            at = full.index(header + m["content"] + end, cursor) + len(header)
            spans.append((at, at + len(m["content"]) + len(end)))
            cursor = spans[-1][1]
    mask = [any(s < b and max(e, s + 1) > a for a, b in spans) for s, e in enc["offset_mapping"]]
    last = max(j for j, m in enumerate(mask) if m) + 1
    assert enc["input_ids"] == hf.encode(full, add_special_tokens=False)
    return enc["input_ids"][:last], mask[:last], full, spans


@pytest.fixture(scope="module")
def smol(smollm2_hf_dir):
    return build_tokenizer("HuggingFaceTokenizer", str(smollm2_hf_dir))


def with_template(hf_dir, folder, template):
    """The SentencePiece tokenizer of `hf_dir` with another chat template."""
    shutil.copytree(hf_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    for f in folder.glob("chat_template.*"):
        f.unlink()
    return build_tokenizer("HuggingFaceTokenizer", str(folder))


def test_end_of_turn_is_the_first_special_token(hf_dir, tmp_path):
    """Text the template puts after the end-of-turn token is not supervised; a template with no
    end-of-turn marker at all is refused (the model would never learn to stop)."""
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATIONS[0]}])
    loop = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    tok = with_template(hf_dir, tmp_path / "sep", loop + "</s>\n###\n{% endfor %}")
    example = chat_dataset(path, tok, 256).examples[0]
    ends = [j for j, t in enumerate(example.ids) if t == tok.eos_id]
    assert example.ids[-1] == tok.eos_id  # turns: system, user, assistant, user, assistant
    assert [example.supervised[j] for j in ends] == [False, False, True, False, True]
    supervised = tok.hf.decode([t for t, m in zip(example.ids, example.supervised) if m])
    assert supervised.replace(" ", "") == "Itis5.</s>10.</s>"
    bare = with_template(hf_dir, tmp_path / "bare", loop + "{% endfor %}")
    with pytest.raises(DataError, match=rf"{re.escape(path)}:1: .* renders nothing after the assistant content"):
        chat_dataset(path, bare, 256)


def check_dataset_against_oracle(tok, dataset, conversations, header, end):
    batch = next(SFTBatchIterator(dataset, micro_batch_size=len(conversations), shuffle=False))
    for row, conversation in enumerate(conversations):
        ids, mask, _, _ = expected(tok.hf, conversation, header, end)
        if tok.add_bos and ids[0] != tok.bos_id:
            ids, mask = [tok.bos_id] + ids, [False] + mask
        example = dataset.examples[row]
        assert example.ids == ids
        assert list(example.supervised) == mask
        n = len(ids) - 1
        assert batch["tokens"][row, :n].tolist() == ids[:-1] and batch["labels"][row, :n].tolist() == ids[1:]
        assert batch["loss_mask"][row].tolist() == [float(m) for m in mask[1:]] + [0.0] * (batch["tokens"].shape[1] - n)


def test_chatml_masks_token_by_token(smol, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVERSATIONS])
    dataset = chat_dataset(path, smol, seq_length=256)
    assert smol.hf.eos_token == "<|im_end|>" and len(dataset) == 3 and dataset.num_truncated == 0
    check_dataset_against_oracle(smol, dataset, CONVERSATIONS, "<|im_start|>assistant\n", "<|im_end|>")
    # the merge case is really exercised: a supervised token holds the header's "\n" and the content's spaces
    tokens = [smol.hf.decode([t]) for t in dataset.examples[1].ids]
    first = dataset.examples[1].supervised.index(True)
    assert tokens[first - 1] == "istant" and tokens[first] == "\n "
    # nothing but assistant turns: role headers, system and user turns are unsupervised
    supervised_text = smol.hf.decode([t for t, m in zip(dataset.examples[0].ids, dataset.examples[0].supervised) if m])
    assert supervised_text == "It is 5.<|im_end|>10.<|im_end|>"
    assert dataset.examples[2].ids[-1] == smol.eos_id  # the trailing user turn is dropped


def test_sentencepiece_template_masks_token_by_token(hf_dir, tmp_path):
    tok = build_tokenizer("HuggingFaceTokenizer", hf_dir)
    conversations = [c for c in CONVERSATIONS[:1] + CONVERSATIONS[2:]]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in conversations])
    dataset = chat_dataset(path, tok, seq_length=256)
    check_dataset_against_oracle(tok, dataset, conversations, "<|assistant|>\n", "</s>")
    example = dataset.examples[0]
    supervised_text = tok.hf.decode([t for t, m in zip(example.ids, example.supervised) if m])
    assert supervised_text.replace(" ", "") == "Itis5.</s>10.</s>"  # SentencePiece decodes with spaces around </s>


def test_sharegpt_equals_openai_and_auto_detect(smol, tmp_path):
    openai = write_jsonl(tmp_path / "openai.jsonl", [{"messages": c} for c in CONVERSATIONS])
    sharegpt = write_jsonl(tmp_path / "sharegpt.jsonl", [as_sharegpt(c) for c in CONVERSATIONS])
    a = load_sft_jsonl(openai, smol, 256)  # --data-format auto
    b = load_sft_jsonl(sharegpt, smol, 256, data_format="messages")
    assert [(e.ids, e.supervised) for e in a.examples] == [(e.ids, e.supervised) for e in b.examples]
    assert all(e.supervised is not None for e in a.examples)
    parts = [{"messages": [dict(m, content=[{"type": "text", "text": m["content"][:3]},
                                             {"type": "text", "text": m["content"][3:]}]) for m in c]}
             for c in CONVERSATIONS]  # OpenAI's list-of-parts content
    c = load_sft_jsonl(write_jsonl(tmp_path / "parts.jsonl", parts), smol, 256)
    assert [(e.ids, e.supervised) for e in a.examples] == [(e.ids, e.supervised) for e in c.examples]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"question": "q", "answer": "a"}])
    assert load_sft_jsonl(pairs, smol, 64).examples[0].supervised is None  # prompt/response records
    with pytest.raises(ValueError, match=r"--prompt-template 'Q: \{prompt\}' does not apply to .*openai.jsonl"):
        load_sft_jsonl(openai, smol, 256, template="Q: {prompt}")


def test_truncation_keeps_mask_and_packing(smol, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVERSATIONS])
    whole = chat_dataset(path, smol, seq_length=256)
    first_label = [e.supervised.index(True) for e in whole.examples]
    seq_length = sorted(len(e.ids) for e in whole.examples)[1] - 3  # some examples cut, in the middle
    cut = chat_dataset(path, smol, seq_length=seq_length)
    assert cut.num_truncated >= 2 and cut.num_dropped == 0
    for full, short in zip(whole.examples, cut.examples):
        keep = full.supervised[: seq_length + 1]
        last = max(j for j, m in enumerate(keep) if m) + 1
        assert short.ids == full.ids[:last] and short.supervised == keep[:last]
    tiny = chat_dataset(path, smol, seq_length=min(first_label) + 1)
    assert tiny.num_dropped == sum(f > min(first_label) + 1 for f in first_label)
    # packed rows carry each example's own mask
    packed = SFTBatchIterator(whole, micro_batch_size=1, shuffle=False, pack=True, num_epochs=1)
    rows = list(packed)
    assert len(rows) == 1 and int((rows[0]["position_ids"] == 0).sum()) == 3
    expected_mask = [float(m) for e in whole.examples for m in e.supervised[1:]]
    assert rows[0]["loss_mask"][0, : len(expected_mask)].tolist() == expected_mask
    assert rows[0]["loss_mask"][0, len(expected_mask):].sum() == 0


def test_errors_name_file_and_line(smol, hf_dir, tmp_path):
    good = {"messages": CONVERSATIONS[0]}
    cases = {
        "bad role": ({"messages": [{"role": "tool", "content": "x"}]}, r"messages\[0\]: bad role 'tool'"),
        "sharegpt role": ({"conversations": [{"from": "bot", "value": "x"}]}, r"conversations\[0\]: bad from 'bot'"),
        "no assistant": ({"messages": [{"role": "user", "content": "hi"}]}, "the conversation has no assistant turn"),
        "content type": ({"messages": [{"role": "user", "content": ["x"]}]},
                         r"messages\[0\]: 'content' must be a string or a list of text parts .*, got \[\"x\"\]"),
        "no field": ({"text": "hi"}, "a chat record needs a 'messages' .* or 'conversations'"),
    }
    for name, (record, message) in cases.items():
        path = write_jsonl(tmp_path / f"{name}.jsonl", [good, record])
        with pytest.raises(DataError, match=rf"{re.escape(path)}:2: {message}"):
            chat_dataset(path, smol, 256)
    # a template that cannot render the record (Gemma-style: no system role)
    strict = with_template(hf_dir, tmp_path / "strict", "{% for m in messages %}{% if m['role'] == 'system' %}"
                           "{{ raise_exception('System role not supported') }}{% endif %}"
                           "<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}")
    path = write_jsonl(tmp_path / "system.jsonl", [{"messages": CONVERSATIONS[1]}, good])
    with pytest.raises(DataError, match=rf"{re.escape(path)}:2: the chat template of .* cannot render this "
                                        r"conversation "
                                        r"\(TemplateError: System role not supported\)"):
        chat_dataset(path, strict, 256)
    with pytest.raises(DataError, match="holds chat messages.*has none"):
        chat_dataset(path, build_tokenizer("SentencePieceTokenizer", SP_MODEL), 256)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_hf_dir, gsm8k_path):
    return tiny_trainer_material(tmp_path_factory.mktemp("chat"), smollm2_hf_dir, gsm8k_path, seed=5, num_train=8,
                                 num_attention_heads=4, num_key_value_heads=2, initializer_range=0.05)


def test_trainer_runs_chat_data_with_the_right_supervised_tokens(tiny):
    """1 rank, chat JSONL for training and held-out: the held-out loss before training equals the HF
    model's mean -log p over exactly the oracle's supervised tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tiny["root"]
    train = write_jsonl(root / "chat_train.jsonl", [{"messages": c} for c in CONVERSATIONS] * 4)
    heldout = write_jsonl(root / "chat_heldout.jsonl", [as_sharegpt(c) for c in CONVERSATIONS])
    argv = ["--pretrained-checkpoint", str(tiny["base"]), "--data-path", train, "--valid-data-path", heldout,
            "--micro-batch-size", "2", "--global-batch-size", "4", "--seq-length", "128", "--lr", "1e-3",
            "--train-iters", "2", "--hd-pissa-rank", "4", "--no-progress", "--seed", "3"]
    results = run_distributed(finetune_main, 1, 1, args=(argv,))[0]
    losses = [results[k] for k in ("train_loss", "valid_loss_before", "valid_loss_after")]
    assert torch.isfinite(torch.tensor(losses)).all()

    hf = AutoTokenizer.from_pretrained(str(tiny["hf"]))
    model = AutoModelForCausalLM.from_pretrained(str(tiny["hf"]), dtype=torch.float32).eval()
    total, count = 0.0, 0
    for conversation in CONVERSATIONS:
        ids, mask, _, _ = expected(hf, conversation, "<|im_start|>assistant\n", "<|im_end|>")
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), dim=-1)
        picked = -logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        labels = torch.tensor(mask[1:])
        total, count = total + float(picked[labels].sum()), count + int(labels.sum())
    assert count == 10 + 12 + 3  # content + <|im_end|> per assistant turn, counted by hand from the tokens
    assert results["valid_loss_before"] == pytest.approx(total / count, rel=1e-4)
    cases = [argv + ["--prompt-template", "Q: {prompt}"], argv + ["--data-format", "prompt-response"]]
    errors = run_distributed(expect_errors, 1, 1, args=(cases,))[0]
    assert "does not apply to" in errors[0] and "chat_train.jsonl" in errors[0]
    assert "chat_train.jsonl:1: missing prompt field 'question'" in errors[1]
