"""Fixtures of the data tests: the SentencePiece model behind both tokenizer types, and GSM8K examples."""
from __future__ import annotations

import shutil

import pytest
import sentencepiece

from megatron_hdpissa.data.sft import read_jsonl_examples
from megatron_hdpissa.data.tokenizer import build_tokenizer
from tests.helpers.sft_data import CHAT_TEMPLATE, GSM8K, SP_MODEL


@pytest.fixture(scope="module")
def sp():
    return sentencepiece.SentencePieceProcessor(model_file=SP_MODEL)


@pytest.fixture(scope="module")
def sp_tok():
    return build_tokenizer("SentencePieceTokenizer", SP_MODEL)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from transformers import LlamaTokenizer

    folder = tmp_path_factory.mktemp("hf_tokenizer")
    shutil.copy(SP_MODEL, folder / "tokenizer.model")
    tokenizer = LlamaTokenizer.from_pretrained(str(folder))
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def gsm8k_examples():
    return read_jsonl_examples(GSM8K, "question", "answer")
