"""--ckpt-format torch_dist in the trainer: a run saved at one (TP, PP) layout resumes at another with
the same K = DP x virtual ranks and continues as the uninterrupted run does; at the same layout the
resume is bit-exact; another K is refused with a message that says what to do.

The model is a LLaMA config with 8 heads / 4 query groups (so TP = 1, 2, 4 all take whole groups)
and SmolLM2's tokenizer; K = 2 throughout: TP=2 x DP=1 x 2 virtual ranks, TP=1 x DP=2,
TP=4 x DP=1 x 2 virtual ranks, PP=2 x DP=1 x 2 virtual ranks.

Tolerance across layouts: the same arithmetic summed in another order (TP splits the GEMMs'
inner sums, and the aggregation adds the K slices' deltas in another grouping), so fp32
rounding differs at ~1e-7 relative per operation; after 4 Adam steps at lr 1e-2 that stays below
1e-5 relative on the weights (measured: see the assertion messages), while a wrong slice, a
transposed shard or a lost moment moves them by >= 1e-3.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers.distributed import run_distributed
from tests.helpers.hf_models import tiny_trainer_material
from tests.helpers.trainer import expect_error, finetune_main, flags, rel_diff, saved_tensors

ITERS = 4


@pytest.fixture(scope="module")
def m(tmp_path_factory, smollm2_hf_dir, gsm8k_path):
    return tiny_trainer_material(
        tmp_path_factory.mktemp("resume_dist"), smollm2_hf_dir, gsm8k_path, seed=21, ckpt_format="torch_dist",
        num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False, initializer_range=0.05)


# (world size, flags) per layout; K = 2 in each
LAYOUTS = {
    "tp2": (2, {"--tensor-model-parallel-size": 2, "--hd-pissa-virtual-ranks": 2}),
    "dp2": (2, {}),
    "tp4": (4, {"--tensor-model-parallel-size": 4, "--hd-pissa-virtual-ranks": 2}),
    "pp2": (2, {"--pipeline-model-parallel-size": 2, "--hd-pissa-virtual-ranks": 2}),
    "pp1": (1, {"--hd-pissa-virtual-ranks": 2}),
    # K = 1 (the baselines: one data shard per DP rank)
    "tp2v1": (2, {"--tensor-model-parallel-size": 2}),
    "single": (1, {}),
}


def _argv(m, run: str, layout: str, **over):
    args = {"--pretrained-checkpoint": m["base"], "--data-path": m["train"], "--micro-batch-size": 2,
            "--global-batch-size": 8, "--seq-length": 160, "--lr": 1e-2, "--lr-decay-style": "cosine",
            "--lr-warmup-iters": 1, "--hd-pissa-rank": 4, "--no-progress": None, "--seed": 5,
            "--train-iters": ITERS, "--save": m["root"] / run, "--ckpt-format": "torch_dist",
            "--log-json": m["root"] / f"{run}.jsonl", **LAYOUTS[layout][1]}
    args.update(over)
    return flags(args)


def _run(m, run: str, layout: str, **over):
    world = LAYOUTS[layout][0]
    tp = int(LAYOUTS[layout][1].get("--tensor-model-parallel-size", 1))
    pp = int(LAYOUTS[layout][1].get("--pipeline-model-parallel-size", 1))
    return run_distributed(finetune_main, world, tp, pp=pp, args=(_argv(m, run, layout, **over),))[0]


def _saved(m, run: str) -> dict[str, torch.Tensor]:
    return saved_tensors(m["root"] / run)


def _losses(m, run):
    lines = (m["root"] / f"{run}.jsonl").read_text().splitlines()
    return {json.loads(x)["iteration"]: json.loads(x)["loss"] for x in lines if "loss" in json.loads(x)}



@pytest.fixture(scope="module")
def reference(m):
    """The uninterrupted run at DP=2 (and at TP=2 x 2 virtual ranks, the layout that saves)."""
    _run(m, "ref_dp2", "dp2")
    _run(m, "ref_tp2", "tp2")
    return _saved(m, "ref_dp2")


def _interrupted(m, run: str, layout: str):
    """The first half of a run at `layout`: saves at ITERS / 2 and exits."""
    r = _run(m, run, layout, **{"--exit-interval": ITERS // 2})
    assert r["exited_at"] == ITERS // 2


@pytest.fixture(scope="module")
def half_tp2(m):
    """The TP=2 x 2 virtual ranks run saved at ITERS / 2 (each test resumes a copy)."""
    _interrupted(m, "half_tp2", "tp2")
    return m["root"] / "half_tp2"


def _copy(m, src: Path, run: str) -> Path:
    shutil.copytree(src, m["root"] / run)
    return m["root"] / run


def test_same_layout_resume_is_bit_exact(m, reference, half_tp2):
    load = _copy(m, half_tp2, "resumed_tp2")
    r = _run(m, "resumed_tp2", "tp2", **{"--load": load})
    assert r["start"] == ITERS // 2
    full, resumed = _saved(m, "ref_tp2"), _saved(m, "resumed_tp2")
    assert set(full) == set(resumed)
    assert any(k.startswith("hd_pissa.") for k in full) and any(k.startswith("optimizer.exp_avg_sq.") for k in full)
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


# TP = 4 runs 4 processes on CI's 2 cores: marked slow (`make test-slow`), run for every change here
@pytest.mark.parametrize("layout", ["dp2", pytest.param("tp4", marks=pytest.mark.slow)])
def test_tp2_checkpoint_resumes_at_another_tp(m, reference, half_tp2, layout):
    run = f"from_tp2_to_{layout}"
    r = _run(m, run, layout, **{"--load": _copy(m, half_tp2, run)})
    assert r["start"] == ITERS // 2
    _compare(m, run, reference, _saved(m, "ref_tp2"))


def test_pp2_checkpoint_resumes_at_pp1(m, reference):
    _interrupted(m, "half_pp2", "pp2")
    _run(m, "half_pp2", "pp1", **{"--load": m["root"] / "half_pp2"})
    _compare(m, "half_pp2", reference)


def _compare(m, run, reference, other_layout=None):
    """The resumed run against the uninterrupted one at the resuming layout. Bound per tensor:
    1e-5 relative, plus (when given) 3x how far the uninterrupted runs at the two layouts are
    apart (the first half of the resumed run ran at the saving layout)."""
    resumed = _saved(m, run)
    assert set(resumed) == set(reference)
    base = _saved_base(m)
    worst = {k: rel_diff(resumed[k], want) for k, want in reference.items()}
    spread = {k: rel_diff(other_layout[k], want) if other_layout else 0.0 for k, want in reference.items()}
    moved = [k for k in base if k.endswith(("linear_qkv.weight", "linear_fc2.weight")) and rel_diff(reference[k], base[k]) > 1e-4]
    lora = any(k.startswith("lora.") for k in reference)  # LoRA leaves W alone: its factors move
    assert len(moved) == (0 if lora else 2), f"the targeted weights moved: {moved}"
    bad = {k: (v, spread[k]) for k, v in worst.items() if v > 1e-5 + 3 * spread[k]}
    assert not bad, f"{run}: (relative difference, layouts' spread) above the bound: {bad}"
    print(f"{run}: worst relative difference {max(worst.values()):.2e} over {len(worst)} tensors "
          f"(uninterrupted layouts apart by up to {max(spread.values()):.2e})")


@pytest.mark.parametrize("peft", ["lora", pytest.param("full", marks=pytest.mark.slow)])
def test_baselines_resume_at_another_tp(m, peft):
    """LoRA's factors (TP-split and TP-replicated, replicated over DP) and full fine-tuning's
    moments (sharded like each weight, the fused fc1 through megatron-core's swiglu factory)."""
    method_flags = {"--peft": peft, "--hd-pissa-rank": 4, "--lr": 3e-3}
    _run(m, f"{peft}_ref", "single", **method_flags)
    _run(m, f"{peft}_ref_tp2", "tp2v1", **method_flags)
    _run(m, f"{peft}_half", "tp2v1", **method_flags, **{"--exit-interval": ITERS // 2})
    _run(m, f"{peft}_half", "single", **method_flags, **{"--load": m["root"] / f"{peft}_half"})
    _compare(m, f"{peft}_half", _saved(m, f"{peft}_ref"), _saved(m, f"{peft}_ref_tp2"))
    # the baselines' K is the DP size (one data shard per rank): another DP is refused
    argv = _argv(m, "dp_refused", "dp2", **method_flags, **{"--load": m["root"] / f"{peft}_half", "--save": False})
    msg = run_distributed(expect_error, 2, 1, args=(argv,))[0]
    assert "saved with data-parallel size 1, this run has 2" in msg, msg


def test_sharded_fp32_masters_reshard_over_dp(m):
    """--bf16: each DP rank's fp32 master block is gathered on save and cut again on load (DP=2
    -> DP=1 with 2 virtual ranks); the masters and the bf16 weights continue as uninterrupted."""
    method_flags = {"--bf16": None}
    _run(m, "bf16_ref", "dp2", **method_flags)
    _run(m, "bf16_half", "dp2", **method_flags, **{"--exit-interval": ITERS // 2})
    _run(m, "bf16_half", "pp1", **method_flags, **{"--load": m["root"] / "bf16_half"})
    ref = _saved(m, "bf16_ref")
    assert any(k.startswith("hd_pissa_master.") and ref[k].dtype == torch.float32 for k in ref), sorted(ref)[:3]
    _compare(m, "bf16_half", ref)


def _saved_base(m) -> dict[str, torch.Tensor]:
    from megatron_hdpissa.checkpoint.legacy import read_checkpoint_info
    from megatron_hdpissa.checkpoint.safe_load import read_global_tensors

    return read_global_tensors(read_checkpoint_info(m["base"]).iter_dir)


def test_another_k_is_refused(m, half_tp2):
    argv = _argv(m, "k_refused", "dp2", **{"--load": half_tp2, "--save": False})
    msg = run_distributed(expect_error, 1, 1, args=(argv,))[0]
    assert "K = 2 slices" in msg and "this run has K = 1" in msg and "--hd-pissa-virtual-ranks" in msg, msg


def _main_crashing_in_second_save(argv):
    """The trainer with megatron-core's save failing the second time (a full disk mid-save)."""
    from megatron.core import dist_checkpointing

    real, calls = dist_checkpointing.save, []

    def crash(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real(*args, **kwargs)

    dist_checkpointing.save = crash
    return expect_error(argv)


def test_crash_during_save_keeps_previous_checkpoint(m):
    """Saves every iteration; the save of iteration 2 dies: iteration 1 stays the tracked
    checkpoint, the half-written folder is not taken for one, and resuming from it finishes
    exactly as the uninterrupted run."""
    run_flags = {"--train-iters": 3, "--save-interval": 1}
    msg = run_distributed(_main_crashing_in_second_save, 1, 1, args=(_argv(m, "crashed", "single", **run_flags),))[0]
    assert "disk full (simulated)" in msg, msg
    run = m["root"] / "crashed"
    assert (run / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    # issue 23: the failed save's partial folder is removed (a killed save's is cleared by the next)
    assert not (run / "iter_0000002").exists() and not (run / "iter_0000002.tmp").exists()
    r = _run(m, "crashed", "single", **run_flags, **{"--load": run})
    assert r["start"] == 1
    _run(m, "crash_ref", "single", **{"--train-iters": 3})
    want, got = _saved(m, "crash_ref"), _saved(m, "crashed")
    assert set(want) == set(got)
    for k in want:
        assert torch.equal(want[k], got[k]), k
