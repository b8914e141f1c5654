"""GSM8K: the fixed train / held-out split of the packaged test file, and answer extraction."""
import json

from megatron_hdpissa.data.gsm8k import extract_gsm8k_answer, split_gsm8k, train_heldout_split, write_gsm8k_split
from megatron_hdpissa.data.sft import SFTDataset, read_jsonl_examples
from tests.helpers.sft_data import GSM8K


def test_gsm8k_split_is_fixed_and_disjoint(tmp_path, sp_tok):
    train, heldout = split_gsm8k(GSM8K, num_heldout=319, seed=0)
    assert (len(train), len(heldout)) == (1000, 319)
    train_q, heldout_q = {r["question"] for r in train}, {r["question"] for r in heldout}
    assert not train_q & heldout_q and len(train_q | heldout_q) == 1319
    with open(GSM8K) as f:
        file_order = [json.loads(line)["question"] for line in f]
    assert [r["question"] for r in heldout] == [q for q in file_order if q in heldout_q]
    assert split_gsm8k(GSM8K, 319, 0) == (train, heldout)
    assert {r["question"] for r in split_gsm8k(GSM8K, 319, 1)[1]} != heldout_q
    train_path, heldout_path = write_gsm8k_split(GSM8K, str(tmp_path), 319, 0)
    assert len(read_jsonl_examples(train_path)) == 1000
    assert SFTDataset.from_jsonl(heldout_path, sp_tok, 512).source == heldout_path
    # Duplicates never straddle the split.
    items = ["a", "b", "a", "c", "b", "d"]
    for seed in range(20):
        tr, ho = train_heldout_split(items, 2, seed, key=str)
        assert not set(tr) & set(ho) and len(tr) + len(ho) == 6


def test_extract_gsm8k_answer():
    with open(GSM8K) as f:
        answers = [json.loads(line)["answer"] for line in f]
    for answer in answers:
        assert extract_gsm8k_answer(answer) == str(int(answer.rsplit("####", 1)[1].replace(",", "")))
    assert extract_gsm8k_answer("so 3 + 4 = 7.\n#### 1,234.") == "1234"
    assert extract_gsm8k_answer("#### $18.50 dollars") == "18.5"
    assert extract_gsm8k_answer("####-5\n#### 6") == "-5"
    assert extract_gsm8k_answer("#### 18.00") == extract_gsm8k_answer("#### 18") == "18"
    assert extract_gsm8k_answer("The answer is 7") is None
    assert extract_gsm8k_answer("#### seven") is None
