"""The trainer's guards: finite flags, the stop / skip decision with --max-skipped-steps, no
checkpoint with a non-finite weight (on every rank together), inputs checked before the base
model is loaded, megatron-core's import-time notices as one line; and the poisoned-lr runs on
the 2-layer SmolLM2 end to end."""
from __future__ import annotations

import json
import math
import warnings
from types import SimpleNamespace

import pytest
import torch

from tests.helpers.distributed import run_distributed
from tests.helpers.trainer import expect_error, expect_errors


@pytest.fixture(scope="module")
def material(tmp_path_factory, smollm2_hf_dir, gsm8k_path):
    from megatron_hdpissa.convert.hf_megatron import convert_hf_to_megatron
    from megatron_hdpissa.data.gsm8k import split_gsm8k
    from megatron_hdpissa.data.sft import write_jsonl

    root = tmp_path_factory.mktemp("guards")
    base = convert_hf_to_megatron(smollm2_hf_dir, root / "base", tp_size=1, progress=False)
    train, _ = split_gsm8k(str(gsm8k_path), num_heldout=319, seed=0)
    write_jsonl(train[:96], str(root / "train.jsonl"))
    return {"root": root, "base": base, "train": root / "train.jsonl"}


def argv(m, **over):
    args = {"--pretrained-checkpoint": m["base"], "--data-path": m["train"], "--micro-batch-size": 2,
            "--global-batch-size": 4, "--seq-length": 96, "--lr-decay-style": "constant", "--hd-pissa-rank": 4,
            "--no-progress": None, "--seed": 7, "--train-iters": 1, "--ckpt-format": "torch"}
    args.update(over)
    return [str(x) for k, v in args.items() for x in ((k,) if v is None else (k, v))]


@pytest.mark.parametrize("flag", ["--lr", "--min-lr", "--clip-grad", "--weight-decay"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1"])
def test_optimisation_flags_must_be_finite(flag, value, capsys):
    from megatron_hdpissa.training.arguments import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--pretrained-checkpoint", "b", "--data-path", "d", "--train-iters", "1", f"{flag}={value}"])
    err = capsys.readouterr().err
    assert f"{flag} must be a finite number" in err and value in err, err
    assert len(err.strip().splitlines()) == 2, err  # usage (one line) and the error


def _optimizer(skipped=False, reason=None, norm=1.0):
    return SimpleNamespace(last_step_skipped=skipped, last_skip_reason=reason, last_grad_norm=norm)


def test_step_guard_stops_or_skips_and_limits_consecutive_skips():
    from megatron_hdpissa.training.guards import StepGuard

    stop = StepGuard("stop", 3, print)
    assert stop.loss_ok(5, True)
    with pytest.raises(FloatingPointError, match=r"non-finite update at iteration 7 .*W and the optimizer state "
                                                 r"were not touched"):
        stop.after_step(7, _optimizer(True, "update"))
    with pytest.raises(FloatingPointError, match=r"non-finite loss at iteration 2 .*no step was taken"):
        stop.loss_ok(2, False)
    lines = []
    skip = StepGuard("skip", 3, lines.append)
    assert not skip.loss_ok(1, False)
    skip.after_step(2, _optimizer(True, "update"))
    skip.after_step(3, _optimizer())  # a step taken: the run of skips starts again
    assert skip.consecutive == 0 and len(lines) == 2 and "iteration 2: non-finite update" in lines[1]
    skip.after_step(4, _optimizer(True, "gradient", math.inf))
    skip.after_step(5, _optimizer(True, "update"))
    with pytest.raises(FloatingPointError, match=r"3 consecutive steps skipped \(iterations 4-6; "
                                                 r"--max-skipped-steps 3\)"):
        skip.loss_ok(6, False)
    scaled = StepGuard("stop", 1, lines.append, loss_scaling=True)  # fp16 overflows are the scaler's
    scaled.after_step(1, _optimizer(True, "gradient", math.inf))
    assert scaled.consecutive == 0
    unlimited = StepGuard("skip", 0, lines.append)
    for it in range(50):
        unlimited.loss_ok(it, False)
    assert unlimited.consecutive == 50


def _finite_weights_worker():
    from megatron_hdpissa.distributed.groups import ParallelGroups
    from megatron_hdpissa.training.guards import check_finite_weights

    groups = ParallelGroups.from_megatron()
    rank = torch.distributed.get_rank()
    good = {"a": torch.ones(3), "b": torch.zeros(2, 2)}
    check_finite_weights(good, groups, 4)  # nothing raised anywhere
    bad = {"a": torch.ones(3), "b": torch.tensor([[1.0, math.nan], [math.inf, 0.0]]) if rank == 1 else torch.ones(2, 2)}
    try:
        check_finite_weights(bad, groups, 5)
    except FloatingPointError as e:
        return str(e)
    return "no error"


def test_no_checkpoint_with_a_nonfinite_weight_on_any_rank():
    msgs = run_distributed(_finite_weights_worker, 2)
    for msg in msgs:  # refused on both ranks, though only rank 1 holds the bad values
        assert msg.startswith("refusing to save iteration 5: 2 non-finite values"), msg
    assert "first on this rank: b (2 of 4)" in msgs[1], msgs[1]


def test_megatron_notices_become_one_line():
    from megatron_hdpissa.training import quiet

    shown = []
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda *a, **k: shown.append(str(a[0]))
        quiet.quiet_megatron_notices()
        quiet.quiet_megatron_notices()  # idempotent
        before = len(quiet.hidden)
        for msg, path in (("Apex is not installed. Falling back to Torch Norm", "/x/megatron/core/models/backends.py"),
                          ("Transformer Engine and Apex are not installed.", "/x/megatron/core/optimizer/y.py"),
                          ("Apex is not installed. Falling back to Torch Norm", "/x/my_code.py"),
                          ("something else", "/x/megatron/core/z.py")):
            warnings.warn_explicit(msg, UserWarning, path, 1)
    assert len(quiet.hidden) - before == 2
    assert shown == ["Apex is not installed. Falling back to Torch Norm", "something else"], shown
    assert "import-time warnings not shown" in quiet.hidden_notices_line()


def _inputs_worker(cases):
    """Each case's error with the base model's loading replaced by a failure: the checks must come first."""
    from megatron_hdpissa.convert import load

    def loaded(*a, **k):
        raise AssertionError("the base model was loaded before the inputs were checked")

    load.load_megatron_checkpoint = loaded
    return expect_errors(cases)


def test_inputs_fail_before_the_model_is_loaded(material, tmp_path):
    garbled = tmp_path / "garbled.jsonl"
    garbled.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n{not json\n")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [argv(material, **{"--data-path": tmp_path / "missing.jsonl"}),
             argv(material, **{"--valid-data-path": tmp_path / "missing-valid.jsonl"}),
             argv(material, **{"--valid-data-path": garbled}),
             argv(material, **{"--save": a_file}),
             argv(material, **{"--export-hf": a_file / "sub"}),
             argv(material, **{"--log-json": tmp_path}),
             argv(material, **{"--tokenizer-model": tmp_path / "no-tokenizer"})]
    msgs = run_distributed(_inputs_worker, 1, args=(cases,))[0]
    assert "--data-path" in msgs[0] and "missing.jsonl does not exist" in msgs[0], msgs[0]
    assert "--valid-data-path" in msgs[1] and "missing-valid.jsonl does not exist" in msgs[1], msgs[1]
    assert f"{garbled}:2" in msgs[2], msgs[2]
    assert "--save" in msgs[3] and "is a file, not a folder" in msgs[3], msgs[3]
    assert "--export-hf" in msgs[4] and "is a file, not a folder" in msgs[4], msgs[4]
    assert "--log-json" in msgs[5] and "is a folder, not a file" in msgs[5], msgs[5]
    for msg in msgs:
        assert "AssertionError" not in msg, msg


def _read_log(path):
    return [json.loads(line) for line in open(path)]


def test_poisoned_lr_never_reaches_weights_or_checkpoints(material, tmp_path):
    """--lr 1e30 on the 2-layer SmolLM2 with 2 ranks: stop mode stops at iteration 1 without a
    checkpoint; skip mode skips, logs each step's own gradient norm, saves the untouched base
    weights and stops at --max-skipped-steps."""
    stop, skip = tmp_path / "stop", tmp_path / "skip"
    msg = run_distributed(expect_error, 2, args=(argv(material, **{"--lr": 1e30, "--train-iters": 3,
                                                                   "--save": stop, "--save-interval": 1}),))[0]
    assert "non-finite update at iteration 1" in msg and "W and the optimizer state were not touched" in msg, msg
    assert not (stop / "latest_checkpointed_iteration.txt").exists()
    log = tmp_path / "skip.jsonl"
    msg = run_distributed(expect_error, 2, args=(argv(material, **{
        "--lr": 1e30, "--train-iters": 5, "--save": skip, "--save-interval": 1, "--nonfinite-loss": "skip",
        "--max-skipped-steps": 3, "--log-json": log}),))[0]
    assert "3 consecutive steps skipped (iterations 1-3; --max-skipped-steps 3)" in msg, msg
    norms = [row["grad_norm"] for row in _read_log(log)]
    assert len(norms) == 2 and all(math.isfinite(n) for n in norms) and norms[0] != norms[1], norms
    saved = torch.load(skip / "iter_0000002" / "mp_rank_00" / "model_optim_rng.pt", weights_only=True)["model"]
    weights = {k: v for k, v in saved.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    assert weights and all(torch.isfinite(v).all() for v in weights.values())
    first = torch.load(skip / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt", weights_only=True)["model"]
    for k, v in weights.items():  # no step was taken: the two checkpoints hold the same weights
        assert torch.equal(v, first[k]), k


def test_a_step_skipped_for_its_loss_logs_no_stale_norm(material, tmp_path):
    """LoRA at --lr 1e30: step 1 is finite (weights near 1e30), step 2's loss is not. Skipped for
    its loss, step 2 must log no gradient norm rather than step 1's."""
    log = tmp_path / "lora.jsonl"
    msg = run_distributed(expect_error, 2, args=(argv(material, **{
        "--peft": "lora", "--lr": 1e30, "--train-iters": 4, "--nonfinite-loss": "skip",
        "--max-skipped-steps": 2, "--log-json": log, "--log-interval": 1}),))[0]
    assert "consecutive steps skipped" in msg, msg
    rows = _read_log(log)
    assert math.isfinite(rows[0]["grad_norm"]), rows
    assert len(rows) >= 2 and all("grad_norm" not in row for row in rows[1:]), rows  # no norm logged
