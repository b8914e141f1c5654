"""Tokenizers by Megatron-LM type name behind one small interface (encode, decode, special ids)."""
from __future__ import annotations

import os

TOKENIZER_TYPES = ("HuggingFaceTokenizer", "SentencePieceTokenizer")


class Tokenizer:
    """What the data pipeline needs from a tokenizer.

    `encode` never adds special tokens: the caller decides about BOS/EOS. `add_bos` says whether
    the tokenizer's own convention prepends BOS to a sequence (the SFT data follows it by default).
    """

    path: str
    eos_id: int
    bos_id: int | None
    pad_id: int
    vocab_size: int
    add_bos: bool
    has_chat_template: bool = False

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """`encode(text)` and each id's character span [start, end) in `text` (chat data masks)."""
        raise ValueError(f"{type(self).__name__} {self.path!r} gives no character offsets; chat data needs "
                         "--tokenizer-type HuggingFaceTokenizer with a fast tokenizer (tokenizer.json)")

    def special_ids(self) -> frozenset[int]:
        """Ids of the special tokens (a chat template's end-of-turn marker is one); EOS included."""
        return frozenset([self.eos_id])

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        raise ValueError(
            f"{type(self).__name__} {self.path!r} has no chat template; use --tokenizer-type "
            "HuggingFaceTokenizer with a tokenizer that defines one, or a plain prompt template"
        )


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece `.model` file (LLaMA/Mistral style)."""

    def __init__(self, model_file: str):
        import sentencepiece

        if not os.path.isfile(model_file):
            raise FileNotFoundError(f"--tokenizer-model {model_file!r}: no such SentencePiece model file")
        self.path = model_file
        self.sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
        if self.sp.eos_id() < 0:
            raise ValueError(f"--tokenizer-model {model_file!r} defines no EOS piece; SFT needs one")
        self.eos_id = self.sp.eos_id()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
        self.vocab_size = self.sp.get_piece_size()
        # LLaMA-family SentencePiece models are trained with a leading BOS.
        self.add_bos = self.bos_id is not None

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])


class HuggingFaceTokenizer(Tokenizer):
    """A local Hugging Face tokenizer directory (or a `.gguf` file); never runs remote code."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        kwargs = dict(trust_remote_code=False, local_files_only=True)
        if os.path.isfile(path) and path.endswith(".gguf"):
            folder, kwargs["gguf_file"] = os.path.split(os.path.abspath(path))
        elif os.path.isdir(path):
            folder = path
        else:
            raise FileNotFoundError(
                f"--tokenizer-model {path!r}: expected a local Hugging Face tokenizer directory or a .gguf file"
            )
        self.path = path
        self.hf = AutoTokenizer.from_pretrained(folder, **kwargs)
        if self.hf.eos_token_id is None:
            raise ValueError(f"--tokenizer-model {path!r} defines no EOS token; SFT needs one")
        self.eos_id = self.hf.eos_token_id
        self.bos_id = self.hf.bos_token_id
        self.pad_id = self.hf.pad_token_id if self.hf.pad_token_id is not None else self.eos_id
        # Added tokens may sit above the base vocabulary: the embedding must cover the largest id.
        self.vocab_size = max(len(self.hf), max(self.hf.get_vocab().values()) + 1)
        with_special = self.hf.encode("a", add_special_tokens=True)
        self.add_bos = self.bos_id is not None and with_special[:1] == [self.bos_id]
        self.has_chat_template = bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.hf.decode([int(i) for i in ids])

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        if not getattr(self.hf, "is_fast", False):
            super().encode_with_offsets(text)
        out = self.hf(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(out["input_ids"]), [tuple(o) for o in out["offset_mapping"]]

    def special_ids(self) -> frozenset[int]:
        added = [i for i, token in self.hf.added_tokens_decoder.items() if token.special]
        return frozenset([self.eos_id, *self.hf.all_special_ids, *added])

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        if not getattr(self.hf, "chat_template", None):
            super().apply_chat_template(messages, add_generation_prompt)
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def build_tokenizer(tokenizer_type: str, tokenizer_model: str) -> Tokenizer:
    """Build a tokenizer from Megatron-LM style `--tokenizer-type` and `--tokenizer-model`."""
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(tokenizer_model)
    if tokenizer_type == "SentencePieceTokenizer":
        return SentencePieceTokenizer(tokenizer_model)
    raise ValueError(f"--tokenizer-type {tokenizer_type!r} is not supported; choose one of {TOKENIZER_TYPES}")


def check_vocab_fits(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """Fail if token ids could index past the model's embedding table (`model_vocab_size` rows)."""
    if tokenizer.vocab_size > model_vocab_size:
        raise ValueError(
            f"--tokenizer-model {tokenizer.path!r} has {tokenizer.vocab_size} tokens but the model's "
            f"embedding table has {model_vocab_size} rows: token ids up to {tokenizer.vocab_size - 1} "
            "would index past it; use the tokenizer the model was trained with"
        )
