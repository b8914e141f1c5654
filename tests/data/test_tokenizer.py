"""Tokenizers by Megatron-LM type name against SentencePiece itself, and their errors."""
import pytest

from megatron_hdpissa.data.tokenizer import build_tokenizer, check_vocab_fits
from tests.helpers.sft_data import SP_MODEL


def test_tokenizers_agree_with_sentencepiece(sp, sp_tok, hf_dir):
    text = "Janet’s ducks lay 16 eggs per day.\n#### 18"
    hf_tok = build_tokenizer("HuggingFaceTokenizer", hf_dir)
    for tok in (sp_tok, hf_tok):
        assert tok.encode(text) == sp.encode(text)
        assert tok.decode(sp.encode(text)) == text
        assert (tok.eos_id, tok.bos_id, tok.pad_id, tok.vocab_size) == (2, 1, 2, 32000)
    assert sp_tok.add_bos and not hf_tok.add_bos  # this HF LlamaTokenizer adds no BOS by itself
    messages = [{"role": "user", "content": "hi"}]
    assert hf_tok.apply_chat_template(messages, add_generation_prompt=True) == "<|user|>\nhi</s>\n<|assistant|>\n"
    with pytest.raises(ValueError, match="no chat template"):
        sp_tok.apply_chat_template(messages)


def test_tokenizer_errors(sp_tok, tmp_path):
    check_vocab_fits(sp_tok, 32000)
    check_vocab_fits(sp_tok, 32128)
    with pytest.raises(ValueError, match=r"--tokenizer-model.*32000 tokens.*31999 rows"):
        check_vocab_fits(sp_tok, 31999)
    with pytest.raises(ValueError, match="--tokenizer-type"):
        build_tokenizer("GPT2BPETokenizer", SP_MODEL)
    with pytest.raises(FileNotFoundError, match="--tokenizer-model"):
        build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="--tokenizer-model"):
        build_tokenizer("SentencePieceTokenizer", str(tmp_path / "missing.model"))
