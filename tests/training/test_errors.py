"""Bad input gets a clear error naming the layer or flag."""
from __future__ import annotations

import pytest

from megatron_hdpissa import HDPiSSAConfig
from megatron_hdpissa.peft import layout
from megatron_hdpissa.training.arguments import flag_errors, parse_args, peft_config
from tests.helpers import toy
from tests.helpers.distributed import run_distributed

REQUIRED = ["--data-path", "train.jsonl", "--train-iters", "1", "--pretrained-checkpoint", "base"]


def _config(*flags):
    """The trainer's config for these flags (library errors mapped to the flags)."""
    return peft_config(parse_args([*REQUIRED, *flags]))


@pytest.mark.parametrize("alpha", [0, -1.0])
def test_alpha_must_be_positive(alpha):
    with pytest.raises(ValueError, match="--hd-pissa-alpha"):
        _config("--hd-pissa-alpha", str(alpha))
    with pytest.raises(ValueError, match="^alpha must be > 0"):  # the library names its parameter
        HDPiSSAConfig(rank=4, alpha=alpha)


def test_rank_and_method_validated():
    with pytest.raises(ValueError, match="--hd-pissa-rank"):
        _config("--hd-pissa-rank", "0")
    with pytest.raises(ValueError, match="--hd-pissa-svd"):
        with flag_errors("hd-pissa"):  # argparse's choices catch it first on the command line
            HDPiSSAConfig(rank=2, svd_method="qr")
    with pytest.raises(ValueError, match="^rank must be a positive integer"):
        HDPiSSAConfig(rank=0)
    with pytest.raises(ValueError, match="^svd_method must be one of"):
        HDPiSSAConfig(rank=2, svd_method="qr")


def test_baseline_errors_name_the_baseline_flags():
    """--peft lora / pissa: the baselines' own flags, never --hd-pissa-rank; --lora-* fall back to
    --hd-pissa-*, so existing command lines build the same config."""
    for method in ("lora", "pissa"):
        for flags, flag in ((("--lora-rank", "0"), "--lora-rank"), (("--hd-pissa-rank", "0"), "--lora-rank"),
                            (("--lora-alpha", "-1"), "--lora-alpha"),
                            (("--lora-target-modules", ","), "--lora-target-modules")):
            with pytest.raises(ValueError) as err:
                _config("--peft", method, *flags)
            assert flag in str(err.value) and "--hd-pissa-rank" not in str(err.value), str(err.value)
        cfg = _config("--peft", method, "--hd-pissa-rank", "8", "--hd-pissa-alpha", "4",
                      "--hd-pissa-target-modules", "linear_qkv")
        assert (cfg.method, cfg.rank, cfg.alpha, cfg.target_modules) == (method, 8, 4.0, ("linear_qkv",))
        cfg = _config("--peft", method, "--hd-pissa-rank", "8", "--lora-rank", "2", "--lora-alpha", "6",
                      "--lora-target-modules", "linear_fc1,linear_fc2")
        assert (cfg.rank, cfg.scale, cfg.target_modules) == (2, 3.0, ("linear_fc1", "linear_fc2"))
    with pytest.raises(SystemExit):  # --lora-* with --peft hd-pissa: a usage error
        parse_args([*REQUIRED, "--lora-rank", "4"])


def test_alpha_below_rank_still_trains():
    # The published code floors alpha // r, so alpha < r silently trains nothing.
    assert HDPiSSAConfig(rank=16, alpha=8).scale == 0.5


def test_tp_must_take_whole_query_groups():
    with pytest.raises(ValueError, match=r"--tensor-model-parallel-size 3 does not divide num_query_groups 2"):
        layout.qkv_parts(num_heads=4, num_query_groups=2, head_dim=8, tp_size=3, layer="decoder.layers.0.linear_qkv")


def _apply_with(cfg_kwargs, method="hd-pissa", flags=True):
    """apply_hd_pissa / apply_lowrank on the toy; with `flags`, as the trainer calls it (errors
    naming its flags), else the library's own message."""
    import contextlib

    from megatron_hdpissa import LowRankConfig, apply_hd_pissa, apply_lowrank

    model = toy.MegatronToy(toy.logical_weights(), 1)
    try:
        with flag_errors(method) if flags else contextlib.nullcontext():
            if method == "hd-pissa":
                apply_hd_pissa(model, HDPiSSAConfig(**cfg_kwargs), progress=False)
            else:
                apply_lowrank(model, LowRankConfig(method, **cfg_kwargs), progress=False)
    except Exception as e:  # noqa: BLE001 - the message is what is tested
        return f"{type(e).__name__}: {e}"
    return "no error"


def test_errors_in_real_process_groups():
    # one spawn, several checks: DP=2, so K = 2 x r
    msgs = run_distributed(_errors_worker, 2, 1)[0]
    too_big, nothing, tp_bad, lib_too_big, lib_nothing, pissa_big, lora_nothing = msgs
    assert "linear_qkv (part k)" in too_big and "= 20 singular components" in too_big and "16x32" in too_big
    assert "--hd-pissa-target-modules ['nonexistent'] matched no parallel linear" in nothing
    assert "linear_qkv" in nothing  # lists what exists
    assert tp_bad == "no error"
    # the library's own messages name its parameters
    assert "x rank 10 = 20 singular components" in lib_too_big and "--hd-pissa" not in lib_too_big
    assert "target_modules ['nonexistent'] matched no parallel linear" in lib_nothing
    assert "--hd-pissa" not in lib_nothing
    # the baselines name their own flags (K = 1: the rank alone must fit)
    assert "linear_qkv (part k)" in pissa_big and "--lora-rank = 17 singular components" in pissa_big
    assert "--lora-target-modules ['nonexistent'] matched no parallel linear" in lora_nothing
    assert "--hd-pissa" not in pissa_big + lora_nothing


def _errors_worker():
    return [
        _apply_with(dict(rank=10)),  # k has 16 rows: 2 ranks x 10 > 16
        _apply_with(dict(rank=2, target_modules=["nonexistent"])),
        _apply_with(dict(rank=2)),
        _apply_with(dict(rank=10), flags=False),
        _apply_with(dict(rank=2, target_modules=["nonexistent"]), flags=False),
        _apply_with(dict(rank=17), method="pissa"),
        _apply_with(dict(rank=2, target_modules=["nonexistent"]), method="lora"),
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


def _our_frames(stderr: str) -> list[str]:
    """Traceback lines in one of the package's files (the messages themselves may name paths
    under a cache folder called megatron_hdpissa)."""
    return [line for line in stderr.splitlines() if line.lstrip().startswith('File "') and "megatron_hdpissa/" in line]


def test_cli_user_error_prints_one_line_from_rank_0(tmp_path, tiny_llama_hf_dir, smollm2_hf_dir):
    data = tmp_path / "train.jsonl"
    data.write_text('{"question": "q", "answer": "a"}\n')
    missing = tmp_path / "no-such-checkpoint"
    proc = _torchrun("--pretrained-checkpoint", str(missing), "--data-path", str(data), "--train-iters", "1",
                     "--no-progress")
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if f"{missing} does not exist" in line]
    assert lines == [f"error: --pretrained-checkpoint/--load {missing} does not exist"], proc.stderr[-3000:]
    assert _our_frames(proc.stderr) == [], proc.stderr[-3000:]  # no traceback of ours
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
    assert _our_frames(proc.stderr) == [], proc.stderr[-3000:]
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
