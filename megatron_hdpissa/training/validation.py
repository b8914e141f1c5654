"""Fail early: everything a run reads or writes besides the base weights is checked before the
base model is loaded and decomposed (minutes on a large model): the data files (each error names
its flag, or `file:line`), the tokenizer against the model's vocabulary, the output folders."""
from __future__ import annotations

import os
from pathlib import Path

DATA_FLAGS = (("--data-path", "data_path"), ("--valid-data-path", "valid_data_path"))
OUTPUT_FLAGS = (("--save", "save", True), ("--export-hf", "export_hf", True),
                ("--export-hf-adapter", "export_hf_adapter", True),
                ("--tensorboard-dir", "tensorboard_dir", True), ("--log-json", "log_json", False))


def check_output(flag: str, path, is_dir: bool) -> None:
    """`path` can be created or written: a folder flag must not name a file, a file flag must
    not name a folder, and the nearest existing ancestor must be a writable folder."""
    p = Path(path)
    if p.exists():
        if is_dir and not p.is_dir():
            raise NotADirectoryError(f"{flag} {p} is a file, not a folder")
        if not is_dir and p.is_dir():
            raise ValueError(f"{flag} {p} is a folder, not a file")
        if not os.access(p if is_dir else p.parent, os.W_OK):
            raise ValueError(f"{flag} {p} is not writable")
        return
    parent = p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"{flag} {p}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {p}: cannot create it, {parent} is not writable")


def check_outputs(args) -> None:
    for flag, attr, is_dir in OUTPUT_FLAGS:
        if getattr(args, attr, None):
            check_output(flag, getattr(args, attr), is_dir)


def check_data_files(args) -> None:
    for flag, attr in DATA_FLAGS:
        path = getattr(args, attr, None)
        if path and not Path(path).is_file():
            raise FileNotFoundError(f"{flag} {path} " + ("is a folder, not a JSONL file" if Path(path).is_dir()
                                                        else "does not exist"))


def read_inputs(args, base):
    """(tokenizer, training dataset, held-out dataset or None), read and checked: the tokenizer
    fits the model's vocabulary, every JSONL line parses (errors name `file:line`). `base`: the
    resolved --pretrained-checkpoint / --load (convert.pretrained.PretrainedBase)."""
    from megatron_hdpissa.data.chat import load_sft_jsonl
    from megatron_hdpissa.data.tokenizer import build_tokenizer, check_vocab_fits

    check_data_files(args)
    if not args.tokenizer_model and base.tokenizer_dir is None:
        raise ValueError(f"--tokenizer-model is needed: {base.directory} ({base.kind}) holds no tokenizer")
    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model or str(base.tokenizer_dir))
    check_vocab_fits(tokenizer, base.model_config.vocab_size)
    fields = dict(prompt_field=args.prompt_field, response_field=args.response_field,
                  input_field=args.input_field, template=args.prompt_template, data_format=args.data_format)
    train = load_sft_jsonl(args.data_path, tokenizer, args.seq_length, **fields)
    valid = load_sft_jsonl(args.valid_data_path, tokenizer, args.seq_length, **fields) \
        if args.valid_data_path else None
    return tokenizer, train, valid
