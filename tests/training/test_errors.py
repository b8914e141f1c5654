"""Bad input gets a clear error naming the layer or flag."""
from __future__ import annotations

import pytest

from megatron_hdpissa import HDPiSSAConfig
from megatron_hdpissa.peft import layout
from tests.helpers import toy
from tests.helpers.distributed import run_distributed


@pytest.mark.parametrize("alpha", [0, -1.0])
def test_alpha_must_be_positive(alpha):
    with pytest.raises(ValueError, match="--hd-pissa-alpha"):
        HDPiSSAConfig(rank=4, alpha=alpha)


def test_rank_and_method_validated():
    with pytest.raises(ValueError, match="--hd-pissa-rank"):
        HDPiSSAConfig(rank=0)
    with pytest.raises(ValueError, match="--hd-pissa-svd"):
        HDPiSSAConfig(rank=2, svd_method="qr")


def test_alpha_below_rank_still_trains():
    # The published code floors alpha // r, so alpha < r silently trains nothing.
    assert HDPiSSAConfig(rank=16, alpha=8).scale == 0.5


def test_tp_must_take_whole_query_groups():
    with pytest.raises(ValueError, match=r"--tensor-model-parallel-size 3 does not divide num_query_groups 2"):
        layout.qkv_parts(num_heads=4, num_query_groups=2, head_dim=8, tp_size=3, layer="decoder.layers.0.linear_qkv")


def _apply_with(cfg_kwargs):
    from megatron_hdpissa import apply_hd_pissa

    model = toy.MegatronToy(toy.logical_weights(), 1)
    try:
        apply_hd_pissa(model, HDPiSSAConfig(**cfg_kwargs), progress=False)
    except Exception as e:  # noqa: BLE001 - the message is what is tested
        return f"{type(e).__name__}: {e}"
    return "no error"


def test_errors_in_real_process_groups():
    # one spawn, several checks: DP=2, so K = 2 x r
    msgs = run_distributed(_errors_worker, 2, 1)[0]
    too_big, nothing, tp_bad = msgs
    assert "linear_qkv (part k)" in too_big and "= 20 singular components" in too_big and "16x32" in too_big
    assert "--hd-pissa-target-modules ['nonexistent'] matched no parallel linear" in nothing
    assert "linear_qkv" in nothing  # lists what exists
    assert tp_bad == "no error"


def _errors_worker():
    return [
        _apply_with(dict(rank=10)),  # k has 16 rows: 2 ranks x 10 > 16
        _apply_with(dict(rank=2, target_modules=["nonexistent"])),
        _apply_with(dict(rank=2)),
    ]


# ---- the command line: one readable line per user error ------------------------------------------
def _torchrun(*flags):
    import os
    import subprocess
    import sys
    from pathlib import Path

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "megatron_hdpissa.finetune", *flags]
    return subprocess.run(cmd, cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)


def test_cli_user_error_prints_one_line_from_rank_0(tmp_path, tiny_llama_hf_dir, smollm2_hf_dir):
    data = tmp_path / "train.jsonl"
    data.write_text('{"question": "q", "answer": "a"}\n')
    missing = tmp_path / "no-such-checkpoint"
    proc = _torchrun("--pretrained-checkpoint", str(missing), "--data-path", str(data), "--train-iters", "1",
                     "--no-progress")
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if f"{missing} does not exist" in line]
    assert lines == [f"error: --pretrained-checkpoint/--load {missing} does not exist"], proc.stderr[-3000:]
    assert "megatron_hdpissa/finetune.py" not in proc.stderr, proc.stderr[-3000:]  # no traceback of ours
    # every rank exits non-zero (torchrun terminates one that is still waiting)
    assert "exitcode  : 1" in proc.stderr and "exitcode  : 0" not in proc.stderr, proc.stderr[-3000:]
    # after the process groups exist (rank 0 reports; the others see the same message and stay quiet):
    # SmolLM2's 49152-token tokenizer on a model with a 256-entry vocabulary
    from megatron_hdpissa.convert.hf_megatron import convert_hf_to_megatron

    tiny = convert_hf_to_megatron(tiny_llama_hf_dir, tmp_path / "tiny", tp_size=1, progress=False)
    proc = _torchrun("--pretrained-checkpoint", str(tiny), "--tokenizer-model", str(smollm2_hf_dir),
                     "--data-path", str(data), "--train-iters", "1", "--no-progress")
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "--tokenizer-model" in line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "256" in lines[0], proc.stderr[-3000:]
    assert "megatron_hdpissa/" not in proc.stderr, proc.stderr[-3000:]
    # a usage error: argparse's message once, from rank 0
    proc = _torchrun("--pretrained-checkpoint", str(missing), "--data-path", str(data), "--train-iters", "1",
                     "--pad-multiple", "0")
    assert proc.returncode != 0
    assert proc.stderr.count("--pad-multiple must be >= 1") == 1, proc.stderr[-3000:]


def test_run_cli_keeps_tracebacks_of_unexpected_errors(capsys):
    from megatron_hdpissa.training.errors import run_cli

    def bad_input(argv):
        raise FileNotFoundError("--data-path x.jsonl does not exist")

    def bug(argv):
        raise RuntimeError("an internal bug")

    shut = []
    with pytest.raises(SystemExit) as exit_:
        run_cli(bad_input, [], lambda: shut.append(1))
    assert exit_.value.code == 1 and shut == [1]
    assert capsys.readouterr().err == "error: --data-path x.jsonl does not exist\n"
    with pytest.raises(RuntimeError, match="an internal bug"):
        run_cli(bug, [], lambda: shut.append(2))
    assert shut == [1, 2]
