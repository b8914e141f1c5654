"""--ckpt-format in the trainer: torch (legacy) is the default; torch_dist is not implemented in
the trainer yet and is refused up front with a message that says so (rather than writing a
checkpoint that could not be resumed)."""
from __future__ import annotations

import pytest

from megatron_hdpissa.arguments import parse_args

BASE = ["--pretrained-checkpoint", "ckpt", "--data-path", "train.jsonl", "--train-iters", "1"]


def test_default_ckpt_format_is_torch():
    assert parse_args(BASE).ckpt_format == "torch"
    assert parse_args(BASE + ["--ckpt-format", "torch"]).ckpt_format == "torch"


def test_torch_dist_is_refused_clearly(capsys):
    with pytest.raises(SystemExit):
        parse_args(BASE + ["--ckpt-format", "torch_dist"])
    err = capsys.readouterr().err
    assert "--ckpt-format torch_dist is not implemented in the trainer yet" in err
    assert "use --ckpt-format torch" in err
