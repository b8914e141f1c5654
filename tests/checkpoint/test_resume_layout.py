"""--ckpt-format in the trainer: torch_dist (megatron-core dist_checkpointing) is the default, as in
Megatron-LM; torch (legacy per-rank files) stays available; --async-save is refused with the reason."""
from __future__ import annotations

import pytest

from megatron_hdpissa.training.arguments import parse_args

BASE = ["--pretrained-checkpoint", "ckpt", "--data-path", "train.jsonl", "--train-iters", "1"]


def test_default_ckpt_format_is_torch_dist():
    assert parse_args(BASE).ckpt_format == "torch_dist"
    assert parse_args(BASE + ["--ckpt-format", "torch"]).ckpt_format == "torch"


def test_async_save_is_refused_clearly(capsys):
    with pytest.raises(SystemExit):
        parse_args(BASE + ["--async-save"])
    err = capsys.readouterr().err
    assert "--async-save is not supported" in err and "synchronously" in err
